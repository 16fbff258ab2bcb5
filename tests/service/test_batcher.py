"""The batcher on its own, with a run function the test controls (no HTTP, no ONNX Runtime): the
orderings that are hard to pin down through a live server."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from service.core.batching import (
    HANDED_AHEAD,
    LAG_HALF_LIFE_S,
    MIN_SCALE,
    RESERVATION_S,
    Batcher,
    BatchPolicy,
    InputLayout,
)
from service.errors import DeadlineExceeded, PayloadTooLarge, QueueFull
from service.observability.metrics import ModelMetrics
from service.observability.stats import Stats


def _batcher(run, *, max_batch: int, max_padding_ratio: float = 0.5, variable: bool = False) -> Batcher:
    layout = InputLayout("x", (1,) if variable else (), 0)
    policy = BatchPolicy(max_batch, 0.0, 64, 1, max_padding_ratio)
    return Batcher(run, ["y"], [layout], policy, ModelMetrics("batcher-test", "1", "CPU"), Stats())


def _first_call_blocks(calls: list[list[float]], release: threading.Event):
    """A run function that records each call's rows (their first values) and blocks the first call
    until `release` is set; it answers each row's sum."""

    def run(instance, feeds):
        calls.append([float(v) for v in feeds["x"][:, 0]])
        if len(calls) == 1:
            release.wait(10)
        return [feeds["x"].sum(axis=1, keepdims=True)]

    return run


async def _blocked_batcher(calls: list[list[float]], release: threading.Event
                          ) -> tuple[Batcher, asyncio.Task]:
    """A started batcher of 2-row batches whose instance computes a first one-row request, blocked
    until `release` is set; and that request's task."""
    b = _batcher(_first_call_blocks(calls, release), max_batch=2)
    b.start()
    first = asyncio.create_task(b.submit({"x": np.ones((1, 3), np.float32)}, 1))
    while not calls:  # the first batch is computing, and blocked
        await asyncio.sleep(0.001)
    return b, first


def test_full_batches_are_handed_to_the_busy_instance_before_the_running_batch_ends():
    release = threading.Event()
    calls: list[list[float]] = []

    async def scenario():
        b, first = await _blocked_batcher(calls, release)
        rest = [asyncio.create_task(b.submit({"x": np.full((1, 3), i, np.float32)}, 1))
                for i in range(2 * HANDED_AHEAD + 1)]
        for _ in range(100):
            await asyncio.sleep(0.001)
        # HANDED_AHEAD full batches (2 rows each) now wait at the instance; the last row waits in
        # the queue, where later requests could still join it.
        queued_while_blocked = b.queued_rows
        release.set()
        results = await asyncio.gather(first, *rest)
        await b.close()
        return queued_while_blocked, results

    queued, results = asyncio.run(scenario())
    assert queued == 1
    expected = [3.0] + [3.0 * i for i in range(2 * HANDED_AHEAD + 1)]
    assert [float(r.outputs["y"][0, 0]) for r in results] == expected
    assert [len(c) for c in calls] == [1] + [2] * HANDED_AHEAD + [1]


def test_a_request_whose_deadline_passes_while_handed_ahead_is_shed_not_computed():
    """A full batch handed to a busy instance has left the queue, which sheds late requests: the
    compute thread sheds them instead, and computes the rest of their batch."""
    release = threading.Event()
    calls: list[list[float]] = []

    async def scenario():
        b, first = await _blocked_batcher(calls, release)
        soon = time.perf_counter() + 0.02
        late = asyncio.create_task(b.submit({"x": np.full((1, 3), 5, np.float32)}, 1, soon))
        patient = asyncio.create_task(b.submit({"x": np.full((1, 3), 7, np.float32)}, 1))
        for _ in range(100):  # both handed ahead as one full batch, the deadline passing meanwhile
            await asyncio.sleep(0.001)
        handed = b.queued_rows
        release.set()
        results = await asyncio.gather(first, late, patient, return_exceptions=True)
        await b.close()
        return handed, results

    handed, (first, late, patient) = asyncio.run(scenario())
    assert handed == 0
    assert isinstance(late, DeadlineExceeded), late
    assert float(first.outputs["y"][0, 0]) == 3.0 and float(patient.outputs["y"][0, 0]) == 21.0
    assert calls == [[1.0], [7.0]]


def test_a_lone_request_whose_caller_leaves_mid_computation_leaves_the_batcher_serving(caplog):
    """A lone request on an idle batcher goes straight to the compute thread, awaited by its own
    caller: cancelling the caller must not count as a failed batch nor leave the instance busy."""
    started, release = threading.Event(), threading.Event()

    def run(instance, feeds):
        started.set()
        release.wait(10)
        return [feeds["x"].sum(axis=1, keepdims=True)]

    async def scenario():
        b = _batcher(run, max_batch=4)
        b.start()
        lone = asyncio.create_task(b.submit({"x": np.ones((1, 3), np.float32)}, 1))
        while not started.is_set():
            await asyncio.sleep(0.001)
        assert b.queued_rows == 0  # computing, never queued
        lone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await lone
        release.set()
        after = await b.submit({"x": np.full((1, 3), 2, np.float32)}, 1)
        inflight = b.inflight
        await b.close()
        return after, inflight

    caplog.set_level("ERROR", logger="neuroserve.batching")
    after, inflight = asyncio.run(scenario())
    assert float(after.outputs["y"][0, 0]) == 6.0
    assert inflight == 0
    assert not [r for r in caplog.records if r.name == "neuroserve.batching"]


def test_max_padding_ratio_keeps_rows_of_other_lengths_out_of_a_batch():
    release = threading.Event()
    batches: list[list[int]] = []

    def run(instance, feeds):
        mask = feeds["x"] != 0
        batches.append(sorted(int(n) for n in mask.sum(axis=1)))
        if len(batches) == 1:
            release.wait(10)
        return [mask.sum(axis=1, keepdims=True).astype(np.float32)]

    async def scenario(ratio: float):
        batches.clear()
        release.clear()
        b = _batcher(run, max_batch=8, max_padding_ratio=ratio, variable=True)
        b.start()
        tasks = [asyncio.create_task(b.submit({"x": np.ones((1, 4), np.int64)}, 1))]
        while not batches:
            await asyncio.sleep(0.001)
        # Queued behind the blocked batch: lengths 10, 10, 9, 5, 5.
        for n in (10, 10, 9, 5, 5):
            tasks.append(asyncio.create_task(b.submit({"x": np.ones((1, n), np.int64)}, 1)))
        await asyncio.sleep(0.05)
        release.set()
        results = await asyncio.gather(*tasks)
        await b.close()
        return [int(r.outputs["y"][0, 0]) for r in results]

    # Every answer is its own row's, whatever it was batched with.
    assert asyncio.run(scenario(0.0)) == [4, 10, 10, 9, 5, 5]
    assert batches[1:] == [[10, 10], [9], [5, 5]]
    assert asyncio.run(scenario(0.5)) == [4, 10, 10, 9, 5, 5]
    assert batches[1:] == [[5, 5, 9, 10, 10]]  # 25 % padding is within the limit


def test_fixed_rows_pads_with_the_last_row_and_hands_back_only_real_rows():
    shapes: list[tuple[int, ...]] = []

    def run(instance, feeds):
        shapes.append(feeds["x"].shape)
        return [feeds["x"].sum(axis=1, keepdims=True)]

    async def scenario():
        layout = InputLayout("x")
        policy = BatchPolicy(4, 0.0, 64, 1, fixed_rows=4)
        b = Batcher(run, ["y"], [layout], policy, ModelMetrics("batcher-test", "1", "CPU"), Stats())
        b.start()
        one = await b.submit({"x": np.full((1, 3), 2, np.float32)}, 1)
        two = await b.submit({"x": np.arange(6, dtype=np.float32).reshape(2, 3)}, 2)
        await b.close()
        return one, two

    one, two = asyncio.run(scenario())
    assert shapes == [(4, 3), (4, 3)]  # the session only ever sees the one shape
    assert one.outputs["y"].tolist() == [[6.0]]
    assert two.outputs["y"].tolist() == [[3.0], [12.0]]


def test_submit_many_computes_rows_beyond_a_batch_alone_in_full_batches_as_one_request():
    calls: list[int] = []
    observed: list[int] = []

    def run(instance, feeds):
        calls.append(len(feeds["x"]))
        return [feeds["x"].sum(axis=1, keepdims=True)]

    async def scenario():
        policy = BatchPolicy(4, 0.0, 64, 1)
        stats = Stats()
        b = Batcher(run, ["y"], [InputLayout("x")], policy, ModelMetrics("batcher-test", "1", "CPU"), stats,
                    observe=lambda feeds, outputs: observed.append(len(feeds["x"])))
        b.start()
        rows = np.arange(10, dtype=np.float32)[:, None].repeat(3, axis=1)
        many = await b.submit_many({"x": rows}, 10)
        one = await b.submit({"x": np.ones((1, 3), np.float32)}, 1)
        await b.close()
        return many, one, stats

    many, one, stats = asyncio.run(scenario())
    assert calls == [4, 4, 2, 1]
    assert many.outputs["y"][:, 0].tolist() == [3.0 * i for i in range(10)]  # in order
    assert (many.calls, many.batch_rows, one.calls) == (3, 4, 1)
    assert stats.success.count == 2 and stats.inference_count == 11 and stats.execution_count == 4
    assert observed == [1]  # an explanation's rows are not traffic to monitor


def test_submit_many_refuses_more_rows_than_the_queue_holds_as_too_large():
    async def scenario():
        b = _batcher(lambda instance, feeds: [feeds["x"]], max_batch=4)
        b.start()
        try:
            await b.submit_many({"x": np.zeros((65, 1), np.float32)}, 65)
        finally:
            await b.close()

    with pytest.raises(PayloadTooLarge):
        asyncio.run(scenario())


def test_submit_many_pads_each_call_to_fixed_rows_and_hands_back_only_real_rows():
    shapes: list[tuple[int, ...]] = []

    def run(instance, feeds):
        shapes.append(feeds["x"].shape)
        return [feeds["x"].sum(axis=1, keepdims=True)]

    async def scenario():
        policy = BatchPolicy(4, 0.0, 64, 1, fixed_rows=4)
        b = Batcher(run, ["y"], [InputLayout("x")], policy, ModelMetrics("batcher-test", "1", "CPU"), Stats())
        b.start()
        result = await b.submit_many({"x": np.arange(30, dtype=np.float32).reshape(10, 3)}, 10)
        await b.close()
        return result

    result = asyncio.run(scenario())
    assert shapes == [(4, 3)] * 3  # the last call's 2 rows padded: the session sees one shape
    assert result.outputs["y"][:, 0].tolist() == [float(3 * i * 3 + 3) for i in range(10)]


def _blocking_batcher(*, max_batch: int, queue: int = 64, wait_s: float = 0.0):
    """A batcher whose first batch blocks until `release` is set; `calls` records each batch's x[:, 0]."""
    release = threading.Event()
    calls: list[list[float]] = []

    def run(instance, feeds):
        calls.append(feeds["x"][:, 0].tolist())
        if len(calls) == 1:
            release.wait(10)
        return [feeds["x"][:, :1]]

    policy = BatchPolicy(max_batch, 0.0, queue, 1, max_queue_wait_s=wait_s)
    b = Batcher(run, ["y"], [InputLayout("x")], policy, ModelMetrics("batcher-test", "1", "CPU"), Stats())
    return b, release, calls


def _row(value: float) -> dict[str, np.ndarray]:
    return {"x": np.full((1, 2), value, np.float32)}


async def _until_computing(calls: list) -> None:
    while not calls:
        await asyncio.sleep(0.001)


def _bounded_batcher(row_s: float) -> Batcher:
    """One-row batches that compute `row_s` seconds a row, refusing expected waits over 50 ms."""
    def run(instance, feeds):
        time.sleep(row_s * len(feeds["x"]))
        return [feeds["x"][:, :1]]

    policy = BatchPolicy(1, 0.0, 64, 1, max_queue_wait_s=0.05)
    return Batcher(run, ["y"], [InputLayout("x")], policy, ModelMetrics("batcher-test", "1", "CPU"), Stats())


def test_a_request_expected_to_wait_past_max_queue_wait_is_refused_with_retry_after():
    async def scenario():
        b = _bounded_batcher(0.02)
        b.start()
        await b.submit(_row(0), 1)  # measures the compute time per row
        results = await asyncio.gather(*(b.submit(_row(i), 1) for i in range(6)), return_exceptions=True)
        await b.close()
        return results

    results = asyncio.run(scenario())
    # Rows ahead × 20 ms: 0, 20 and 40 ms are within 50 ms; 60 ms and more are not.
    assert [isinstance(r, QueueFull) for r in results] == [False] * 3 + [True] * 3
    refused = results[3]
    assert "expected queue wait" in refused.message and int(refused.headers["Retry-After"]) >= 1


def test_answers_slower_than_max_queue_wait_lower_the_admission_bound_and_faster_ones_raise_it():
    """Admission bounds the whole time an admitted request spends in the service: answers whose
    requests arrived long before they were queued (a busy event loop) lower the bound the expected
    queue wait is judged against, and answers within it raise it again."""
    async def scenario():
        b = _bounded_batcher(0.02)
        b.start()
        untouched = b.wait_bound_s
        for i in range(60):  # each had waited 200 ms before its batcher saw it
            await b.submit(_row(i), 1, arrived=time.perf_counter() - 0.2)
        lowered = b.wait_bound_s
        results = await asyncio.gather(*(b.submit(_row(i), 1) for i in range(6)), return_exceptions=True)
        await b.submit(_row(0), 1, arrived=time.perf_counter())  # within the bound
        raised = b.wait_bound_s
        await b.close()
        return untouched, lowered, results, raised

    untouched, lowered, results, raised = asyncio.run(scenario())
    assert untouched == 0.05
    # 60 answers over the bound would take it to about 0.4 of itself; it stops at half.
    assert lowered == pytest.approx(0.05 * MIN_SCALE)
    # Rows ahead × 20 ms against 25 ms: only the first two are admitted (50 ms: three).
    assert [isinstance(r, QueueFull) for r in results] == [False] * 2 + [True] * 4
    assert "lowered while admitted requests take longer" in results[2].message
    assert raised > lowered


def test_a_busy_event_loop_counts_in_the_expected_wait_until_its_measurement_ages():
    """A batch the event loop takes back late (here: the loop blocked for 40 ms while a 10 ms batch
    computes) makes its requests wait past their queue; the next request expects that lag twice
    (the batch's return and its own task's turn) and is refused against a 50 ms bound although
    nothing is queued or computing. With no batch in flight to measure a quieter loop, the
    measurement's weight halves every LAG_HALF_LIFE_S: requests are admitted again, instead of
    being refused for good while nothing computes."""
    async def scenario():
        b = _bounded_batcher(0.01)
        b.start()
        await b.submit(_row(0), 1)
        quiet = b.refusal(1, 0)
        late = asyncio.create_task(b.submit(_row(1), 1))
        await asyncio.sleep(0)  # the batch is handed to its thread
        time.sleep(0.04)  # the event loop busy elsewhere meanwhile
        await late
        busy = b.refusal(1, 0)
        await asyncio.sleep(3 * LAG_HALF_LIFE_S)  # nothing computes meanwhile
        aged = b.refusal(1, 0)
        await b.close()
        return quiet, busy, aged

    quiet, busy, aged = asyncio.run(scenario())
    assert quiet is None
    assert isinstance(busy, QueueFull) and "expected queue wait" in busy.message
    assert aged is None


def test_rows_admitted_from_heads_count_ahead_until_queued_or_forgotten():
    """Heads admitted in one turn of the event loop, before any of their requests is queued, are
    judged against each other; a reservation is consumed when its request is queued and forgotten
    after RESERVATION_S (its request failed before it was queued)."""
    async def scenario():
        b, release, calls = _blocking_batcher(max_batch=1, queue=3)
        b.start()
        first = asyncio.create_task(b.submit(_row(0), 1))
        await _until_computing(calls)
        admitted = 0
        for _ in range(10):  # heads read in one turn: nothing queued meanwhile
            if b.refusal(1, 0) is not None:
                break
            b.reserve(1)
            admitted += 1
        reserved_full = b.refusal(1, 0)
        queued = [asyncio.create_task(b.submit(_row(i), 1)) for i in range(1, admitted + 1)]
        await asyncio.sleep(0.01)
        left = b.queued_rows  # the others were handed to the busy instance (HANDED_AHEAD)
        consumed = b.refusal(1, 0)  # the reservations were consumed as their requests queued
        b.reserve(3 - left)  # heads whose requests never reach the queue
        held = b.refusal(1, 0)
        await asyncio.sleep(RESERVATION_S + 0.01)
        forgotten = b.refusal(1, 0)
        release.set()
        results = await asyncio.gather(first, *queued)
        await b.close()
        return admitted, reserved_full, left, consumed, held, forgotten, results

    admitted, reserved_full, left, consumed, held, forgotten, results = asyncio.run(scenario())
    assert admitted == 3 and isinstance(reserved_full, QueueFull)  # 3 rows fit the queue
    assert left == 3 - HANDED_AHEAD and consumed is None
    assert isinstance(held, QueueFull) and forgotten is None
    assert len(results) == 4  # every admitted request was computed


def test_higher_priority_classes_are_batched_first():
    async def scenario():
        b, release, calls = _blocking_batcher(max_batch=1)
        b.start()
        first = asyncio.create_task(b.submit(_row(0), 1))
        await _until_computing(calls)
        queued = [asyncio.create_task(b.submit(_row(v), 1, priority=p))
                  for v, p in [(1, 0), (2, 0), (3, 2), (4, 1), (5, 2)]]
        await asyncio.sleep(0.02)
        release.set()
        await asyncio.gather(first, *queued)
        await b.close()
        return calls

    assert asyncio.run(scenario()) == [[0], [3], [5], [4], [1], [2]]


def test_a_higher_class_evicts_the_newest_requests_of_lower_classes_from_a_full_queue():
    async def scenario():
        b, release, calls = _blocking_batcher(max_batch=1, queue=3)
        b.start()
        first = asyncio.create_task(b.submit(_row(0), 1))
        await _until_computing(calls)
        low = [asyncio.create_task(b.submit(_row(v), 1)) for v in (1, 2, 3, 4)]
        high = asyncio.create_task(b.submit(_row(9), 1, priority=1))
        await asyncio.sleep(0.02)
        release.set()
        results = await asyncio.gather(first, *low, high, return_exceptions=True)
        await b.close()
        return results, calls

    results, calls = asyncio.run(scenario())
    refused = [isinstance(r, QueueFull) for r in results]
    # 4 is refused on arrival (3 rows ahead of it), 3 is evicted by the higher class.
    assert refused == [False, False, False, True, True, False]
    assert "higher priority" in results[3].message and "Retry-After" in results[3].headers
    assert calls == [[0], [9], [1], [2]]


def test_a_request_that_waited_max_queue_wait_goes_before_higher_classes():
    async def scenario():
        b, release, calls = _blocking_batcher(max_batch=2, wait_s=0.05)
        b.start()
        first = asyncio.create_task(b.submit(_row(0), 1))
        await _until_computing(calls)
        low = asyncio.create_task(b.submit(_row(1), 1))
        await asyncio.sleep(0.08)  # the low-class request is now past its wait budget
        high = [asyncio.create_task(b.submit(_row(v), 1, priority=3)) for v in (7, 8)]
        await asyncio.sleep(0.02)
        release.set()
        await asyncio.gather(first, low, *high)
        await b.close()
        return calls

    assert asyncio.run(scenario()) == [[0], [1, 7], [8]]
