"""Build SAELens-format SAE fixtures for saelab's tests, and check saelab-written SAELens folders with SAELens.

Run with the python of a separate venv that has SAELens (it cannot share saelab's venv: sae-lens 6.54 needs
transformer-lens 3.x, saelab 4.x):

    python3 -m venv /tmp/saelens-venv
    /tmp/saelens-venv/bin/pip install -c constraints.txt sae-lens==6.54.12
    /tmp/saelens-venv/bin/python scripts/saelens_fixtures.py                     # (re)writes tests/fixtures/saelens
    /tmp/saelens-venv/bin/python scripts/saelens_fixtures.py --check-saelab-folder DIR

Fixture mode: for each case below, build a small SAELens SAE (d_in=8, d_sae=16) with seeded random weights
(non-unit decoder rows, nonzero biases and thresholds), save it with SAELens' own save method into
`tests/fixtures/saelens/<case>/` (cfg.json + sae_weights.safetensors), load it back with `SAE.load_from_disk`
(what a SAELens user does) and save `io.safetensors` beside it:

    x            [5, 8]   fixed input
    feature_acts [5, 16]  SAELens encode(x)
    sae_out      [5, 8]   SAELens decode(encode(x))

Check mode: load DIR with SAELens' `SAE.load_from_disk`, run encode / decode on DIR/io.safetensors' `x` and compare
with its `feature_acts` and `sae_out` (written by saelab). Prints the maximum differences; exit status 1 when
either exceeds --atol.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

warnings.filterwarnings("ignore")

D_IN, D_SAE, K = 8, 16, 4
SEED = 1234
FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "saelens"
META = {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_post", "context_size": 128, "prepend_bos": True}


def fixed_input() -> torch.Tensor:
    """x [5, D_IN]: seeded normal inputs with an offset and a non-unit scale."""
    gen = torch.Generator().manual_seed(SEED)
    return torch.randn(5, D_IN, generator=gen) * 1.5 + 0.3


def randomize(sae: torch.nn.Module, seed: int) -> None:
    """Seeded non-trivial weights: W_enc [d_in, d_sae], W_dec [d_sae, d_in] with row norms in [0.5, 2],
    nonzero b_enc [d_sae] and b_dec [d_in]."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=gen) * 0.5)
        rows = torch.randn(D_SAE, D_IN, generator=gen)
        norms = 0.5 + 1.5 * torch.rand(D_SAE, 1, generator=gen)
        sae.W_dec.copy_(rows / rows.norm(dim=1, keepdim=True) * norms)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=gen) * 0.3)
        sae.b_dec.copy_(torch.randn(D_IN, generator=gen) * 0.3)


def build(case: str, folder: Path) -> None:
    """Build the SAELens SAE for `case` and save it (SAELens' own save method) into `folder`."""
    from sae_lens.saes import (
        AbsTopKSAE,
        AbsTopKSAEConfig,
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    seed = SEED + sum(map(ord, case))
    meta = SAEMetadata(**META)
    common = {"d_in": D_IN, "d_sae": D_SAE}
    if case == "standard":
        sae = StandardSAE(StandardSAEConfig(**common, metadata=meta))
    elif case == "standard_layer_norm":
        sae = StandardSAE(StandardSAEConfig(**common, normalize_activations="layer_norm", metadata=meta))
    elif case == "topk":
        sae = TopKSAE(TopKSAEConfig(**common, k=K, rescale_acts_by_decoder_norm=True, metadata=meta))
    elif case == "topk_plain":
        sae = TopKSAE(
            TopKSAEConfig(**common, k=K, rescale_acts_by_decoder_norm=False, apply_b_dec_to_input=False, metadata=meta)
        )
    elif case == "abstopk":
        sae = AbsTopKSAE(AbsTopKSAEConfig(**common, k=K, rescale_acts_by_decoder_norm=True, metadata=meta))
    elif case == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(**common, metadata=meta))
    elif case in ("batchtopk", "batchtopk_checkpoint"):
        sae = BatchTopKTrainingSAE(
            BatchTopKTrainingSAEConfig(**common, k=K, rescale_acts_by_decoder_norm=True, metadata=meta)
        )
    else:
        raise ValueError(case)
    randomize(sae, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    if case == "jumprelu":
        with torch.no_grad():
            threshold = torch.rand(D_SAE, generator=gen) * 0.8
            threshold[:3] = torch.tensor([-0.2, 0.0, -1.0])  # SAELens: ReLU(z) * 1[z > t]; t <= 0 acts as t = 0
            sae.threshold.copy_(threshold)
    if case.startswith("batchtopk"):
        sae.topk_threshold = torch.tensor(0.35, dtype=torch.double)
    if case == "batchtopk":
        sae.save_inference_model(folder)  # SAELens saves BatchTopK as a JumpReLU SAE
    else:
        sae.save_model(folder)  # batchtopk_checkpoint: the training checkpoint (architecture "batchtopk")


def reference_outputs(case: str, folder: Path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """SAELens' encode(x) [5, d_sae] and decode(encode(x)) [5, d_in] for the SAE saved in `folder`."""
    from sae_lens import SAE

    if case == "batchtopk_checkpoint":
        # SAELens has no inference class for "batchtopk": its inference form is what save_inference_model writes.
        from sae_lens import TrainingSAE

        training = TrainingSAE.load_from_disk(folder)
        with tempfile.TemporaryDirectory() as tmp:
            training.save_inference_model(tmp)
            sae = SAE.load_from_disk(tmp)
    else:
        sae = SAE.load_from_disk(folder)
    with torch.no_grad():
        acts = sae.encode(x)
        out = sae.decode(acts)
    return {"x": x.contiguous(), "feature_acts": acts.contiguous(), "sae_out": out.contiguous()}


CASES = (
    "standard",
    "standard_layer_norm",
    "topk",
    "topk_plain",
    "abstopk",
    "jumprelu",
    "batchtopk",
    "batchtopk_checkpoint",
)


def write_fixtures(root: Path) -> None:
    """Write every case of CASES into root/<case>/ and print a summary line per case."""
    x = fixed_input()
    for case in CASES:
        folder = root / case
        if folder.exists():
            shutil.rmtree(folder)
        build(case, folder)
        io = reference_outputs(case, folder, x)
        save_file(io, str(folder / "io.safetensors"))
        cfg = json.loads((folder / "cfg.json").read_text())
        acts = io["feature_acts"]
        print(
            f"{case:22s} architecture={cfg['architecture']:9s} L0/token={[(row != 0).sum().item() for row in acts]} "
            f"files={sorted(p.name for p in folder.iterdir())}"
        )


def check_folder(folder: Path, atol: float) -> int:
    """Load `folder` with SAELens and compare encode / decode on its io.safetensors; returns an exit status."""
    from sae_lens import SAE

    sae = SAE.load_from_disk(folder)
    if sae.cfg.reshape_activations == "hook_z":  # io.safetensors holds flattened [batch, n_heads * d_head] inputs
        sae.turn_off_forward_pass_hook_z_reshaping()
    io = load_file(str(folder / "io.safetensors"))
    with torch.no_grad():
        acts = sae.encode(io["x"])
        out = sae.decode(acts)
    d_acts = (acts - io["feature_acts"]).abs().max().item()
    d_out = (out - io["sae_out"]).abs().max().item()
    print(f"SAELens loaded {folder} as {type(sae).__name__} (architecture {sae.cfg.architecture()}, cfg {sae.cfg})")
    print(f"x {tuple(io['x'].shape)}: max |encode diff| = {d_acts:.3g}, max |decode(encode) diff| = {d_out:.3g}")
    ok = d_acts <= atol and d_out <= atol
    print("MATCH" if ok else f"MISMATCH (atol {atol})")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=FIXTURES, help="Fixture root (default: tests/fixtures/saelens).")
    parser.add_argument(
        "--check-saelab-folder", type=Path, help="A SAELens folder written by saelab, with io.safetensors."
    )
    parser.add_argument("--atol", type=float, default=1e-5, help="Tolerance of --check-saelab-folder.")
    args = parser.parse_args()
    if args.check_saelab_folder:
        return check_folder(args.check_saelab_folder, args.atol)
    write_fixtures(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
