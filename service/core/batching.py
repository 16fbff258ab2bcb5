"""Dynamic batching: a bounded queue per model version, merged into one ONNX Runtime call per batch.

When does a batch close? As soon as it is full (`max_batch_size` rows). Otherwise the batcher asks
whether waiting can help: if the runtime is idle and no other request is expected (the number of
requests in flight is already what it recently peaked at, e.g. one client sending one request at a
time), the batch goes at once, so a lone request pays no delay. Only while another instance is
computing, or while more requests are expected to arrive, does it wait, and never longer than
`max_queue_delay` counted from the oldest request's arrival. With one instance, requests that
arrive while a batch computes simply queue and form the next batch; once they fill one, it is handed
to the instance at once, to start the moment the batch before it ends.

Variable-length inputs (text ids and masks) are padded to the longest row of their batch; the batch
is chosen around the oldest request from requests of similar length, and never pads more than the
model's `max_padding_ratio` of it.
An ORT error in a merged batch is retried request by request, so only the offending request fails.

Who waits, and who is refused (docs/benchmarks.md, "Overload: shedding by expected wait"): a
request is refused (429 with `Retry-After`) when the rows queued ahead of it pass `max_queue_size`,
or when its expected wait passes `max_queue_wait`: the rows ahead of it, those being computed
included, times the measured compute time per row, or the batches ahead of it times the time
between batches while rows waited throughout, whichever is longer (an event loop busy with requests
can hold batches back), plus twice how late the loop takes computed batches back, and at least the
age of the oldest request ahead of it.
A latency bound, so the queue never holds more work than it can start within that time; and
meant for the whole time an admitted request spends in the service, not only its queue, so the
bound is scaled down while answered requests come out over it (`_answered`). Rows
admitted from requests' heads count as queued until their requests are (`reserve`). Requests
carry a priority class (higher first): the rows ahead of a request are those of its class and
above, so lower classes are refused first, and a request admitted into a queue over its bounds
evicts the newest requests of the lowest classes below its own (429) until the queue is within
them. Batches take the highest classes first, except that a request that has waited
`max_queue_wait` goes first whatever its class, so none starves.

A request may hold more rows than a batch (`submit_many`, used by explanations for their perturbed
inputs): it is computed alone, in consecutive ORT calls of `max_batch_size` rows, and counts as one
request of that many rows in the statistics. Its rows stay out of the monitoring histograms, which
describe the traffic's real inputs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from time import perf_counter

import numpy as np

from service.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InvalidInput,
    ModelNotReady,
    PayloadTooLarge,
    QueueFull,
    ServiceError,
)
from service.observability import tracing
from service.observability.logging import request_id
from service.observability.metrics import ModelMetrics, observe_many
from service.observability.stats import Stats

log = logging.getLogger("neuroserve.batching")

# Full batches that may wait at a busy instance besides the one it computes (`_pick_instance`).
HANDED_AHEAD = 2
# How long the recent peak of concurrent requests is remembered (see `_expected_arrivals`).
PEAK_WINDOW_S = 1.0
# How long rows admitted from requests' heads count as ahead of later requests before they are
# queued (`reserve`): a few turns of a busy event loop; a reservation never consumed (the request
# failed before it was queued) is forgotten with the others after it.
RESERVATION_S = 0.05
# The admission bound's feedback (`_answered`): the share of answered requests whose time in the
# service, their batch's compute aside, may exceed `max_queue_wait`, so that its 99th percentile
# stays within it; how far one answer moves the scale; the lowest scale.
OVER_SHARE = 0.005
SCALE_STEP = 0.01
MIN_SCALE = 0.5
# The event loop's lag is measured only as batches come back; with none in flight it is judged
# by a measurement that ages, so its weight halves every this many seconds. Without it, one stall
# measured long enough to refuse every request stayed in force: nothing was admitted, no batch came
# back to measure a quieter loop, and the model refused everything while its CPU stood idle.
LAG_HALF_LIFE_S = 0.05

RunFn = Callable[[int, dict[str, np.ndarray]], Sequence[np.ndarray]]
# Called with (merged inputs, outputs) of every batch, in the compute thread.
ObserveFn = Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], None]


@dataclass(frozen=True)
class InputLayout:
    """How one input is merged: concatenated, or padded along `variable_axes` with `pad_value`."""

    name: str
    variable_axes: tuple[int, ...] = ()
    pad_value: int | float = 0


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int
    max_queue_delay_s: float
    max_queue_size: int
    instances: int = 1
    # A batch never takes a request that would make more than this share of its padded tensor
    # padding; such a request goes into a later batch with requests of its own length instead.
    max_padding_ratio: float = 0.5
    # When > 0, a batch of fixed-shape inputs smaller than this is padded with copies of its last row
    # to this many rows, so the session always sees one input shape: the CUDA provider re-plans its
    # convolutions for every new shape (10-180 ms per call for the speech CNN on an NVIDIA H100).
    fixed_rows: int = 0
    # When > 0, a request whose expected wait in the queue is over this is refused (429); it is also
    # how long a request of a low class may be passed over by higher ones. 0: rows bound only.
    max_queue_wait_s: float = 0.0


@dataclass(slots=True)
class BatchResult:
    outputs: dict[str, np.ndarray]
    queue_s: float
    compute_s: float
    batch_rows: int  # rows of the largest ORT call that computed this request
    calls: int = 1  # ORT calls that computed this request (more than 1 only for `submit_many`)
    version: str = ""  # the model version that computed it


@dataclass(slots=True, eq=False)
class _Pending:
    inputs: dict[str, np.ndarray]
    rows: int
    length: int
    future: asyncio.Future[BatchResult]
    enqueued: float
    deadline: float | None
    request_id: str | None = None  # for logs about the batch it ends up in
    timer: asyncio.TimerHandle | None = None
    queued: bool = True
    monitored: bool = True  # its rows count in the input and prediction histograms
    trace: tracing.RequestTrace | None = None  # only while tracing is on
    priority: int = 0  # its class: higher classes are batched first and shed last


# (per request: outputs or error), start time, (input, output) seconds, padding ratio, and the
# (rows, seconds) of each ORT call (one, or several for a request larger than a batch).
_Computed = tuple[list[dict[str, np.ndarray] | Exception], float, tuple[float, float], float | None,
                  list[tuple[int, float]]]
_Job = tuple[list[_Pending], "asyncio.Future[_Computed]"]


def _resolve(done: asyncio.Future[_Computed], outcome: _Computed) -> None:
    if not done.done():  # its batch task may have been cancelled meanwhile
        done.set_result(outcome)


def _fail(done: asyncio.Future[_Computed], error: BaseException) -> None:
    if not done.done():
        done.set_exception(error)


class Batcher:
    def __init__(
        self,
        run: RunFn,
        output_names: Sequence[str],
        layouts: Sequence[InputLayout],
        policy: BatchPolicy,
        metrics: ModelMetrics,
        stats: Stats,
        observe: ObserveFn | None = None,
    ) -> None:
        self._run_fn = run
        self.output_names = list(output_names)
        self.layouts = list(layouts)
        self.policy = policy
        self.metrics = metrics
        self.stats = stats
        self._observe = observe
        self._variable = next((lay for lay in self.layouts if lay.variable_axes), None)
        self._pending: deque[_Pending] = deque()
        self._queued_rows = 0
        self._inflight = 0
        self._jobs: list[int] = []  # batches handed to each instance and not finished yet
        self._peak_cur = 0
        self._peak_prev = 0
        self._peak_epoch = 0.0
        self._row_seconds = 0.0  # moving average of compute-thread time per row (merge, ORT, split)
        # Moving average of the time between batches while rows were waiting throughout: how fast
        # the queue drains, whatever limits it (compute, or an event loop busy with requests).
        self._cycle_seconds = 0.0
        self._loop_lag = 0.0  # moving average of how late the event loop takes a computed batch back
        self._lag_at = 0.0  # perf_counter() when it was last measured
        self._last_dispatch = 0.0
        self._backlogged = False  # rows were left waiting when the last batch was dispatched
        self._class_rows: dict[int, int] = {}  # queued rows by priority class
        self._assigned_rows = 0  # rows handed to the compute threads and not finished
        self._reserved_rows = 0  # rows admitted from heads (`reserve`) and not queued yet
        self._reserved_since = 0.0
        # `max_queue_wait` times this is what admission compares expected waits with (`_answered`).
        self._wait_scale = 1.0
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._scheduler: asyncio.Task[None] | None = None
        self._compute_queues: list[queue.SimpleQueue[_Job | None]] = []
        self._wake: asyncio.Event | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._jobs = [0] * self.policy.instances
        loop = asyncio.get_running_loop()
        for i in range(self.policy.instances):
            jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
            self._compute_queues.append(jobs)
            threading.Thread(target=self._compute_thread, args=(loop, jobs, i), name=f"ort-{i}",
                             daemon=True).start()
        self._scheduler = asyncio.get_running_loop().create_task(self._schedule())

    async def close(self) -> None:
        """Stop admitting, finish everything already accepted, then release the threads."""
        self._closing = True
        if self._scheduler is None:
            return
        self._wake.set()
        await self._scheduler
        while self._tasks:
            await asyncio.gather(*self._tasks)
        for jobs in self._compute_queues:
            jobs.put(None)  # the thread finishes the job it has, if any, and exits

    @property
    def closing(self) -> bool:
        return self._closing

    def pin(self) -> Batcher:
        return self  # a batcher serves exactly its own version

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    @property
    def inflight(self) -> int:
        return self._inflight

    # -- admission ---------------------------------------------------------------------------------

    async def submit(
        self, inputs: dict[str, np.ndarray], rows: int, deadline: float | None = None, *,
        priority: int = 0, arrived: float | None = None,
    ) -> BatchResult:
        """Queue `rows` rows (arrays with the batch axis first) and wait for their outputs.

        `deadline` is a `time.perf_counter()` value; a request still queued then is shed (504).
        `priority`: the request's class (higher: batched first, shed last). `arrived`: when the
        service had the whole request (`perf_counter`, this machine's monotonic clock), so that
        admission learns how long admitted requests really take (`_answered`).
        """
        if not 0 < rows <= self.policy.max_batch_size:
            # Such a request could never be scheduled; callers split larger inputs.
            raise InvalidInput(f"{rows} rows; a batch holds 1 to {self.policy.max_batch_size}")
        result = await self._enqueue(inputs, rows, deadline, monitored=True, priority=priority)
        if arrived is not None and self.policy.max_queue_wait_s > 0:
            self._answered(perf_counter() - arrived - result.compute_s)
        return result

    def _answered(self, waited: float) -> None:
        """Feedback from an answered request that `waited` seconds in the service, from having it
        whole to its answer, besides its batch's compute: decoding it, its queue, and the event
        loop's turns before and after. The queue's estimate sees only the queue, and an event loop
        busy with far more requests than it serves (overload) adds tens of milliseconds around it,
        so the bound that admission uses is scaled by stochastic quantile tracking: down by almost
        `SCALE_STEP` for each answer over `max_queue_wait`, up by `SCALE_STEP * OVER_SHARE` for
        each within it, which settles where `OVER_SHARE` of the answers are over. Without overload
        every answer is within the bound and the scale returns to 1 after some thousand answers.
        Never below `MIN_SCALE`: what admitting fewer cannot shorten (a large body's decoding)
        must not close the queue."""
        over = waited > self.policy.max_queue_wait_s
        scale = self._wait_scale + SCALE_STEP * (OVER_SHARE - over)
        self._wait_scale = MIN_SCALE if scale < MIN_SCALE else 1.0 if scale > 1.0 else scale

    @property
    def wait_bound_s(self) -> float:
        """The expected queue wait over which a request is refused now (0: no such bound)."""
        return self.policy.max_queue_wait_s * self._wait_scale

    async def submit_many(
        self, inputs: dict[str, np.ndarray], rows: int, deadline: float | None = None, *,
        priority: int = 0,
    ) -> BatchResult:
        """Queue any number of rows as one request and wait for their outputs, in order.

        Rows past `max_batch_size` are computed alone in consecutive full batches, so a caller with
        many rows (an explanation's perturbed inputs) makes one queue entry instead of many. They
        are not monitored: they are variations of an input, not traffic. More rows than the queue
        holds could never be admitted, so they are refused as too large (413) rather than as a
        full queue (429, which invites a retry).
        """
        if rows <= 0:
            raise InvalidInput("no rows to compute")
        if rows > self.policy.max_queue_size:
            raise PayloadTooLarge(f"{rows} rows in one request; this model's queue holds "
                                  f"{self.policy.max_queue_size}")
        return await self._enqueue(inputs, rows, deadline, monitored=False, priority=priority)

    def refusal(self, rows: int = 1, priority: int = 0) -> QueueFull | None:
        """The refusal a request of `rows` rows in class `priority` would meet now, or None.

        Cheap enough to ask from a request's head, before its body is read or decoded: a request
        whose class is at most `priority` (its key's bound) would be refused as well."""
        judged = self._judge(rows, priority)
        if judged is None:
            return None
        wait, _ = judged
        policy = self.policy
        if wait is None:
            message = f"queue full ({self._queued_rows} of {policy.max_queue_size} rows waiting)"
        else:
            bound = f"max_queue_wait_ms {policy.max_queue_wait_s * 1000:g}"
            if self._wait_scale < 1.0:
                bound = (f"{self.wait_bound_s * 1000:.0f} ms ({bound}, lowered while admitted requests "
                         "take longer than it)")
            message = f"expected queue wait {wait * 1000:.0f} ms exceeds {bound}"
        return QueueFull(message, headers={"Retry-After": str(self._retry_after())})

    def refuses(self, rows: int = 1, priority: int = 0) -> bool:
        """Whether `refusal` would refuse such a request, without writing the refusal."""
        return self._judge(rows, priority) is not None

    def refusing_for(self, rows: int = 1, priority: int = 0) -> float:
        """Seconds for which such a request would still be refused if nothing more arrived (0: it
        would be admitted now): what an executor process tells the front-ends, which then refuse
        from requests' heads meanwhile (`service.core.executor_client`)."""
        judged = self._judge(rows, priority)
        return 0.0 if judged is None else judged[1]

    def _judge(self, rows: int, priority: int) -> tuple[float | None, float] | None:
        """None if such a request would be admitted; else (its expected wait, None when the queue is
        full of rows, and the seconds it would still be refused for)."""
        ahead = self._rows_ahead(priority) + self._reserved()
        policy = self.policy
        if ahead + rows > policy.max_queue_size:
            return None, (ahead + rows - policy.max_queue_size) * self._row_seconds / policy.instances
        if policy.max_queue_wait_s > 0:
            # At least as long as the oldest request ahead has already waited: when the event loop,
            # not the queue, holds batches back, rows say little and that age says it (as CoDel
            # judges a queue by how long its packets stay).
            wait = max(self._expected_wait(ahead), self._oldest_age(priority))
            bound = self.wait_bound_s
            if wait > bound:
                return wait, wait - bound
        return None

    def reserve(self, rows: int = 1) -> None:
        """Count `rows` admitted from a request's head as ahead of later requests until the request
        is queued. A busy event loop reads hundreds of heads in one turn before any of their
        requests reaches the queue: without this, all of them were admitted against the same queue,
        and most were then refused after their bodies had been read and decoded."""
        now = perf_counter()
        if now - self._reserved_since > RESERVATION_S:
            self._reserved_rows, self._reserved_since = 0, now
        self._reserved_rows += rows

    def _reserved(self) -> int:
        if self._reserved_rows and perf_counter() - self._reserved_since > RESERVATION_S:
            self._reserved_rows = 0
        return self._reserved_rows

    def _oldest_age(self, priority: int) -> float:
        """How long the oldest queued request of class `priority` or above has waited."""
        for p in self._pending:
            if p.queued and p.priority >= priority:
                return perf_counter() - p.enqueued
        return 0.0

    def _rows_ahead(self, priority: int) -> int:
        """Queued rows that go before a new request of class `priority` (its class and above)."""
        if len(self._class_rows) <= 1:
            return self._queued_rows if priority <= min(self._class_rows, default=priority) else 0
        return sum(n for cls, n in self._class_rows.items() if cls >= priority)

    def _expected_wait(self, queued_rows: int) -> float:
        """Seconds until `queued_rows` more rows, and those being computed, have been computed (at
        the slower of the compute rate and the rate batches were last seen to leave the queue) and
        their answers are on their way: the event loop's lag, twice."""
        computing = (queued_rows + self._assigned_rows) * self._row_seconds / self.policy.instances
        # Per batch, not per row: when the event loop is what holds batches back, a batch leaves
        # as late whatever its size, and more rows only make it fuller.
        batches = sum(self._jobs) + queued_rows // self.policy.max_batch_size
        lag = self._loop_lag
        if lag:
            lag *= 0.5 ** ((perf_counter() - self._lag_at) / LAG_HALF_LIFE_S)
        return max(computing, batches * self._cycle_seconds) + 2 * lag

    def _over_bounds(self) -> bool:
        policy = self.policy
        return self._queued_rows > policy.max_queue_size or (
            policy.max_queue_wait_s > 0 and self._expected_wait(self._queued_rows) > self.wait_bound_s)

    def _evict_below(self, priority: int) -> None:
        """While the queue is over its bounds, refuse the newest requests of the lowest classes below
        `priority` (a request just admitted above them)."""
        while self._over_bounds():
            lower = [cls for cls, n in self._class_rows.items() if cls < priority and n > 0]
            if not lower:
                return
            lowest = min(lower)
            victim = next(p for p in reversed(self._pending) if p.queued and p.priority == lowest)
            self._dequeue(victim)
            if not victim.future.done():
                victim.future.set_exception(QueueFull(
                    f"shed from the queue for requests of a higher priority class (its class: {lowest})",
                    headers={"Retry-After": str(self._retry_after())}))

    async def _enqueue(
        self, inputs: dict[str, np.ndarray], rows: int, deadline: float | None, *, monitored: bool,
        priority: int = 0,
    ) -> BatchResult:
        if self._closing or self._scheduler is None:
            raise ModelNotReady("model version is unloading")
        if self._reserved_rows:
            # Its own reservation when its head made one; one that made none (gRPC, API keys) can
            # only leave the count too low, never too high.
            self._reserved_rows = max(0, self._reserved_rows - rows)
        refused = self.refusal(rows, priority)
        if refused is not None:
            raise refused
        loop = asyncio.get_running_loop()
        now = perf_counter()
        length = 0
        if self._variable is not None:
            arr = inputs[self._variable.name]
            length = math.prod(arr.shape[1:])
        p = _Pending(inputs, rows, length, loop.create_future(), now, deadline, request_id.get(),
                     monitored=monitored, priority=priority)
        if tracing.enabled and (trace := tracing.current.get()) is not None:
            p.trace = trace
            tracing.enqueued(trace, now)
        self._track_inflight(loop.time())
        self.metrics.inflight.inc()
        # Nothing to batch it with and an instance free: straight to its compute thread. Through the
        # scheduler task it would wait three more turns of the event loop (docs/benchmarks.md, "A
        # lone request"). A request with a deadline takes the queue, which sheds it if the deadline
        # passes before its batch is taken, whatever else is waiting.
        alone = deadline is None and not self._queued_rows and self._idle_and_alone()
        if alone:
            p.queued = False
            self._jobs[0] += 1
            self._assigned_rows += rows
        else:
            if deadline is not None:
                p.timer = loop.call_later(max(0.0, deadline - now), self._expire, p)
            self._pending.append(p)
            self._queued_rows += rows
            self._class_rows[priority] = self._class_rows.get(priority, 0) + rows
            self.metrics.queue_depth.inc(rows)
            if len(self._class_rows) > 1:
                self._evict_below(priority)
            self._wake.set()
        try:
            if alone:
                await self._execute([p], 0)
            return await p.future
        finally:
            if p.trace is not None:
                p.trace.answered = perf_counter()
            self._inflight -= 1
            self.metrics.inflight.dec()
            if p.queued:  # cancelled while waiting
                self._dequeue(p)

    def _track_inflight(self, now: float) -> None:
        elapsed = now - self._peak_epoch
        if elapsed >= PEAK_WINDOW_S:
            self._peak_prev = self._peak_cur if elapsed < 2 * PEAK_WINDOW_S else 0
            self._peak_cur = 0
            self._peak_epoch = now
        self._inflight += 1
        if self._inflight > self._peak_cur:
            self._peak_cur = self._inflight

    def _idle_and_alone(self) -> bool:
        """No instance is computing and no other request is expected."""
        return not any(self._jobs) and self._expected_arrivals() <= 0

    def _expected_arrivals(self) -> int:
        """Requests likely on their way: the recent peak of concurrent requests minus those here.

        Clients that keep N requests in flight send the next one as soon as an answer arrives, so
        after a batch returns, N minus what is already queued will come back shortly.
        """
        return max(self._peak_prev, self._peak_cur) - self._inflight

    def _retry_after(self) -> int:
        """Seconds until the queue has room again, from the recent compute time per row."""
        seconds = self._expected_wait(self._queued_rows)
        return max(1, min(60, math.ceil(seconds)))

    def _dequeue(self, p: _Pending) -> None:
        p.queued = False
        self._queued_rows -= p.rows
        left = self._class_rows[p.priority] - p.rows
        if left:
            self._class_rows[p.priority] = left
        else:
            del self._class_rows[p.priority]
        self.metrics.queue_depth.dec(p.rows)
        if p.timer is not None:
            p.timer.cancel()

    def _expire(self, p: _Pending) -> None:
        if not p.queued or p.future.done():
            return
        self._dequeue(p)
        waited_ms = (perf_counter() - p.enqueued) * 1000
        p.future.set_exception(
            DeadlineExceeded(f"deadline passed after {waited_ms:.1f} ms in the queue; not computed")
        )

    # -- scheduling --------------------------------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            if self._queued_rows == 0:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._dispatch_next()
            except Exception:
                # A bug here must not leave the model silently dead with requests waiting forever.
                log.exception("batch scheduling failed; failing the queued requests")
                for p in self._live():
                    self._dequeue(p)
                    if not p.future.done():
                        p.future.set_exception(InferenceFailed("internal error while batching"))

    async def _dispatch_next(self) -> None:
        instance = self._pick_instance()
        if instance is None:  # wait for an arrival or for a batch to finish
            self._wake.clear()
            await self._wake.wait()
            return
        # Requests whose bytes already arrived are one loop turn away from the queue: let them in,
        # unless a full batch is waiting already.
        if self._queued_rows < self.policy.max_batch_size:
            await asyncio.sleep(0)
        batch = await self._collect() if self._jobs[instance] == 0 else self._take()
        if not batch:
            return
        self._jobs[instance] += 1
        rows = sum(p.rows for p in batch)
        self._assigned_rows += rows
        now = perf_counter()
        if self._backlogged:
            cycle, interval = self._cycle_seconds, now - self._last_dispatch
            self._cycle_seconds = 0.9 * cycle + 0.1 * interval if cycle else interval
        self._last_dispatch, self._backlogged = now, self._queued_rows > 0
        task = asyncio.get_running_loop().create_task(self._execute(batch, instance))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _pick_instance(self) -> int | None:
        """The least busy instance if it is idle, or if a full batch is queued and fewer than
        `HANDED_AHEAD` batches wait at it; otherwise none.

        A full batch cannot grow by waiting, so it waits at a busy instance, which starts it the
        moment the batch before it ends. Waiting in the queue instead, it would leave the instance
        idle while the event loop answers the finished batch and collects the next: with every core
        busy that gap was ~10 % of the compute thread's time, and under overload, when each turn of
        the loop answers hundreds of arrivals, one batch ahead was not enough to keep the instance
        busy (docs/benchmarks.md, "Overload: shedding by expected wait"). A batch that is not full
        stays in the queue, where later requests can still join it. What was handed ahead can no
        longer be overtaken by a higher class; a request in it whose deadline passes is still shed
        (`_shed_late`).
        """
        instance = min(range(len(self._jobs)), key=self._jobs.__getitem__)
        jobs = self._jobs[instance]
        if jobs == 0 or (jobs <= HANDED_AHEAD and self._queued_rows >= self.policy.max_batch_size):
            return instance
        return None

    async def _collect(self) -> list[_Pending]:
        max_rows = self.policy.max_batch_size
        while self._queued_rows and self._queued_rows < max_rows and not self._closing:
            if self._idle_and_alone():
                break  # waiting would only add latency
            oldest = self._oldest()
            if oldest is None:
                break
            remaining = oldest.enqueued + self.policy.max_queue_delay_s - perf_counter()
            if remaining <= 0:
                break
            self._wake.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wake.wait()
            except TimeoutError:
                break
        return self._take()

    def _oldest(self) -> _Pending | None:
        while self._pending and not self._pending[0].queued:
            self._pending.popleft()
        return self._pending[0] if self._pending else None

    def _live(self) -> list[_Pending]:
        """Queued requests in arrival order, shedding those whose deadline has passed."""
        now = perf_counter()
        live = []
        for p in self._pending:
            if not p.queued:
                continue
            if p.deadline is not None and now >= p.deadline:
                self._expire(p)
                continue
            live.append(p)
        return live

    def _by_priority(self, live: list[_Pending]) -> list[_Pending]:
        """`live` (in arrival order) in the order a batch takes them: requests that have waited
        `max_queue_wait` first (oldest first), then higher classes before lower, each in arrival order."""
        first = live[0].priority
        if all(p.priority == first for p in live):
            return live
        wait = self.policy.max_queue_wait_s
        due = perf_counter() - wait if wait > 0 else -math.inf
        # Stable: arrival order within each group.
        return sorted(live, key=lambda p: (False, 0) if p.enqueued <= due else (True, -p.priority))

    def _take(self) -> list[_Pending]:
        max_rows = self.policy.max_batch_size
        live = self._live()
        if not live:
            self._pending.clear()
            return []
        arrivals, live = live, self._by_priority(live)
        if live[0].rows > max_rows:  # a request larger than a batch (`submit_many`) goes alone
            batch = [live[0]]
        elif self._variable is None:
            batch, rows = [], 0
            for p in live:
                if rows + p.rows <= max_rows:
                    batch.append(p)
                    rows += p.rows
                    if rows == max_rows:
                        break
        else:
            batch = self._take_similar_lengths(live, max_rows, self.policy.max_padding_ratio)
        for p in batch:
            self._dequeue(p)
        self._pending = deque(p for p in arrivals if p.queued)
        return batch

    @staticmethod
    def _take_similar_lengths(live: list[_Pending], max_rows: int, max_padding: float) -> list[_Pending]:
        anchor = live[0]  # the oldest always goes, so no request starves
        batch = [anchor]
        rows, longest, useful = anchor.rows, anchor.length, anchor.rows * anchor.length
        for p in sorted(live[1:], key=lambda q: (-q.priority, abs(q.length - anchor.length))):
            if rows + p.rows > max_rows:
                continue
            new_longest = max(longest, p.length)
            new_useful = useful + p.rows * p.length
            if 1 - new_useful / ((rows + p.rows) * new_longest) > max_padding:
                continue
            batch.append(p)
            rows, longest, useful = rows + p.rows, new_longest, new_useful
            if rows == max_rows:
                break
        return batch

    # -- execution ---------------------------------------------------------------------------------

    async def _execute(self, batch: list[_Pending], instance: int) -> None:
        try:
            await self._execute_batch(batch, instance)
        finally:
            # Whatever went wrong, every request of the batch gets an answer.
            for p in batch:
                if not p.future.done():
                    log.error("batch ended without a result", extra={"request_id": p.request_id})
                    p.future.set_exception(InferenceFailed("internal error while running the batch"))

    async def _execute_batch(self, batch: list[_Pending], instance: int) -> None:
        done = asyncio.get_running_loop().create_future()
        self._compute_queues[instance].put((batch, done))
        try:
            results, start, (input_s, output_s), padding, calls = await done
        except asyncio.CancelledError:
            for p in batch:
                p.future.cancel()  # nobody waits for their answers any more
            raise
        finally:
            self._jobs[instance] -= 1
            self._assigned_rows -= sum(p.rows for p in batch)
            self._wake.set()
        # Queue time runs until the compute thread starts the batch (it may wait there, see
        # `_pick_instance`).
        queue_s = [start - p.enqueued for p in batch]
        observe_many(self.metrics.queue, queue_s)
        self.stats.queue.add(sum(queue_s), len(batch))
        rows = sum(p.rows for p in batch)
        infer_s = sum(seconds for _, seconds in calls)
        largest = max((n for n, _ in calls), default=rows)
        end = perf_counter()
        # How late the event loop took the batch back: its requests' tasks resume a turn later
        # still, so a queued request expects about twice this besides its queue (`_expected_wait`).
        lag = max(0.0, end - (start + input_s + infer_s + output_s))
        # Up at once, down slowly: when overload begins, the queue must not fill on the lag of
        # a quiet loop before an average has caught up.
        self._loop_lag = lag if lag > self._loop_lag else 0.9 * self._loop_lag + 0.1 * lag
        self._lag_at = end
        if tracing.enabled:
            self._trace(batch, results, start, start + input_s + infer_s + output_s, rows, padding,
                        len(calls), instance)
        for p, result in zip(batch, results, strict=True):
            if p.future.done():
                continue
            if isinstance(result, BaseException):
                self.stats.fail.add(end - p.enqueued)
                if not isinstance(result, ServiceError):
                    log.error("inference failed: %s", result,
                              extra={"request_id": p.request_id, "batch_rows": rows})
                    result = InferenceFailed(f"inference failed: {result}")
                p.future.set_exception(result)
            else:
                self.stats.success.add(end - p.enqueued)
                p.future.set_result(BatchResult(result, start - p.enqueued, infer_s, largest, len(calls),
                                                 self.metrics.version))
        # What a row costs the instance, merge and split included: what the queue waits for.
        per_row = (input_s + infer_s + output_s) / rows
        self._row_seconds = 0.9 * self._row_seconds + 0.1 * per_row if self._row_seconds else per_row
        if self.policy.max_queue_wait_s > 0:
            self.metrics.wait_bound.set(self.wait_bound_s)
        for call_rows, seconds in calls:
            self.metrics.compute.observe(seconds)
            self.metrics.batch_size.observe(call_rows)
        if padding is not None:
            self.metrics.padding.observe(padding)
        self.stats.calls(calls, len(batch), input_s, output_s)

    def _trace(self, batch: list[_Pending], results: list[dict[str, np.ndarray] | Exception],
               start: float, end: float, rows: int, padding: float | None, calls: int,
               instance: int) -> None:
        """Hand the batch's times and shape to the traces of the requests it served."""
        # A request cancelled meanwhile has ended already: it waits for no batch span.
        traced = [(p.trace, p.enqueued) for p in batch if p.trace is not None and not p.future.done()]
        if not traced:
            return
        m = self.metrics
        attributes: dict[str, int | float | str] = {
            "batch.size": rows, "batch.requests": len(batch), "batch.calls": calls,
            "neuroserve.model": m.model, "neuroserve.model.version": m.version,
            "neuroserve.provider": m.provider, "neuroserve.instance": instance}
        if padding is not None:
            attributes["batch.padding_ratio"] = padding
        failed = any(isinstance(r, BaseException) for r in results)
        tracing.batch_computed(traced, start, end, failed, attributes)

    def _compute_thread(self, loop: asyncio.AbstractEventLoop, jobs: queue.SimpleQueue[_Job | None],
                        instance: int) -> None:
        """One long-lived thread per instance: takes a batch, computes it, hands the result back.

        Cheaper than an executor per batch (no work item, no concurrent future chained to an
        asyncio one): one queue put from the loop and one `call_soon_threadsafe` back.
        """
        while (job := jobs.get()) is not None:
            batch, done = job
            try:
                outcome = self._compute(batch, instance)
            except BaseException as e:  # handed to the task awaiting this batch
                callback, arg = _fail, e
            else:
                callback, arg = _resolve, outcome
            try:
                loop.call_soon_threadsafe(callback, done, arg)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                return

    def _compute(
        self, batch: list[_Pending], instance: int
    ) -> _Computed:
        """Runs in the instance's compute thread: merge, ORT call(s), split (ORT releases the GIL)."""
        t0 = perf_counter()
        if any(p.deadline is not None and t0 >= p.deadline for p in batch):
            return self._shed_late(batch, instance, t0)
        try:
            feeds, padding = self._merge(batch)
        except Exception as e:  # inconsistent shapes the codec let through
            return [e] * len(batch), t0, (perf_counter() - t0, 0.0), None, []
        t1 = perf_counter()
        rows = sum(p.rows for p in batch)
        calls: list[tuple[int, float]] = []
        try:
            named = self._run_in_batches(instance, feeds, rows, calls)
        except Exception as e:  # the failed call counts too, with the rows it was given
            done = sum(n for n, _ in calls)
            calls.append((min(self.policy.max_batch_size, rows - done),
                          perf_counter() - t1 - sum(seconds for _, seconds in calls)))
            if len(batch) == 1:
                return [e], t0, (t1 - t0, 0.0), padding, calls
            # One bad request must not fail its neighbours: run each alone to find it.
            return [self._run_alone(p, instance) for p in batch], t0, (t1 - t0, 0.0), padding, calls
        t2 = perf_counter()
        if len(batch) == 1:
            results: list[dict[str, np.ndarray] | Exception] = [named]
        else:
            results, offset = [], 0
            for p in batch:
                results.append({k: v[offset:offset + p.rows] for k, v in named.items()})
                offset += p.rows
        self._monitor_rows(batch, feeds, named)
        return results, t0, (t1 - t0, perf_counter() - t2), padding, calls

    def _shed_late(self, batch: list[_Pending], instance: int, now: float) -> _Computed:
        """A batch handed ahead to a busy instance may hold requests whose deadline passed while it
        waited there: they are shed as the queue would have shed them, the others computed."""
        late = [p.deadline is not None and now >= p.deadline for p in batch]
        live = [p for p, shed in zip(batch, late, strict=True) if not shed]
        computed = self._compute(live, instance) if live else ([], now, (0.0, 0.0), None, [])
        outputs = iter(computed[0])
        results: list[dict[str, np.ndarray] | Exception] = [
            DeadlineExceeded(f"deadline passed after {(now - p.enqueued) * 1000:.1f} ms waiting for "
                             "compute; not computed") if shed else next(outputs)
            for p, shed in zip(batch, late, strict=True)]
        return (results, *computed[1:])

    def _run_in_batches(self, instance: int, feeds: dict[str, np.ndarray], rows: int,
                        calls: list[tuple[int, float]]) -> dict[str, np.ndarray]:
        """One ORT call, or one per `max_batch_size` rows for a request larger than a batch; each
        call's (rows, seconds) is appended to `calls`."""
        step = self.policy.max_batch_size
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, rows, step):
            n = min(step, rows - start)
            chunk = feeds if n == rows else {k: v[start:start + n] for k, v in feeds.items()}
            fill = self.policy.fixed_rows - n if self._variable is None else 0
            t = perf_counter()
            outs = self._run_fn(instance, _repeat_last_row(chunk, fill) if fill > 0 else chunk)
            calls.append((n, perf_counter() - t))
            named = dict(zip(self.output_names, outs, strict=True))
            parts.append({k: v[:n] for k, v in named.items()} if fill > 0 else named)
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([part[k] for part in parts]) for k in self.output_names}

    def _run_alone(self, p: _Pending, instance: int) -> dict[str, np.ndarray] | Exception:
        try:
            named = dict(zip(self.output_names, self._run_fn(instance, p.inputs), strict=True))
        except Exception as e:
            return e
        if p.monitored:
            self._monitor(p.inputs, named)
        return named

    def _monitor_rows(self, batch: list[_Pending], feeds: dict[str, np.ndarray],
                      outputs: dict[str, np.ndarray]) -> None:
        """Monitor the rows of the batch's monitored requests only."""
        if all(p.monitored for p in batch):
            self._monitor(feeds, outputs)
            return
        keep, offset = [], 0
        for p in batch:
            if p.monitored:
                keep.extend(range(offset, offset + p.rows))
            offset += p.rows
        if keep:
            index = np.asarray(keep)
            self._monitor({k: v[index] for k, v in feeds.items()}, {k: v[index] for k, v in outputs.items()})

    def _monitor(self, feeds: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        if self._observe is None:
            return
        try:
            self._observe(feeds, outputs)
        except Exception:  # monitoring must never cost a prediction
            log.exception("recording input/prediction metrics failed")

    def _merge(self, batch: list[_Pending]) -> tuple[dict[str, np.ndarray], float | None]:
        """One feed dict for the whole batch; also the padding ratio of the first padded input."""
        if len(batch) == 1:
            return batch[0].inputs, (0.0 if self._variable is not None else None)
        feeds: dict[str, np.ndarray] = {}
        padding = None
        total = sum(p.rows for p in batch)
        for layout in self.layouts:
            arrays = [p.inputs[layout.name] for p in batch]
            if not layout.variable_axes:
                feeds[layout.name] = np.concatenate(arrays)
                continue
            shape = (total, *(max(a.shape[ax] for a in arrays) for ax in range(1, arrays[0].ndim)))
            out = np.full(shape, layout.pad_value, dtype=arrays[0].dtype)
            offset = 0
            for a in arrays:
                out[(slice(offset, offset + len(a)), *(slice(0, d) for d in a.shape[1:]))] = a
                offset += len(a)
            feeds[layout.name] = out
            if padding is None:
                padding = 1.0 - sum(a.size for a in arrays) / out.size
        return feeds, padding


def _repeat_last_row(feeds: dict[str, np.ndarray], extra: int) -> dict[str, np.ndarray]:
    # A copy of a real row, not zeros: always a valid input (zeros can be out of a model's domain).
    return {k: np.concatenate([v, np.repeat(v[-1:], extra, axis=0)]) for k, v in feeds.items()}
