"""The SAE contract, checked for every registered architecture (a new variant is tested the moment it is registered):

- from its defaults plus --target-l0 = the true L0, it recovers a planted dictionary (MMCS >= 0.95) at a held-out
  L0 within 25% of the truth, on two shapes and seeds;
- save/load round-trips its forward map; fold() preserves it; its sparse-kernel backward equals the dense one.
Plus: on signed codes AbsTopK uses one latent per true feature where TopK needs two.
"""

import argparse
import copy

import pytest
import torch
from helpers import perturb
from toy_variant import ToyConfig, ToyTopKSAE

from saelab.config import SAEConfig, add_arguments, from_args
from saelab.errors import SaelabError
from saelab.sae import ARCHITECTURES, StepContext, create_sae, load_sae, save_sae
from saelab.sae.registry import architecture_help, sae_sections
from saelab.sae.thresholds import ThresholdConfig
from saelab.synthetic import PlantedDictionary, cosine_matrix, mmcs, train_planted
from saelab.train.command import train_command_class

# Every architecture, and every threshold family (each sets its L0 differently).
VARIANTS = [(name, {}) for name in ARCHITECTURES if name != "threshold"] + [
    ("threshold", {"threshold": ThresholdConfig(threshold_family=family)})
    for family in ("soft", "hard", "half", "lq", "cel0")
]
IDS = [name + "-" + next(iter(opts.values())).threshold_family if opts else name for name, opts in VARIANTS]
# (d_in, true features, true L0, d_sae, steps, seed): 2-3x more features than dimensions (superposition)
SHAPES = [(32, 96, 3, 192, 1500, 0), (64, 192, 6, 384, 1500, 1)]


def make(name: str, options: dict, d_in: int, d_sae: int, target_l0: float, seed: int):
    torch.manual_seed(seed + 100)  # the SAE's init differs from the data's
    return create_sae(d_in, SAEConfig(architecture=name, d_sae=d_sae, target_l0=target_l0), options)


def build_parser_for(command: type) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_arguments(parser, command)
    return parser


def lm_gradient(x: torch.Tensor) -> torch.Tensor:
    """A stand-in for d(LM loss)/dx for g-SAE: a fixed function of x, small next to x."""
    return 0.1 * torch.tanh(x.flip(-1))


def check_planted_recovery(name: str, options: dict, shape: tuple, autocast: torch.dtype | None = None) -> None:
    """From its defaults plus --target-l0 = the true L0, `name` recovers a planted dictionary of `shape`, trained
    at float32 or under `autocast`."""
    d_in, n_features, true_l0, d_sae, steps, seed = shape
    data = PlantedDictionary(d_in, n_features, true_l0 / n_features, seed=seed)
    sae = make(name, options, d_in, d_sae, true_l0, seed)
    train_planted(sae, data, steps, grads=lm_gradient if name == "gsae" else None, autocast=autocast)
    assert all(t.dtype == torch.float32 for t in (*sae.parameters(), *sae.buffers()) if t.is_floating_point())
    with torch.no_grad():
        x = data.sample(8192)
        x_hat, code = sae.reconstruct(x)
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum())
    print(f"planted d{d_in} L0 {true_l0}: {name} {options}: L0 {code.l0():.2f} MMCS {mmcs(sae.W_dec, data.dictionary, absolute=sae.signed):.3f} "
          f"FVU {fvu:.3f}")  # the figures BENCHMARKS.md quotes (pytest -s)
    assert abs(code.l0() - true_l0) <= 0.25 * true_l0, f"held-out L0 {code.l0():.2f}, target {true_l0}"
    assert mmcs(sae.W_dec, data.dictionary, absolute=sae.signed) >= 0.95  # a signed latent may point either way


def test_abstopk_uses_one_latent_per_signed_feature_where_topk_needs_two():
    data = PlantedDictionary(32, 48, 3 / 48, seed=2, signed=True)
    matched = {}
    for name in ("abstopk", "topk"):
        sae = train_planted(make(name, {}, 32, 192, 3, seed=2), data, 1500)
        cos = cosine_matrix(sae.W_dec.detach(), data.dictionary)  # [d_sae, features]
        alive = (sae.encode(data.sample(8192)) != 0).any(dim=0)
        matched[name] = ((cos[alive].abs() > 0.9).sum(dim=0)).float()  # [features]: latents per true feature
    assert (matched["abstopk"] == 1).float().mean() >= 0.9  # one signed latent per feature
    assert matched["topk"].mean() >= 1.5  # +d and -d each need their own non-negative latent


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{s[0]}-l0{s[2]}")
@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=IDS)
def test_defaults_reach_the_target_and_recover_a_planted_dictionary(name, options, shape):
    check_planted_recovery(name, options, shape)


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=IDS)
def test_defaults_reach_the_target_and_recover_a_planted_dictionary_at_bf16(name, options):
    """--precision bf16 (auto's choice on CUDA and on CPUs with bf16 units): the same bar as float32."""
    check_planted_recovery(name, options, SHAPES[0], autocast=torch.bfloat16)


def check_round_trip(name: str, options: dict, folder) -> None:
    """save/load keeps the forward map and the code; fold() keeps the forward map."""
    sae = perturb(make(name, options, 16, 64, 4, seed=0))
    sae.input_scale.fill_(1.7)
    x = 3 * torch.randn(256, 16)
    # init on other tokens: quantile thresholds equal some sample's z exactly, a tie that rounding could flip
    sae.initialize_from_data(sae.normalize(3 * torch.randn(256, 16))[0])
    with torch.no_grad():
        for _ in range(3):  # batch-level variants learn their inference thresholds from training codes
            out = sae.training_loss(sae.normalize(x)[0], StepContext())
            sae.update_inference_state(out.code)
        expected, code = sae(x), sae.encode(x)
    loaded = load_sae(save_sae(sae, folder))
    assert loaded.options == copy.deepcopy(sae).fold().options  # the options, the sparsity coefficient fixed
    torch.testing.assert_close(loaded(x), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loaded.encode(x), code, atol=1e-4, rtol=1e-4)  # one rule: a saved code is the trained one
    folded = copy.deepcopy(sae).fold()
    torch.testing.assert_close(folded(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=IDS)
def test_save_load_and_fold_preserve_the_forward_map(name, options, tmp_path):
    check_round_trip(name, options, tmp_path / name)


def check_backward(name: str, options: dict, autocast, device: str) -> None:
    """The sparse-kernel backward equals the dense one. Also under bf16 autocast (--precision bf16): both paths see the same bf16 pre-activations, so they pick the
    same entries; the dense fallback's decoder matmul also runs in bf16, so they differ by bf16 rounding (2^-7).
    On CUDA the sparse path is the Triton kernels'."""
    x = torch.randn(128, 16, generator=torch.Generator().manual_seed(3)).to(device)
    grads = []
    for sparse in (True, False):
        sae = perturb(make(name, options, 16, 64, 4, seed=0)).to(device)
        dead = (torch.arange(64) % 3 == 0).to(device)  # AuxK and the dead-latent terms take part
        with torch.autocast(device, dtype=autocast, enabled=autocast is not None):
            out = sae.training_loss(x, StepContext(dead=dead, grads=lm_gradient(x), sparse_kernels=sparse))
        out.loss.backward()
        grads.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in sae.parameters()])
    tolerance = {"atol": 1e-5, "rtol": 1e-4} if autocast is None else {"atol": 5e-3, "rtol": 1e-2}
    for sparse_grad, dense_grad in zip(*grads):
        torch.testing.assert_close(sparse_grad, dense_grad, **tolerance)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton kernels under SAELAB_KERNELS=auto)"))])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=IDS)
def test_sparse_and_dense_backward_agree(name, options, autocast, device):
    check_backward(name, options, autocast, device)


def test_a_variant_in_one_file_and_one_registry_line_gets_the_contract_and_the_options(monkeypatch, tmp_path):
    monkeypatch.setitem(ARCHITECTURES, "toy", ToyTopKSAE)  # the registry line
    command = train_command_class()
    parsed = from_args(command, build_parser_for(command).parse_args(["--architecture", "toy", "--toy-shift", "0.01"]))
    assert parsed.sae.architecture == "toy" and parsed.toy == ToyConfig(toy_shift=0.01)
    assert "toy (a toy top-k)" in architecture_help()
    options = {"toy": ToyConfig(toy_shift=0.01)}
    check_round_trip("toy", options, tmp_path / "toy")
    check_backward("toy", options, None, "cpu")
    check_planted_recovery("toy", options, SHAPES[0])


def test_every_section_default_builds_every_architecture():
    for name in ARCHITECTURES:
        sae = create_sae(8, SAEConfig(architecture=name, d_sae=32, target_l0=4), {s: c() for s, c in sae_sections().items()})
        assert sae.cfg.k == 4


def test_an_sae_with_nan_weights_is_refused_when_loaded(tmp_path):
    sae = make("batchtopk", {}, 16, 64, 4, seed=0)  # its inference threshold is +inf until learnt: allowed
    folder = save_sae(sae, tmp_path / "good")
    assert torch.isinf(load_sae(folder).threshold).all()
    with torch.no_grad():
        sae.W_dec[3, 1] = float("nan")
    with pytest.raises(SaelabError, match="holds NaN/Inf in W_dec; it cannot encode anything"):
        load_sae(save_sae(sae, tmp_path / "bad"))
