import argparse
import dataclasses
import json
import typing

import pytest

from saelab import config as config_module
from saelab.cli import build_parser, main

SMALL = ["--model", "tiny-native", "--context-length", "32", "--n-tokens", "256", "--shard-tokens", "128", "--quiet"]
TINY = [*SMALL, "--hooks", "blocks.1.hook_resid_post"]


def test_cache_then_info(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["cache", *TINY, "--hooks", "blocks.1.hook_resid_post", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "activation cache" in printed and "blocks.1.hook_resid_post  d=64" in printed
    assert main(["info", str(out), "--verify"]) == 0
    assert "all 2 shards OK" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["harvest"]["hooks"] == ["blocks.1.hook_resid_post"]  # the full config is saved


def test_config_file_drives_the_cache(tmp_path, capsys):
    config = tmp_path / "cache.yaml"
    config.write_text(f"harvest:\n  hooks: [blocks.0.hook_mlp_out]\ncache:\n  out: {tmp_path / 'c'}\n")
    assert main(["cache", *SMALL, "--config", str(config)]) == 0
    assert "blocks.0.hook_mlp_out" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["cache", *TINY, "--hooks", "blocks.1.hook_resid_pst"], "Did you mean: blocks.1.hook_resid_post"),
        (["cache", "--model", "no-such-model", "--quiet"], "Unknown model 'no-such-model'"),
        (["cache", *TINY, "--storage-dtype", "float8"], "--storage-dtype is one of float32, bfloat16, float16; got 'float8'"),
        (["cache", *TINY, "--corpus", "/nonexistent/corpus.txt"], "Could not open corpus"),
        (["info", "/nonexistent/cache"], "is not a saelab activation cache"),
        (["eval", "--sae", "x", "--skip-positions", "128"], "leaves nothing of a 128-token context"),
        (["cache", *TINY, "--context-length", "100000"], "longer than the model's context window (512 tokens)"),
    ],
)
def test_bad_input_is_one_sentence_not_a_traceback(tmp_path, capsys, argv, message):
    argv = argv + (["--out", str(tmp_path / "c")] if argv[0] == "cache" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.startswith("saelab: error:")


def test_hooks_lists_names_with_widths(capsys):
    assert main(["hooks", "--model", "tiny-native", "--filter", "blocks.1.attn.hook_z", "--dims"]) == 0
    assert capsys.readouterr().out.strip() == "blocks.1.attn.hook_z  d=64"


def test_train_builds_the_cache_then_trains_and_saves(tmp_path, capsys):
    argv = ["train", "--model", "tiny-native", "--hooks", "blocks.1.hook_resid_post", "--context-length", "32",
            "--cache", str(tmp_path / "c"), "--cache-tokens", "4096", "--train-tokens", "4096",
            "--batch-size", "256", "--init-tokens", "1024", "--expansion", "2", "--out", str(tmp_path / "r"), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"saved SAE: {tmp_path / 'r' / 'blocks.1.hook_resid_post'}" in printed
    assert (tmp_path / "c" / "manifest.json").is_file()
    assert main(argv) == 2  # a second run into the same --out refuses instead of overwriting
    assert "Pass --resume" in capsys.readouterr().err
    assert main([*argv, "--architecture", "nonesuch", "--out", str(tmp_path / "r2")]) == 2
    assert "Unknown SAE architecture 'nonesuch'. Known architectures:" in capsys.readouterr().err


def bad_values(tp: type, checks: dict) -> list[str]:
    """Values the option's type or checks must refuse."""
    values = []
    if tp in (int, float):
        values += ["abc"] + (["1.5"] if tp is int else ["nan", "inf"])
        if "min" in checks:
            values.append(str(checks["min"] - 1))
        if "max" in checks:
            values.append(str(checks["max"] + 1))
        if "above" in checks:
            values.append(str(checks["above"]))
    if "choices" in checks:
        values.append("banana")
    if checks.get("check") is config_module.check_device:
        values += ["banana", "cuda:notanumber"]
    if checks.get("check") is config_module.check_folder:
        values.append(__file__)  # a file where a folder is wanted
    return values


def fuzz_cases() -> list[tuple[str, str, str]]:
    """(subcommand, flag, bad value) for every option of every subcommand whose flags come from its config."""
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    cases = []
    for name, parser in subparsers.choices.items():
        command_cls = parser.get_default("command_cls")
        for section in dataclasses.fields(command_cls) if command_cls else []:
            section_cls = typing.get_type_hints(command_cls)[section.name]
            hints = typing.get_type_hints(section_cls)
            for f in dataclasses.fields(section_cls):
                checks = {k: v for k, v in f.metadata.items() if k in config_module._CHECKS}
                for value in bad_values(hints[f.name], checks):
                    cases.append((name, "--" + f.name.replace("_", "-"), value))
    return cases


CASES = fuzz_cases()


def test_the_fuzz_covers_every_subcommand_with_many_options():
    assert {name for name, _, _ in CASES} >= {"cache", "train", "eval", "dead", "darkmatter", "dashboard", "steer"}
    assert len(CASES) > 200


@pytest.mark.parametrize(("command", "flag", "value"), CASES, ids=[" ".join(c) for c in CASES])
def test_every_bad_option_value_is_one_line_and_exit_2(command, flag, value, capsys):
    assert main([command, flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("saelab: error:") and err.count("\n") == 1 and "Traceback" not in err, err
