"""--device and --precision: checked where parsed, honoured by single-process training."""

import pytest
import torch

from saelab.config import DarkMatterConfig, ModelConfig, from_dict
from saelab.devices import autocast_dtype, check_device
from saelab.errors import SaelabError
from saelab.train.command import TrainCommand
from saelab.train.distributed import launch


@pytest.mark.parametrize("name", ["banana", "cuda:x", "tpu"])
def test_unknown_devices_get_one_sentence(name):
    with pytest.raises(SaelabError, match="--device"):
        check_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_refused_where_the_config_is_built():
    with pytest.raises(SaelabError, match="no usable CUDA device"):
        ModelConfig(device="cuda")
    with pytest.raises(SaelabError, match="no usable CUDA device"):
        DarkMatterConfig(device="cuda:0")


def test_single_process_training_runs_on_the_model_device():
    world = launch(TrainCommand().train, "cpu")
    assert world.size == 1 and world.device == torch.device("cpu")


def test_precision_defaults_per_device_and_rejects_unknown_values(monkeypatch):
    import saelab.devices

    for units, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(saelab.devices, "cpu_has_bf16_units", lambda units=units: units)
        assert autocast_dtype("auto", torch.device("cpu")) is expected
        assert autocast_dtype("fp32", torch.device("cpu")) is None
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert autocast_dtype("fp32", torch.device("cuda")) is None
    with pytest.raises(SaelabError, match="--precision is one of auto, bf16, fp32"):
        from_dict(TrainCommand, {"train": {"precision": "fp8"}})


def _train_topk(autocast):
    from helpers import planted_toy

    from saelab.config import SAEConfig
    from saelab.sae.base import StepContext
    from saelab.sae.registry import create_sae
    from saelab.synthetic import mmcs
    from saelab.train.step import train_step

    data = planted_toy()
    torch.manual_seed(1)
    sae = create_sae(32, SAEConfig(architecture="topk", d_sae=192, target_l0=3, input_norm="none"))
    sae.initialize_from_data(data.sample(4096))
    optimizer = torch.optim.Adam(sae.parameters(), lr=2e-3)
    for _ in range(400):
        train_step(sae, optimizer, data.sample(512), StepContext(), 1.0, autocast=autocast)
    x = data.sample(4096)
    with torch.no_grad():
        fvu = float((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    return sae, fvu, mmcs(sae.W_dec, data.dictionary)


def test_bf16_training_keeps_float32_state_and_matches_float32_quality():
    """--precision bf16 on the CPU path: weights and Adam state stay float32, and a planted dictionary is
    recovered as well as in float32 (FVU within 5%, MMCS within 0.01)."""
    _, fvu32, mmcs32 = _train_topk(None)
    sae, fvu16, mmcs16 = _train_topk(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    assert abs(fvu16 - fvu32) <= 0.05 * fvu32, (fvu16, fvu32)
    assert abs(mmcs16 - mmcs32) <= 0.01 and mmcs16 > 0.95, (mmcs16, mmcs32)


def test_a_cpu_command_on_a_machine_with_a_gpu_says_how_to_use_it(monkeypatch, tmp_path, capsys):
    """`--device cpu` (the default) where CUDA is available: one note on stderr naming --device cuda; none on a
    machine without a GPU. `saelab dead` (no device option) never notes."""
    from saelab import cli
    from saelab.devices import idle_gpu_note

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Test GPU")
    assert "pass --device cuda" in idle_gpu_note(["cpu"]) and "Test GPU" in idle_gpu_note(["cpu", "cpu"])
    assert idle_gpu_note(["cuda"]) is None and idle_gpu_note([]) is None
    assert cli.main(["dead", "--sae", str(tmp_path / "missing")]) == 2  # DeadCommand has no device: no note
    assert "note:" not in capsys.readouterr().err
    assert cli.main(["cache", "--model", "tiny-native", "--hooks", "blocks.1.hook_resid_pre", "--n-tokens", "64",
                     "--out", str(tmp_path / "c"), "--quiet"]) == 0
    assert capsys.readouterr().err.count("pass --device cuda to run on it") == 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert idle_gpu_note(["cpu"]) is None
