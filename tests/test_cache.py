import errno
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from saelab.activations import ActivationCache, ActivationSource, build_cache
from saelab.activations import cache as cache_module
from saelab.config import to_dict
from saelab.data import special_token_ids, token_contexts
from saelab.errors import SaelabError
from saelab.locking import FolderLock


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model, cache_config):
    config = cache_config(tmp_path_factory.mktemp("cache"), with_grads=True)
    return config, build_cache(config, model=tiny_model, progress=False)


def test_write_then_read_is_bit_exact(built, tiny_model):
    config, cache = built
    contexts = list(itertools.islice(token_contexts(config.data, tiny_model.tokenizer), 40))
    source = ActivationSource(tiny_model, config.harvest.hooks, with_grads=True)
    direct = source.batch(torch.stack(contexts))
    stored = cache.read(torch.arange(cache.n_tokens), grads=True)
    specials = torch.isin(torch.stack(contexts), torch.tensor(special_token_ids(tiny_model.tokenizer)))
    assert cache.n_tokens == len(direct) == 40 * 32 - int(specials.sum())  # BOS and separators excluded
    for hook in config.harvest.hooks:
        assert torch.equal(stored.acts[hook], direct.acts[hook])
        assert torch.equal(stored.grads[hook], direct.grads[hook])
    for key in ("token_ids", "context", "position"):
        assert torch.equal(getattr(stored, key).long(), getattr(direct, key))
    assert len(cache.manifest["shards"]) == 5 and cache.d("blocks.0.attn.hook_z") == 64


def test_shuffled_epoch_visits_every_token_once_and_mixes_contexts(built):
    _, cache = built
    batches = list(cache.batches(batch_size=100, seed=3, epoch=0))
    keys = sorted((int(c), int(p)) for b in batches for c, p in zip(b.context, b.position))
    everything = cache.read(torch.arange(cache.n_tokens))
    assert keys == sorted(zip(everything.context.tolist(), everything.position.tolist()))
    assert len(set(keys)) == cache.n_tokens
    assert all(len(set(b.context.tolist())) >= 20 for b in batches[:-1])  # from many contexts and shards
    again = [b.context.tolist() for b in cache.batches(batch_size=100, seed=3, epoch=0)]
    other = [b.context.tolist() for b in cache.batches(batch_size=100, seed=3, epoch=1)]
    assert again == [b.context.tolist() for b in batches] and other != again
    first = batches[0]
    rows = [int(i) for c, p in zip(first.context, first.position)
            for i in ((everything.context == c) & (everything.position == p)).nonzero()[0]]
    assert torch.equal(first.acts["blocks.1.hook_resid_post"], everything.acts["blocks.1.hook_resid_post"][rows])


def test_ranks_read_disjoint_parts_that_cover_the_cache(built):
    _, cache = built
    parts = [[(int(c), int(p)) for b in cache.batches(64, seed=1, rank=r, world_size=2)
              for c, p in zip(b.context, b.position)] for r in (0, 1)]
    assert not set(parts[0]) & set(parts[1])
    assert len(parts[0]) + len(parts[1]) == cache.n_tokens


def test_reading_checks_hooks_and_widths(built):
    _, cache = built
    with pytest.raises(SaelabError, match="no hook 'blocks.0.hook_mlp_out'.*blocks.1.hook_resid_post"):
        cache.read(torch.arange(3), hooks=["blocks.0.hook_mlp_out"])
    with pytest.raises(SaelabError, match="width 64, not 576"):
        cache.require("blocks.1.hook_resid_post", d=576)


def test_bf16_storage_round_trips(tmp_path, tiny_model, cache_config):
    config = cache_config(tmp_path / "bf16", storage_dtype="bfloat16", n_tokens=32 * 10)
    cache = build_cache(config, model=tiny_model, progress=False)
    contexts = torch.stack(list(itertools.islice(token_contexts(config.data, tiny_model.tokenizer), 10)))
    direct = ActivationSource(tiny_model, config.harvest.hooks).batch(contexts)
    stored = cache.read(torch.arange(cache.n_tokens))
    hook = config.harvest.hooks[0]
    assert stored.acts[hook].dtype == torch.bfloat16
    assert torch.equal(stored.acts[hook], direct.acts[hook].to(torch.bfloat16))


def test_corrupted_and_truncated_shards_are_detected(tmp_path, tiny_model, cache_config):
    out = tmp_path / "c"
    build_cache(cache_config(out, n_tokens=32 * 16), model=tiny_model, progress=False)
    shard = out / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-7] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(SaelabError, match="shard_00001.safetensors is corrupt"):
        ActivationCache(out)
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(SaelabError, match="truncated"):
        ActivationCache(out, verify=False)
    shard.write_bytes(bytes(data) + b"x")
    with pytest.raises(SaelabError, match="too long"):
        ActivationCache(out, verify=False)


def test_the_advice_for_damaged_shards_repairs_only_them_to_identical_bytes(tmp_path, tiny_model, cache_config):
    out = tmp_path / "c"
    config = cache_config(out, n_tokens=32 * 40)  # 5 shards of 8 contexts
    n_tokens = build_cache(config, model=tiny_model, progress=False).n_tokens
    shards = sorted(out.glob("shard_*.safetensors"))
    original = {shard.name: shard.read_bytes() for shard in shards}
    assert len(shards) >= 3
    damaged = bytearray(original[shards[0].name])
    damaged[-7] ^= 0xFF
    shards[0].write_bytes(bytes(damaged))  # corrupt
    shards[1].write_bytes(original[shards[1].name] + b"extra")  # too long
    shards[2].unlink()  # missing
    with pytest.raises(SaelabError, match="corrupt.*--overwrite added: only the bad shards"):
        ActivationCache(out)
    untouched = {shard.name: shard.stat().st_mtime_ns for shard in shards[3:]}
    config.cache.overwrite = True
    repaired = build_cache(config, model=tiny_model, progress=False)
    assert {shard.name: shard.read_bytes() for shard in sorted(out.glob("shard_*"))} == original
    assert {shard.name: shard.stat().st_mtime_ns for shard in shards[3:]} == untouched  # not rewritten
    assert repaired.n_tokens == n_tokens


def test_a_corrupt_manifest_is_rebuilt_with_overwrite(tmp_path, tiny_model, cache_config):
    out = tmp_path / "c"
    config = cache_config(out, n_tokens=32 * 8)
    n_tokens = build_cache(config, model=tiny_model, progress=False).n_tokens
    original = {shard.name: shard.read_bytes() for shard in out.glob("shard_*")}
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(SaelabError, match="manifest.json is corrupt.*--overwrite added"):
        ActivationCache(out)
    config.cache.overwrite = True
    assert build_cache(config, model=tiny_model, progress=False).n_tokens == n_tokens
    assert {shard.name: shard.read_bytes() for shard in out.glob("shard_*")} == original


def test_a_cache_whose_first_shard_never_came_is_replaced_by_other_settings(tmp_path, tiny_model, cache_config):
    out = tmp_path / "c"
    with pytest.raises(SaelabError):
        build_cache(cache_config(out, corpus="/no/such/corpus.txt"), model=tiny_model, progress=False)
    assert build_cache(cache_config(out, n_tokens=32 * 4), model=tiny_model, progress=False).n_tokens > 0


def test_cache_from_other_settings_is_refused_then_overwritten(tmp_path, tiny_model, cache_config):
    out = tmp_path / "c"
    build_cache(cache_config(out, n_tokens=32 * 8), model=tiny_model, progress=False)
    other = cache_config(out, n_tokens=32 * 8, hooks=["blocks.0.hook_mlp_out"], storage_dtype="float16")
    with pytest.raises(SaelabError, match="hooks: cache has.*storage_dtype: cache has 'float32'"):
        build_cache(other, model=tiny_model, progress=False)
    other.cache.overwrite = True
    assert build_cache(other, model=tiny_model, progress=False).hooks == ["blocks.0.hook_mlp_out"]
    (tmp_path / "stranger").mkdir()
    (tmp_path / "stranger" / "notes.txt").write_text("mine")
    with pytest.raises(SaelabError, match="not a saelab cache"):
        build_cache(cache_config(tmp_path / "stranger"), model=tiny_model, progress=False)


def test_nan_in_activations_stops_before_writing(tmp_path, tiny_model, monkeypatch, cache_config):
    out = tmp_path / "c"
    original = ActivationSource.batch
    calls = itertools.count()

    def poisoned(self, tokens, first_context=0):
        batch = original(self, tokens, first_context)
        if next(calls) == 1:  # one forward pass per shard: this is shard 1 (contexts 8-15)
            batch.acts["blocks.1.hook_resid_post"][5, 2] = float("nan")
        return batch

    monkeypatch.setattr(ActivationSource, "batch", poisoned)
    with pytest.raises(SaelabError, match=r"NaN/Inf in 'acts:blocks.1.hook_resid_post' for context 8, position 6 \(shard 1\)"):
        build_cache(cache_config(out), model=tiny_model, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["shard_00000.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard_00000.safetensors"]


def test_float16_overflow_is_caught(tmp_path, tiny_model, monkeypatch, cache_config):
    original = ActivationSource.batch

    def huge(self, tokens, first_context=0):
        batch = original(self, tokens, first_context)
        batch.acts["blocks.0.attn.hook_z"][0, 0] = 1e6  # fine in fp32, inf in fp16
        return batch

    monkeypatch.setattr(ActivationSource, "batch", huge)
    with pytest.raises(SaelabError, match="NaN/Inf.*float16"):
        build_cache(cache_config(tmp_path / "c", storage_dtype="float16"), model=tiny_model, progress=False)


def test_full_disk_keeps_finished_shards_and_resumes(tmp_path, tiny_model, monkeypatch, cache_config):
    out = tmp_path / "c"
    config = cache_config(out)
    real_fsync = os.fsync
    fsyncs = itertools.count()

    def fsync(fd):
        if next(fsyncs) == 5:  # manifest, shard 0, manifest, shard 1, manifest, then shard 2 fails
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(cache_module.os, "fsync", fsync)
    with pytest.raises(SaelabError, match="Disk full while writing .*shard_00002.*--storage-dtype bfloat16 halves a cache\\), then rerun the same command"):
        build_cache(config, model=tiny_model, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard_00000.safetensors", "shard_00001.safetensors"]
    monkeypatch.setattr(cache_module.os, "fsync", real_fsync)
    resumed = build_cache(config, model=tiny_model, progress=False)
    reference = build_cache(cache_config(tmp_path / "ref"), model=tiny_model, progress=False)
    assert resumed.manifest["shards"] == reference.manifest["shards"]


def _cli_build(out, config):
    flags = ["--model", "tiny-native", "--context-length", "32", "--hooks", *config.harvest.hooks,
             "--batch-contexts", "1", "--n-tokens", str(config.cache.n_tokens),
             "--shard-tokens", str(config.cache.shard_tokens), "--out", str(out), "--quiet"]
    # A runner that starts the suite in the background (e.g. `cmd &` in a script) makes children ignore SIGINT;
    # restore Python's handler so the interrupt this test sends is the one a user's Ctrl-C would be.
    code = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from saelab.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    return subprocess.Popen([sys.executable, "-c", code, "cache", *flags], stderr=subprocess.PIPE, text=True)


def _wait_for_shards(out, n, process, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if len(json.loads((out / "manifest.json").read_text())["shards"]) >= n:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.01)
    raise AssertionError("cache build made no progress")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_build_resumes_to_identical_bytes(tmp_path, tiny_model, sig, cache_config):
    config = cache_config(tmp_path / "x", n_tokens=32 * 400, shard_tokens=32)
    out = tmp_path / "interrupted"
    process = _cli_build(out, config)
    _wait_for_shards(out, 3, process)
    process.send_signal(sig)
    stderr = process.communicate(timeout=60)[1]
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and 3 <= len(manifest["shards"]) < 400
    if sig == signal.SIGINT:
        assert process.returncode == 130 and "rerun the same command to resume" in stderr
    with pytest.raises(SaelabError, match="incomplete"):
        ActivationCache(out)
    config.cache.out = str(out)
    resumed = build_cache(config, model=tiny_model, progress=False)
    config.cache.out = str(tmp_path / "reference")
    reference = build_cache(config, model=tiny_model, progress=False)
    assert resumed.manifest["shards"] == reference.manifest["shards"]  # same files, sizes and checksums
    for shard in reference.manifest["shards"]:
        assert (out / shard["file"]).read_bytes() == (tmp_path / "reference" / shard["file"]).read_bytes()
    assert not list(out.glob("*.tmp"))
    assert to_dict(config)["cache"]["n_tokens"] == resumed.manifest["identity"]["cache"]["n_tokens"]


def test_a_second_build_into_the_same_folder_is_refused(tmp_path, tiny_model, cache_config):
    out = tmp_path / "c"
    with FolderLock(out), pytest.raises(SaelabError, match="Another saelab process is writing to"):
        build_cache(cache_config(out, n_tokens=32 * 4), model=tiny_model, progress=False)
    assert build_cache(cache_config(out, n_tokens=32 * 4), model=tiny_model, progress=False).n_tokens > 0


def test_nan_in_a_shard_whose_checksum_matches_is_named_when_read(tmp_path, tiny_model, cache_config):
    out = tmp_path / "c"
    build_cache(cache_config(out, n_tokens=32 * 16), model=tiny_model, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    shard = manifest["shards"][1]
    tensors = load_file(out / shard["file"])
    tensors["acts:blocks.1.hook_resid_post"][4, 0] = float("nan")
    data = cache_module.safetensors_bytes(tensors)
    (out / shard["file"]).write_bytes(data)
    shard.update(bytes=len(data), checksum=cache_module.checksum(data))
    (out / "manifest.json").write_text(json.dumps(manifest))
    cache = ActivationCache(out)
    token = manifest["shards"][0]["n_tokens"] + 4
    cache.read(torch.arange(token))  # the tokens before it are fine
    with pytest.raises(SaelabError, match=f"NaN/Inf in 'acts:blocks.1.hook_resid_post' at token {token} \\(shard_00001"):
        cache.read(torch.arange(token + 1).flip(0))
