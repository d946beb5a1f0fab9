"""SAELens folders: read SAELens' own saves (fixtures made by scripts/saelens_fixtures.py with sae-lens 6.54.12),
write them back, and round-trip saelab SAEs. Offline; SAELens itself is not imported here."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saelab.config import SAEConfig
from saelab.errors import SaelabError
from saelab.sae.choice import ChoiceConfig
from saelab.sae.io import load_sae, save_sae
from saelab.sae.jumprelu import JumpReLUConfig
from saelab.sae.registry import ARCHITECTURES
from saelab.sae.relu import L1Config
from saelab.sae.saelens import load_saelens, save_saelens
from saelab.sae.thresholds import ThresholdConfig
from saelab.sae.topk import TopKConfig

FIXTURES = Path(__file__).parent / "fixtures" / "saelens"
# fixture -> (saelab architecture it must load as, atol): exact up to float rounding.
CASES = {
    "standard": ("relu", 1e-5),
    "standard_layer_norm": ("relu", 1e-5),
    "topk": ("topk", 1e-5),
    "topk_plain": ("topk", 1e-5),
    "abstopk": ("abstopk", 1e-5),
    "jumprelu": ("jumprelu", 1e-5),
    "batchtopk": ("batchtopk", 1e-5),
    "batchtopk_checkpoint": ("batchtopk", 1e-5),
}


def fixture_params():
    return [pytest.param(name, arch, atol, id=name) for name, (arch, atol) in CASES.items()]


def io(name):
    return load_file(str(FIXTURES / name / "io.safetensors"))


def weights(name):
    return load_file(str(FIXTURES / name / "sae_weights.safetensors"))


def cfg(folder):
    return json.loads((Path(folder) / "cfg.json").read_text())


# -- SAELens -> saelab ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,arch,atol", fixture_params())
def test_loads_saelens_fixture_with_saelens_outputs(name, arch, atol):
    sae = load_sae(FIXTURES / name)
    assert sae.architecture == arch
    ref = io(name)
    with torch.no_grad():
        acts = sae.encode(ref["x"])
        out = sae(ref["x"])
    torch.testing.assert_close(acts, ref["feature_acts"], atol=atol, rtol=0)
    torch.testing.assert_close(out, ref["sae_out"], atol=atol, rtol=0)
    assert (acts != 0).sum(dim=1).tolist() == (ref["feature_acts"] != 0).sum(dim=1).tolist()
    assert sae.metadata["hook"] == "blocks.3.hook_resid_post" and sae.metadata["model"] == "gpt2"
    assert sae.metadata["saelens_metadata"]["context_size"] == 128


def test_fixtures_exercise_the_conventions():
    """The fixtures are only evidence if getting a convention wrong would change their outputs."""
    # topk: SAELens selects by hidden_pre * ||d_i|| (rescale_acts_by_decoder_norm), not by hidden_pre.
    w, ref = weights("topk"), io("topk")
    z = (ref["x"] - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    plain_support = torch.zeros_like(z, dtype=torch.bool).scatter(1, z.topk(4, dim=1).indices, True)
    assert not torch.equal(plain_support, ref["feature_acts"] != 0)
    # topk_plain: apply_b_dec_to_input is False, so subtracting b_dec would change the code.
    w, ref = weights("topk_plain"), io("topk_plain")
    z_with = (ref["x"] - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    assert not torch.allclose(z_with.topk(4, dim=1).values.relu(), ref["feature_acts"].topk(4, dim=1).values)
    # jumprelu: thresholds zero some positive pre-activations, and negative thresholds act as 0 (SAELens' ReLU).
    w, ref = weights("jumprelu"), io("jumprelu")
    z = (ref["x"] - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    t = w["threshold"]
    assert ((z > 0) & (z <= t)).any()
    assert ((z > t) & (z <= 0)).any()
    assert not torch.allclose(z * (z > t), ref["feature_acts"])
    # abstopk: some kept codes are negative.
    assert (io("abstopk")["feature_acts"] < 0).any()
    # batchtopk: saved by SAELens as jumprelu with one threshold; the checkpoint keeps its own architecture.
    assert cfg(FIXTURES / "batchtopk")["architecture"] == "jumprelu"
    assert cfg(FIXTURES / "batchtopk")["metadata"]["training_architecture"] == "batchtopk"
    assert cfg(FIXTURES / "batchtopk_checkpoint")["architecture"] == "batchtopk"
    thresholds = weights("batchtopk")["threshold"]
    assert torch.all(thresholds == thresholds[0])


def test_topk_rescale_is_folded_into_the_weights():
    sae = load_saelens(FIXTURES / "topk")
    raw = weights("topk")
    norms = raw["W_dec"].norm(dim=1)
    assert sae.topk_cfg.rescale_by_decoder_norm is False
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(16))
    torch.testing.assert_close(sae.W_enc, raw["W_enc"] * norms)
    torch.testing.assert_close(sae.b_enc, raw["b_enc"] * norms)
    assert sae.cfg.k == 4 and sae.cfg.pre_enc_bias is True and sae.cfg.input_norm == "none"
    assert load_saelens(FIXTURES / "topk_plain").cfg.pre_enc_bias is False


def test_jumprelu_threshold_maps_to_log_threshold():
    sae = load_saelens(FIXTURES / "jumprelu")
    t = weights("jumprelu")["threshold"]
    torch.testing.assert_close(sae.log_threshold.exp(), t.clamp_min(0))
    assert torch.isneginf(sae.log_threshold[t <= 0]).all()


def test_batchtopk_saves_load_as_batchtopk_with_the_scalar_threshold():
    for name in ("batchtopk", "batchtopk_checkpoint"):
        sae = load_saelens(FIXTURES / name)
        assert sae.threshold.shape == () and float(sae.threshold) == pytest.approx(0.35)
        assert sae.cfg.k == 4


def test_pre_6_config_is_upgraded(tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(FIXTURES / "topk_plain", folder)
    new = cfg(folder)
    old = {"d_in": 8, "d_sae": 16, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
           "normalize_activations": False, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4},
           "hook_point": "blocks.3.hook_resid_post", "model_name": "gpt2", "context_size": 128}
    assert new["k"] == 4 and new["rescale_acts_by_decoder_norm"] is False
    (folder / "cfg.json").write_text(json.dumps(old))
    sae = load_sae(folder)
    ref = io("topk_plain")
    torch.testing.assert_close(sae(ref["x"]), ref["sae_out"], atol=1e-5, rtol=0)
    assert sae.metadata["hook"] == "blocks.3.hook_resid_post"


@pytest.mark.parametrize(
    "norm,message",
    [
        ("expected_average_only_in", "norm scaling factor"),
        ("constant_norm_rescale", "every token to norm"),
        ("covariance_whitening", "whitening"),
    ],
)
def test_unsupported_normalisations_are_refused(tmp_path, norm, message):
    folder = tmp_path / "sae"
    shutil.copytree(FIXTURES / "topk", folder)
    config = cfg(folder)
    config["normalize_activations"] = norm
    (folder / "cfg.json").write_text(json.dumps(config))
    with pytest.raises(SaelabError, match=message):
        load_sae(folder)


def test_unknown_architecture_and_bad_shapes_are_refused(tmp_path):
    folder = tmp_path / "sae"
    shutil.copytree(FIXTURES / "topk", folder)
    config = cfg(folder)
    (folder / "cfg.json").write_text(json.dumps({**config, "architecture": "gated"}))
    with pytest.raises(SaelabError, match="architecture 'gated'"):
        load_sae(folder)
    (folder / "cfg.json").write_text(json.dumps({**config, "d_sae": 32}))
    with pytest.raises(SaelabError, match="shape"):
        load_sae(folder)


# -- saelab -> SAELens ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,arch,atol", fixture_params())
def test_save_then_load_round_trips_exactly(tmp_path, name, arch, atol):
    sae = load_sae(FIXTURES / name)
    save_saelens(sae, tmp_path / "out")
    again = load_sae(tmp_path / "out")
    assert again.architecture == sae.architecture
    assert again.cfg == sae.cfg and again.options == sae.options
    if name == "batchtopk_checkpoint":  # written in SAELens' inference form (jumprelu), as SAELens does
        assert again.metadata.pop("saelens_architecture") == "jumprelu"
        assert sae.metadata.pop("saelens_architecture") == "batchtopk"
    assert again.metadata == sae.metadata
    # Exactly the folded copy that save_saelens writes (relu and jumprelu fold decoder norms, as save_sae does).
    state, state_again = copy.deepcopy(sae).fold().state_dict(), again.state_dict()
    assert state.keys() == state_again.keys()
    # Bit-exact except where a float32 map is undone: exp/log of the JumpReLU threshold, layer_norm's c factor.
    inexact = {"log_threshold"} | ({"W_enc", "W_dec", "b_dec"} if name == "standard_layer_norm" else set())
    for key in state:
        if key in inexact:
            torch.testing.assert_close(state_again[key], state[key], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(state[key], state_again[key]), key
    x = io(name)["x"]
    with torch.no_grad():
        torch.testing.assert_close(again(x), sae(x), atol=1e-5, rtol=0)
    # what SAELens needs: the same top-level fields as SAELens' own save of this architecture
    written, theirs = cfg(tmp_path / "out"), cfg(FIXTURES / name)
    if name != "batchtopk_checkpoint":  # a training checkpoint has training fields; we write the inference form
        assert set(written) == set(theirs)
        assert written["architecture"] == theirs["architecture"]
    assert set(load_file(str(tmp_path / "out" / "sae_weights.safetensors"))) >= {"W_enc", "b_enc", "W_dec", "b_dec"}


def make(arch, seed=0, **sae_kw):
    """A saelab SAE with non-trivial weights (decoder norms in [0.5, 2], non-zero biases) and input_scale 2.5."""
    options = {"topk": TopKConfig(rescale_by_decoder_norm=True), "l1": L1Config(), "jumprelu": JumpReLUConfig()}
    if arch == "choice":
        options["choice"] = ChoiceConfig(choice_mode=sae_kw.pop("choice_mode"))
    if arch == "threshold":  # t = lambda * gamma = 0.1
        options["threshold"] = ThresholdConfig(threshold_family=sae_kw.pop("family"), threshold_lambda=10.0)
    torch.manual_seed(seed)
    sae = ARCHITECTURES[arch](8, SAEConfig(architecture=arch, d_sae=16, k=4, **sae_kw), options,
                              {"hook": "blocks.1.hook_resid_post", "model": "tiny-native", "run": "r1"})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(8, 16, generator=g) * 0.5)
        sae.W_dec.copy_(torch.randn(16, 8, generator=g))
        sae.W_dec *= (0.5 + 1.5 * torch.rand(16, 1, generator=g)) / sae.W_dec.norm(dim=1, keepdim=True)
        sae.b_enc.copy_(torch.randn(16, generator=g) * 0.3)
        sae.b_dec.copy_(torch.randn(8, generator=g) * 0.3)
        if sae.cfg.input_norm == "constant":
            sae.input_scale.fill_(2.5)
        if arch == "jumprelu":
            sae.log_threshold.copy_((torch.rand(16, generator=g) * 0.5 + 0.05).log())
        if arch in ("batchtopk", "choice"):
            sae.threshold.copy_(torch.rand(sae.threshold.shape, generator=g) * 0.4 + 0.1)
    return sae


NATIVE = [
    ("topk", {}),
    ("topk", {"pre_enc_bias": False, "input_norm": "none"}),
    ("topk", {"input_norm": "layernorm"}),
    ("gsae", {}),
    ("abstopk", {}),
    ("relu", {}),
    ("jumprelu", {}),
    ("batchtopk", {}),
    ("choice", {"choice_mode": "mutual"}),
    ("choice", {"choice_mode": "feature"}),
    ("threshold", {"family": "soft"}),
    ("threshold", {"family": "hard"}),
]


@pytest.mark.parametrize("arch,kw", [pytest.param(a, kw, id=f"{a}-{i}") for i, (a, kw) in enumerate(NATIVE)])
def test_saelab_sae_survives_the_trip_through_saelens_format(tmp_path, arch, kw):
    sae = make(arch, **dict(kw))
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(5)) * 0.6 + 0.2
    save_saelens(sae, tmp_path / "sl")
    back = load_sae(tmp_path / "sl")
    with torch.no_grad():
        ref = copy.deepcopy(sae).fold()
        # Codes: SAELens' are the folded copy's, times ||d_i|| where the top-k family's rescale was folded in.
        topk_rescaled = arch in ("topk", "gsae", "abstopk") and ref.topk_cfg.rescale_by_decoder_norm
        scale = ref.W_dec.norm(dim=1) if topk_rescaled else torch.ones(16)
        torch.testing.assert_close(back.encode(x), ref.encode(x) * scale, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(back(x), sae(x), atol=1e-5, rtol=1e-5)
        assert ((back.encode(x) != 0) == (sae.encode(x) != 0)).all()
    assert back.metadata["hook"] == "blocks.1.hook_resid_post" and back.metadata["run"] == "r1"
    config = cfg(tmp_path / "sl")
    expected_arch = {"relu": "standard", "gsae": "topk", "batchtopk": "jumprelu", "choice": "jumprelu",
                     "threshold": "standard" if kw.get("family") == "soft" else "jumprelu"}
    assert config["architecture"] == expected_arch.get(arch, arch)
    assert config["d_in"] == 8 and config["d_sae"] == 16 and config["dtype"] == "float32"
    assert config["apply_b_dec_to_input"] == sae.cfg.pre_enc_bias
    assert config["normalize_activations"] == ("layer_norm" if sae.cfg.input_norm == "layernorm" else "none")
    assert config["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    assert config["metadata"]["model_name"] == "tiny-native"
    assert config["metadata"]["sae_lens_version"].startswith("6.")
    if config["architecture"] in ("topk", "abstopk"):
        assert config["k"] == 4 and config["rescale_acts_by_decoder_norm"] is False
    if arch == "batchtopk":
        assert back.architecture == "batchtopk" and config["metadata"]["training_architecture"] == "batchtopk"


def test_writes_hook_z_reshaping_and_keeps_the_original_untouched(tmp_path):
    sae = make("topk")
    sae.metadata["hook"] = "blocks.0.attn.hook_z"
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    save_saelens(sae, tmp_path / "z")
    assert cfg(tmp_path / "z")["reshape_activations"] == "hook_z"
    for key, value in sae.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("arch, family", [("threshold", "half"), ("threshold", "lq"), ("threshold", "cel0"),
                                          ("topafa", None)])
def test_unrepresentable_architectures_are_refused(tmp_path, arch, family):
    options = {"threshold": ThresholdConfig(threshold_family=family)} if family else {}
    sae = ARCHITECTURES[arch](8, SAEConfig(architecture=arch, d_sae=16, k=4), options)
    with pytest.raises(SaelabError, match="cannot be saved in SAELens format"):
        save_saelens(sae, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_saelab_folder_is_not_mistaken_for_saelens(tmp_path):
    sae = make("topk")
    save_sae(sae, tmp_path / "native")
    assert not (tmp_path / "native" / "sae_weights.safetensors").exists()
    torch.testing.assert_close(load_sae(tmp_path / "native")(torch.ones(2, 8)), sae(torch.ones(2, 8)))
