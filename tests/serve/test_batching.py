"""The micro-batcher and the door, with a model-free batch function (exact batch sizes, no timing luck:
the worker is held on an event where the order matters)."""

from __future__ import annotations

import threading
import time

import pytest

from clipfusion.serve.batching import BatcherClosed, Gate, MicroBatcher


class Recorder:
    """``run_batch`` doubling its inputs, recording batch sizes, optionally held until released."""

    def __init__(self, hold_first: bool = False) -> None:
        self.sizes: list[int] = []
        self.release = threading.Event()
        self.started = threading.Event()
        if not hold_first:
            self.release.set()

    def __call__(self, items):
        self.sizes.append(len(items))
        self.started.set()
        assert self.release.wait(10)
        if any(item == "boom" for item in items):
            raise ValueError("boom in this batch")
        return [item * 2 for item in items]


def test_a_burst_is_cut_into_batches_of_at_most_batch_size_in_order():
    run = Recorder()
    batcher = MicroBatcher(run, batch_size=4, max_wait_s=0.5, name="t")
    futures = batcher.submit(list(range(10)))
    assert [f.result(10) for f in futures] == [2 * i for i in range(10)]
    assert run.sizes == [4, 4, 2]
    assert batcher.stats.to_dict()["batches"] == 3
    assert batcher.stats.largest_batch == 4
    batcher.close(5)
    assert not batcher.alive


def test_requests_arriving_while_the_model_is_busy_share_the_next_batches():
    run = Recorder(hold_first=True)
    batcher = MicroBatcher(run, batch_size=4, max_wait_s=0.0, name="t")
    first = batcher.submit([100])
    assert run.started.wait(10)  # the worker holds a batch of one
    futures = []
    threads = [threading.Thread(target=lambda i=i: futures.extend(batcher.submit([i]))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert batcher.queued == 8
    assert batcher.retry_after() >= 1
    run.release.set()
    assert first[0].result(10) == 200
    assert sorted(f.result(10) for f in futures) == [2 * i for i in range(8)]
    assert run.sizes == [1, 4, 4]  # eight clients, two forward passes
    batcher.close(5)


def test_an_image_waits_at_most_max_wait_for_company():
    run = Recorder()
    batcher = MicroBatcher(run, batch_size=8, max_wait_s=0.4, name="t")
    start = time.monotonic()
    one = batcher.submit([1])
    time.sleep(0.05)
    two = batcher.submit([2])
    assert (one[0].result(10), two[0].result(10)) == (2, 4)
    assert run.sizes == [2]  # the second joined the first's batch
    assert time.monotonic() - start < 5  # and nobody waited for a full batch of 8
    batcher.close(5)


def test_a_failing_batch_fails_its_own_items_only():
    run = Recorder(hold_first=True)
    batcher = MicroBatcher(run, batch_size=2, max_wait_s=0.0, name="t")
    bad = batcher.submit(["boom"])
    assert run.started.wait(10)
    good = batcher.submit([3, 4])
    run.release.set()
    with pytest.raises(ValueError, match="boom in this batch"):
        bad[0].result(10)
    assert [f.result(10) for f in good] == [6, 8]
    assert batcher.stats.failed_batches == 1
    batcher.close(5)


def test_close_finishes_the_queue_then_refuses_work():
    run = Recorder(hold_first=True)
    batcher = MicroBatcher(run, batch_size=1, max_wait_s=0.0, name="t")
    held = batcher.submit([1])
    assert run.started.wait(10)
    queued = batcher.submit([2, 3])
    closer = threading.Thread(target=batcher.close, args=(10,))
    closer.start()
    time.sleep(0.05)
    with pytest.raises(BatcherClosed):
        batcher.submit([4])
    run.release.set()
    closer.join(10)
    assert [f.result(0) for f in held + queued] == [2, 4, 6]
    assert not batcher.alive


def test_a_cancelled_item_is_not_computed():
    run = Recorder(hold_first=True)
    batcher = MicroBatcher(run, batch_size=4, max_wait_s=0.0, name="t")
    batcher.submit([1])
    assert run.started.wait(10)
    gone, kept = batcher.submit([5, 6])
    assert gone.cancel()
    run.release.set()
    assert kept.result(10) == 12
    assert run.sizes == [1, 1]
    batcher.close(5)


def test_the_gate_admits_up_to_its_limit_and_counts_refusals():
    gate = Gate(2)
    assert gate.enter() and gate.enter()
    assert not gate.enter()
    gate.leave()
    assert gate.enter()
    assert (gate.inside, gate.admitted, gate.refused) == (2, 3, 1)
    with pytest.raises(ValueError):
        Gate(0)
    with pytest.raises(ValueError):
        MicroBatcher(lambda xs: xs, batch_size=0, max_wait_s=0)
