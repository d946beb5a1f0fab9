"""Published SAEs through load_sae: sparsify folders, Gemma Scope params.npz, dictionary_learning ae.pt, and `hf:` /
SAELens `release:id` sources through a Hugging Face hub cache built in tmp_path. Offline; none of those libraries is
imported here.

The fixtures in tests/fixtures/published were written by the libraries themselves (make_fixtures.py there:
eai-sparsify 1.3.3's save_to_disk, dictionary-learning 0.1.0's trainSAE, params.npz read back through sae-lens
6.54.12's Gemma Scope loader), each with the library's own encode and forward outputs in io.safetensors. The files
of the refusal tests (edited configs, truncated files, malicious pickles) are written here by hand.
"""

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.sae import published
from saelab.sae.io import load_sae, load_saes, save_sae
from saelab.sae.registry import ARCHITECTURES
from saelab.sae.topk import TopKConfig

FIXTURES = Path(__file__).parent / "fixtures" / "published"
SAELENS_FIXTURES = Path(__file__).parent / "fixtures" / "saelens"
HOOK, LM = "blocks.3.hook_resid_post", "EleutherAI/pythia-70m-deduped"
# fixture (folder or file) -> the saelab architecture it loads as, its hook and model
CASES = {
    "sparsify/layers.3": ("topk", HOOK, "HuggingFaceTB/SmolLM2-135M"),
    "gemma_scope": ("jumprelu", None, None),
    "gemma_scope/params.npz": ("jumprelu", None, None),
    "dictionary_learning/standard": ("relu", HOOK, LM),
    "dictionary_learning/topk": ("topk", HOOK, LM),
    "dictionary_learning/batchtopk": ("batchtopk", HOOK, LM),
    "dictionary_learning/matryoshka": ("batchtopk", HOOK, LM),
    "dictionary_learning/jumprelu": ("jumprelu", HOOK, LM),
    "dictionary_learning/jumprelu/ae.pt": ("jumprelu", HOOK, LM),
}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def io(case):
    path = FIXTURES / case
    return load_file(str((path if path.is_dir() else path.parent) / "io.safetensors"))


def assert_matches_fixture(sae, case, atol=1e-5):
    ref = io(case)
    with torch.no_grad():
        acts, x_hat = sae.encode(ref["x"]), sae(ref["x"])
    torch.testing.assert_close(acts, ref["acts"], atol=atol, rtol=0)
    torch.testing.assert_close(x_hat, ref["x_hat"], atol=atol, rtol=0)
    assert (acts != 0).sum(dim=1).tolist() == (ref["acts"] != 0).sum(dim=1).tolist()


def dictionary_state(case):
    return torch.load(FIXTURES / "dictionary_learning" / case / "ae.pt", weights_only=True)


def assert_one_sentence(message):
    assert "\n" not in message and message.endswith(".") and not re.search(r"[.;]\s+[A-Z]", message), message


def copy_fixture(case, destination):
    shutil.copytree(FIXTURES / case, destination)
    return destination


# -- the library fixtures ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_loads_each_fixture_with_its_library_outputs(case):
    architecture, hook, model = CASES[case]
    sae = load_sae(FIXTURES / case)
    assert sae.architecture == architecture
    assert sae.metadata.get("hook") == hook and sae.metadata.get("model") == model
    assert sae.cfg.input_norm == "none" and sae.W_enc.dtype == torch.float32
    assert_matches_fixture(sae, case)


def test_fixtures_exercise_the_conventions():
    """The fixtures are only evidence if getting a convention wrong would change their outputs."""
    w, ref = load_file(str(FIXTURES / "sparsify/layers.3/sae.safetensors")), io("sparsify/layers.3")
    without_b_dec = (ref["x"] @ w["encoder.weight"].T + w["encoder.bias"]).relu().topk(4).indices.sort().values
    assert not torch.equal(without_b_dec, ref["acts"].topk(4).indices.sort().values)

    for params, case in ((dict(np.load(FIXTURES / "gemma_scope/params.npz")), "gemma_scope"),
                         (dictionary_state("jumprelu"), "dictionary_learning/jumprelu")):
        W_enc, b_enc, b_dec, t = (torch.as_tensor(params[k]) for k in ("W_enc", "b_enc", "b_dec", "threshold"))
        x, acts = io(case)["x"], io(case)["acts"]
        z = x @ W_enc + b_enc
        torch.testing.assert_close((z > t) * z.relu(), acts, atol=1e-6, rtol=0)  # ReLU(z) * 1[z > t], no b_dec
        assert ((z > 0) & (z <= t)).any() and ((z > t) & (z <= 0)).any()  # thresholds cut; t <= 0 acts as 0
        z_after_b_dec = (x - b_dec) @ W_enc + b_enc
        assert not torch.allclose((z_after_b_dec > t) * z_after_b_dec.relu(), acts)

    for case in ("batchtopk", "topk"):
        s, ref = dictionary_state(case), io(f"dictionary_learning/{case}")
        r = ((ref["x"] - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"]).relu()
        thresholded, top = r * (r > s["threshold"]), torch.zeros_like(r).scatter(1, r.topk(4).indices, r.topk(4).values)
        assert not torch.equal((thresholded != 0).sum(1), (top != 0).sum(1))
        torch.testing.assert_close(thresholded if case == "batchtopk" else top, ref["acts"], atol=1e-6, rtol=0)
    norms = dictionary_state("standard")["decoder.weight"].norm(dim=0)
    assert not torch.allclose(norms, torch.ones(32))  # from_pretrained's default normalize_decoder changes codes


def test_thresholds_map_exactly():
    g = np.load(FIXTURES / "gemma_scope/params.npz")
    sae = load_sae(FIXTURES / "gemma_scope")
    t = torch.from_numpy(g["threshold"])
    torch.testing.assert_close(sae.log_threshold.exp(), t.clamp_min(0))
    assert torch.isneginf(sae.log_threshold[t <= 0]).all() and sae.cfg.pre_enc_bias is False
    batch = load_sae(FIXTURES / "dictionary_learning/batchtopk")
    assert float(batch.threshold) == pytest.approx(0.35) and batch.cfg.k == 4
    assert batch.topk_cfg.rescale_by_decoder_norm is False
    assert load_sae(FIXTURES / "dictionary_learning/matryoshka").metadata["matryoshka_group_sizes"] == [8, 24]


def test_a_never_set_batchtopk_threshold_acts_as_relu(tmp_path):
    folder = copy_fixture("dictionary_learning/batchtopk", tmp_path / "fresh")
    state = torch.load(folder / "ae.pt", weights_only=True)
    torch.save({**state, "threshold": torch.tensor(-1.0)}, folder / "ae.pt")  # dictionary_learning's initial value
    x = io("dictionary_learning/batchtopk")["x"]
    with torch.no_grad():
        acts = load_sae(folder).encode(x)
    torch.testing.assert_close(acts, ((x - state["b_dec"]) @ state["encoder.weight"].T + state["encoder.bias"]).relu())


def test_saved_and_reloaded_published_sae_keeps_its_outputs(tmp_path):
    for case in ("sparsify/layers.3", "gemma_scope", "dictionary_learning/batchtopk"):
        save_sae(load_sae(FIXTURES / case), tmp_path / case)
        reloaded = load_sae(tmp_path / case)
        assert reloaded.metadata["published_format"] == case.split("/")[0]
        assert_matches_fixture(reloaded, case)


# -- telling formats apart, hooks -----------------------------------------------------------------------------------


def test_saelab_folder_is_not_mistaken_for_sparsify(tmp_path):
    if "topk" not in ARCHITECTURES:
        pytest.skip("saelab topk is not registered")
    sae = ARCHITECTURES["topk"](8, SAEConfig(architecture="topk", d_sae=32, k=4), {"topk": TopKConfig()})
    save_sae(sae, tmp_path / "native")
    assert not published.is_sparsify_config(json.loads((tmp_path / "native" / "cfg.json").read_text()))
    assert "published_format" not in load_sae(tmp_path / "native").metadata
    assert published.is_sparsify_config(json.loads((FIXTURES / "sparsify/layers.3/cfg.json").read_text()))


def test_hooks_come_from_the_folder_names(tmp_path):
    other = copy_fixture("sparsify/layers.3", tmp_path / "layers.3.mlp")
    assert "hook" not in load_sae(other).metadata and "model" not in load_sae(other).metadata
    for site, hook in (("res", "blocks.12.hook_resid_post"), ("mlp", "blocks.12.hook_mlp_out"),
                       ("att", "blocks.12.attn.hook_z")):
        folder = copy_fixture("gemma_scope", tmp_path / f"gemma-scope-2b-pt-{site}" / "layer_12" / "width_16k" / "x")
        assert load_sae(folder).metadata["hook"] == hook
        assert load_sae(folder / "params.npz").metadata["hook"] == hook
    folder = copy_fixture("dictionary_learning/topk", tmp_path / "attn")
    config = json.loads((folder / "config.json").read_text())
    config["trainer"]["submodule_name"] = "attn_out_layer_3"
    (folder / "config.json").write_text(json.dumps(config))
    assert "hook" not in load_sae(folder).metadata


def test_bfloat16_sparsify_weights_load_as_float32(tmp_path):
    folder = copy_fixture("sparsify/layers.3", tmp_path / "layers.3")
    state = load_file(str(folder / "sae.safetensors"))
    save_file({k: v.bfloat16() for k, v in state.items()}, str(folder / "sae.safetensors"))
    sae = load_sae(folder)
    assert sae.W_enc.dtype == torch.float32
    torch.testing.assert_close(sae.W_dec, state["W_dec"].bfloat16().float())


# -- refusals ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change,message", [
    ({"transcode": True}, "transcoder"),
    ({"skip_connection": True}, "skip connection"),
    ({"activation": "groupmax"}, "groupmax"),
])
def test_sparsify_forms_saelab_cannot_compute_are_refused(tmp_path, change, message):
    folder = copy_fixture("sparsify/layers.3", tmp_path / "layers.3")
    config = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(SaelabError, match=message) as error:
        load_sae(folder)
    assert_one_sentence(str(error.value))


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("case,file", [
    ("sparsify/layers.3", "sae.safetensors"),
    ("gemma_scope", "params.npz"),
    ("dictionary_learning/jumprelu", "ae.pt"),
])
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_or_truncated_files_give_one_sentence(tmp_path, case, file, damage):
    folder = copy_fixture(case, tmp_path / Path(case).name)
    if damage == "truncated":
        truncate(folder / file)
    else:
        (folder / file).write_bytes(b"not an SAE at all" if damage == "garbage" else b"")
    with pytest.raises(SaelabError) as error:
        load_sae(folder)
    assert_one_sentence(str(error.value))
    assert str(folder / file) in str(error.value)


def test_wrong_shapes_and_extra_arrays_are_refused(tmp_path):
    folder = copy_fixture("gemma_scope", tmp_path / "g")
    arrays = dict(np.load(folder / "params.npz"))
    np.savez(folder / "params.npz", **{**arrays, "b_dec": np.zeros(5, np.float32)})
    with pytest.raises(SaelabError, match="'b_dec'.*shape") as error:
        load_sae(folder)
    assert_one_sentence(str(error.value))
    np.savez(folder / "params.npz", **{**arrays, "affine_skip_connection": np.zeros((8, 8), np.float32)})
    with pytest.raises(SaelabError, match="affine_skip_connection"):
        load_sae(folder)
    np.savez(folder / "params.npz", **{**arrays, "scaling_factor": np.full(32, 2.0, np.float32)})
    with pytest.raises(SaelabError, match="scaling_factor"):
        load_sae(folder)


class Payload:
    """Unpickling this runs `exec(code)`: what a malicious ae.pt does under a plain torch.load."""

    def __init__(self, code):
        self.code = code

    def __reduce__(self):
        return exec, (self.code,)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle"])
def test_a_pickle_payload_in_ae_pt_runs_nothing(tmp_path, container):
    marker = tmp_path / "payload_ran"
    folder = copy_fixture("dictionary_learning/jumprelu", tmp_path / "evil")
    state = torch.load(folder / "ae.pt", weights_only=True)
    payload = {**state, "threshold": Payload(f"open({str(marker)!r}, 'w').close()")}
    if container == "torch_zip":
        torch.save(payload, folder / "ae.pt")
    else:
        (folder / "ae.pt").write_bytes(pickle.dumps(payload))
    with pytest.raises(SaelabError, match="weights_only") as error:
        load_sae(folder)
    assert_one_sentence(str(error.value))
    assert not marker.exists()
    if container == "torch_zip":  # the payload is live: an unsafe load runs it
        torch.load(folder / "ae.pt", weights_only=False)
    else:
        pickle.loads((folder / "ae.pt").read_bytes())
    assert marker.exists()


def test_dictionary_learning_files_saelab_cannot_read_are_refused(tmp_path):
    with pytest.raises(SaelabError, match="gated") as error:
        load_sae(FIXTURES / "dictionary_learning/gated")
    assert_one_sentence(str(error.value))

    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(FIXTURES / "dictionary_learning/topk/ae.pt", alone / "ae.pt")
    with pytest.raises(SaelabError, match="AutoEncoderTopK or BatchTopKSAE.*config.json") as error:
        load_sae(alone)
    assert_one_sentence(str(error.value))

    mislabelled = copy_fixture("dictionary_learning/topk", tmp_path / "mislabelled")
    config = json.loads((mislabelled / "config.json").read_text())
    config["trainer"]["dict_class"] = "JumpReluAutoEncoder"
    (mislabelled / "config.json").write_text(json.dumps(config))
    with pytest.raises(SaelabError, match="not the tensors of the JumpReluAutoEncoder"):
        load_sae(mislabelled)

    backup = copy_fixture("dictionary_learning/topk", tmp_path / "backup")
    state = torch.load(backup / "ae.pt", weights_only=True)
    torch.save({"step": 10, "ae": state, "optimizer": {"state": {}, "param_groups": []}, "norm_factor": 1.0},
               backup / "ae.pt")
    with pytest.raises(SaelabError, match="training backup") as error:
        load_sae(backup)
    assert_one_sentence(str(error.value))


# -- hub sources --------------------------------------------------------------------------------------------------


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face hub cache in tmp_path, offline; add(repo_id, {path in repo: local file}) stores a snapshot of
    `main` laid out as huggingface_hub does (snapshot files link to blobs)."""
    root = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(published, "saelens_directory_file", lambda: None)

    def add(repo_id, files):
        storage = root / f"models--{repo_id.replace('/', '--')}"
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / "main").write_text(COMMIT)
        for index, (name, source) in enumerate(files.items()):
            blob = storage / "blobs" / f"{index:040x}"
            blob.parent.mkdir(exist_ok=True)
            shutil.copy(source, blob)
            link = storage / "snapshots" / COMMIT / name
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(blob, link)

    return add


def folder_files(folder, prefix):
    return {f"{prefix}/{p.name}": p for p in Path(folder).iterdir() if p.name != "io.safetensors"}


GEMMA_REPO, GEMMA_PATH = "google/gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_5"


def test_hf_sources_load_from_the_hub_cache(hub_cache):
    hub_cache(GEMMA_REPO, folder_files(FIXTURES / "gemma_scope", GEMMA_PATH))
    hub_cache("EleutherAI/sae-SmolLM2-135M-tiny", {
        **folder_files(FIXTURES / "sparsify/layers.3", "layers.3"),
        "config.json": FIXTURES / "sparsify/config.json",
    })
    hub_cache("someone/saelens-saes", folder_files(SAELENS_FIXTURES / "standard", "blocks.3.hook_resid_post"))
    gemma = load_sae(f"hf:{GEMMA_REPO}/{GEMMA_PATH}")
    assert gemma.metadata["hook"] == HOOK
    assert_matches_fixture(gemma, "gemma_scope")
    assert_matches_fixture(load_sae(f"{GEMMA_REPO}:{GEMMA_PATH}"), "gemma_scope")  # SAELens' repo_id:path form
    sparsify = load_sae("hf:EleutherAI/sae-SmolLM2-135M-tiny/layers.3")
    assert sparsify.metadata["model"] == "HuggingFaceTB/SmolLM2-135M"
    assert_matches_fixture(sparsify, "sparsify/layers.3")
    saelens = load_sae("someone/saelens-saes:blocks.3.hook_resid_post")
    ref = load_file(str(SAELENS_FIXTURES / "standard" / "io.safetensors"))
    torch.testing.assert_close(saelens.encode(ref["x"]).detach(), ref["feature_acts"], atol=1e-5, rtol=0)
    ((name, sae, hook),) = load_saes([f"hf:{GEMMA_REPO}/{GEMMA_PATH}"])
    assert name == f"hf:{GEMMA_REPO}/{GEMMA_PATH}" and hook == HOOK and not sae.training


def test_saelens_release_names_resolve_through_its_directory(hub_cache, tmp_path, monkeypatch):
    hub_cache(GEMMA_REPO, folder_files(FIXTURES / "gemma_scope", GEMMA_PATH))
    hub_cache("canrager/lm_sae", folder_files(FIXTURES / "dictionary_learning/batchtopk", "pythia/trainer_0"))
    directory = tmp_path / "pretrained_saes.yaml"
    directory.write_text(
        "gemma-scope-2b-pt-res-canonical:\n  conversion_func: gemma_2\n  model: gemma-2-2b\n"
        f"  repo_id: {GEMMA_REPO}\n  saes:\n  - id: layer_3/width_16k/canonical\n    path: {GEMMA_PATH}\n"
        "dl-release:\n  conversion_func: dictionary_learning_1\n  model: pythia-70m-deduped\n"
        "  repo_id: canrager/lm_sae\n  saes:\n  - id: '0'\n    path: pythia/trainer_0\n"
        "llama_scope_lxr_8x:\n  conversion_func: llama_scope\n  model: meta-llama/Llama-3.1-8B\n"
        "  repo_id: fnlp/Llama3_1-8B-Base-LXR-8x\n  saes:\n  - id: l0r_8x\n    path: Llama3_1-8B-Base-L0R-8x\n"
    )
    monkeypatch.setattr(published, "saelens_directory_file", lambda: directory)
    assert_matches_fixture(load_sae("gemma-scope-2b-pt-res-canonical:layer_3/width_16k/canonical"), "gemma_scope")
    assert_matches_fixture(load_sae("dl-release:0"), "dictionary_learning/batchtopk")
    for source, message in (
        ("llama_scope_lxr_8x:l0r_8x", "'llama_scope' converter"),
        ("gemma-scope-2b-pt-res-canonical:layer_9/width_16k/canonical", "has no SAE 'layer_9"),
    ):
        with pytest.raises(SaelabError, match=message) as error:
            load_sae(source)
        assert_one_sentence(str(error.value))


def test_unresolvable_sources_give_one_sentence(hub_cache):
    hub_cache(GEMMA_REPO, folder_files(FIXTURES / "gemma_scope", GEMMA_PATH))
    for source, message in (
        ("gemma-scope-2b-pt-res-canonical:layer_3/width_16k/canonical", "no installed sae-lens"),
        ("hf:google/gemma-scope-9b-pt-res/layer_3", "Cannot get"),
        (f"hf:{GEMMA_REPO}/layer_4/width_16k/average_l0_5", "has no folder 'layer_4"),
        ("hf:google", "names no repository"),
    ):
        with pytest.raises(SaelabError, match=message) as error:
            load_sae(source)
        assert_one_sentence(str(error.value))


def test_existing_paths_win_over_source_syntax(tmp_path, monkeypatch):
    copy_fixture("gemma_scope", tmp_path / "odd:name")
    monkeypatch.chdir(tmp_path)
    assert_matches_fixture(load_sae("odd:name"), "gemma_scope")
    assert published.resolve_sae_source(Path("hf:x")) == Path("hf:x")
