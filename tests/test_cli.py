import json

import pytest

from saelab.cli import main

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
