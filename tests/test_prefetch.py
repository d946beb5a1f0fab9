import itertools
import json
import threading
import time
import traceback

import pytest
import torch

from saelab.activations import ActivationBatch, ActivationCache, build_cache
from saelab.config import DataConfig, HarvestConfig, ModelConfig, SAEConfig, TrainConfig
from saelab.errors import SaelabError
from saelab.train.command import TrainCommand
from saelab.train.stream import CacheStream, Prefetcher
from saelab.train.trainer import Trainer

HOOKS = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_z"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_model, cache_config):
    config = cache_config(tmp_path_factory.mktemp("prefetch-cache"), with_grads=True)
    return build_cache(config, model=tiny_model, progress=False)


def synthetic_batches(count=None, tokens=64, seed=0):
    """Endless (or `count`) batches with acts at two hooks and grads; batch i's acts start at value i."""
    generator = torch.Generator().manual_seed(seed)
    for i in itertools.count() if count is None else range(count):
        acts = {hook: torch.randn(tokens, 48, generator=generator) + i for hook in HOOKS}
        yield ActivationBatch(acts=acts, token_ids=torch.arange(tokens), context=torch.full((tokens,), i),
                              position=torch.arange(tokens),
                              grads={hook: torch.randn(tokens, 48, generator=generator) for hook in HOOKS})


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for mine, theirs in zip(got, expected):
        mine, theirs = mine.to_tensors(), theirs.to_tensors()
        assert mine.keys() == theirs.keys()
        for name in theirs:
            assert torch.equal(mine[name].cpu(), theirs[name]), name


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "saelab-prefetch"]


@pytest.mark.parametrize("start_step", [0, 5])
def test_prefetched_cache_batches_equal_the_plain_ones_in_order(cache, start_step):
    stream = CacheStream(cache, HOOKS, batch_size=128, seed=3, grads=True)
    count = 3 * stream.steps_per_epoch + 2  # across epoch boundaries
    expected = list(itertools.islice(stream.batches(start_step), count))
    with Prefetcher(stream.batches(start_step), "cpu", depth=3) as batches:
        got = list(itertools.islice(batches, count))
    assert_same_batches(got, expected)
    assert got[0].grads is not None and set(got[0].acts) == set(HOOKS)


def test_a_finite_iterator_ends_the_iteration():
    with Prefetcher(synthetic_batches(5), "cpu") as batches:
        assert_same_batches(list(batches), list(synthetic_batches(5)))
        assert next(batches, None) is None


def test_an_error_in_the_worker_reaches_the_consumer_with_its_traceback():
    def failing_batches():
        yield from synthetic_batches(3)
        raise ValueError("shard 7 is unreadable")

    with Prefetcher(failing_batches(), "cpu") as batches:
        assert len([next(batches) for _ in range(3)]) == 3
        with pytest.raises(ValueError, match="shard 7 is unreadable") as caught:
            next(batches)
    assert "failing_batches" in [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]


def test_closing_early_stops_the_worker_and_closes_the_underlying_iterator():
    closed = threading.Event()

    def endless():
        try:
            yield from synthetic_batches()
        finally:
            closed.set()

    batches = Prefetcher(endless(), "cpu", depth=1)
    next(batches)
    time.sleep(0.2)  # the worker now waits on the full queue
    batches.close()
    assert closed.is_set() and not prefetch_threads()
    assert next(batches, None) is None


def test_leaving_the_with_block_by_an_exception_stops_the_worker(cache):
    stream = CacheStream(cache, HOOKS, batch_size=128, seed=0, grads=False)
    with pytest.raises(KeyboardInterrupt), Prefetcher(stream.batches(), "cpu") as batches:
        for step, _ in enumerate(batches):
            if step == 4:
                raise KeyboardInterrupt
    deadline = time.perf_counter() + 10.0  # the worker notices the stop within one 50 ms queue poll
    while prefetch_threads() and time.perf_counter() < deadline:
        time.sleep(0.01)
    assert not prefetch_threads()


def test_wait_seconds_counts_the_time_the_consumer_waited(monkeypatch):
    """A fake clock that advances one unit per reading: each next() (4 batches, then the end) waits exactly 1."""
    import saelab.train.stream as stream_module

    clock = itertools.count()
    monkeypatch.setattr(stream_module.time, "perf_counter", lambda: float(next(clock)))
    with Prefetcher(synthetic_batches(4), "cpu") as batches:
        list(batches)
    assert batches.wait_seconds == 5.0


def test_depth_below_one_is_refused():
    with pytest.raises(SaelabError, match="at least 1 batch"):
        Prefetcher(synthetic_batches(1), "cpu", depth=0)


def test_training_logs_the_share_of_time_spent_waiting_for_data(tmp_path, cache, monkeypatch, one_thread):
    original = ActivationCache.read

    def slow_read(self, index, hooks=None, grads=False):
        time.sleep(0.15)  # far slower than a step of this tiny SAE: the loop mostly waits
        return original(self, index, hooks, grads)

    monkeypatch.setattr(ActivationCache, "read", slow_read)
    train = TrainConfig(cache=str(cache.path), out=str(tmp_path / "run"), train_tokens=128 * 12, batch_size=128,
                        log_every=3, init_tokens=512)
    cmd = TrainCommand(model=ModelConfig(model="tiny-native"), data=DataConfig(context_length=32),
                       harvest=HarvestConfig(hooks=HOOKS[:1]), train=train, sae=SAEConfig(k=4, expansion=2))
    Trainer(cmd, progress=False).fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 3, 6, 9, 11]
    assert all(0 <= r["data_wait"] <= 1 for r in records)
    assert min(r["data_wait"] for r in records) > 0.4
    assert not prefetch_threads()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_batches_arrive_on_the_device_equal_to_the_cpu_ones():
    device = torch.device("cuda")
    expected = list(synthetic_batches(20, tokens=8192))
    with Prefetcher(synthetic_batches(20, tokens=8192), device, depth=2) as batches:
        got = []
        for batch in batches:
            assert all(t.device.type == "cuda" for t in (*batch.acts.values(), *batch.grads.values()))
            assert batch.token_ids.device.type == "cpu"
            batch.acts[HOOKS[0]].mul_(1.0)  # consumer-stream work on the copy, as a training step would do
            got.append(batch)
    torch.cuda.synchronize()
    assert_same_batches(got, expected)


def test_data_wait_is_the_share_of_each_log_interval_spent_waiting(monkeypatch):
    """A fake clock: every step takes 2 s, of which the feed reports 0.5 s waited (steps 0-3), then 1.5 s."""
    import saelab.train.log as log_module
    from saelab.train.log import TrainingLog

    now = [0.0]
    monkeypatch.setattr(log_module.time, "perf_counter", lambda: now[0])
    shares, waited = [], 0.0
    with TrainingLog(None, None, total_steps=7, start_step=0, log_every=3, batch_size=1, n_runs=1,
                     progress=False) as log:
        for step, wait in enumerate([0.5] * 4 + [1.5] * 3):
            now[0] += 2.0
            waited += wait
            log.begin_step(step, waited)
            if log.is_log_step(step):
                shares.append(log.data_wait)
    assert shares == [0.25, 0.25, 0.75]  # steps 0, 3 and the last (6): 0.5/2, 1.5/6, 4.5/6
