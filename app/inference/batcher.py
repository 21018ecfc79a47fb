"""Dynamic batching: one queue and one inference thread per ONNX Runtime graph.

Why: one ``session.run`` per request wastes the CPU on per-call overhead and, with a thread pool
calling ``run`` concurrently, oversubscribes the cores (measured in ``../shared/FIELD-NOTES.md``:
two concurrent callers with 2 intra-op threads each lose 10 % throughput and double p95 against
two callers with 1 thread each). Here every graph has exactly one thread calling ``run``, and
requests that arrive while it is busy are merged into the next call.

The rule is Triton's dynamic batcher: a batch goes as soon as it holds ``max_batch_size`` rows,
or when the oldest queued request has waited ``max_queue_delay_s`` (0: take what is queued now,
so an idle server adds no delay). A request carrying several rows (a client batch) is never
split; one larger than ``max_batch_size`` runs alone.

The queue is bounded (``max_queue_size`` requests) and, with ``max_queue_wait_s``, in time: when it
is full, or when the rows already queued would keep a new request waiting longer than
``max_queue_wait_s`` at the measured time per row, :meth:`GraphBatcher.submit` raises
:class:`~app.core.errors.OverloadedError` at once (503 + ``Retry-After``) instead of letting latency
grow without bound. A bound in requests alone suits one machine: 128 queued images kept admitted
requests waiting 1-2.5 s on 2 CPU cores under overload (``benchmarks/overload.py``), and would be a
fraction of that on a GPU. The time bound is Triton's queue-policy timeout, applied at admission
instead of after the wait.
A request whose awaiting task is cancelled while it is still queued
(client gone, request timeout) is removed from the queue and never run, so its slot frees up.

Results go back to the caller's event loop with ``loop.call_soon_threadsafe``; the event loop
never blocks on inference.

``instances`` (Triton's ``instance_group`` count) gives a graph more than one inference thread on the
same queue: while one batch runs, the next one starts instead of waiting. Instance 0 takes every batch
it can; the others are *overflow* instances that take a batch only while another one is running, so a
light load runs on instance 0 alone. :meth:`current_instance` and :attr:`running_batches` let the
batch function pick a session: the image encoder runs a batch that is alone on a session with every
thread, and batches that run side by side on one-thread sessions (``Settings.image_encoder_instances``,
measured there).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from app.core import metrics
from app.core.errors import NotReadyError, OverloadedError

log = logging.getLogger("mmfusion.batcher")

P = TypeVar("P")  # what one request submits (its rows)
R = TypeVar("R")  # what one request gets back

# ``run_batch(payloads) -> one result per payload``, called on the graph's inference thread.
BatchFn = Callable[[Sequence[P]], Sequence[R]]


@dataclass(frozen=True)
class BatchingConfig:
    """The three knobs of Triton's dynamic batcher (``MMFUSION_MAX_*`` settings)."""

    max_batch_size: int = 32
    max_queue_delay_s: float = 0.0
    max_queue_size: int = 256
    max_queue_wait_s: float = 0.0
    """Refuse a request the queued rows would keep waiting longer than this (0: no bound in time)."""
    idle_s: float = 2.0
    """Empty-queue time after a batch that counts as idle (``on_idle`` housekeeping runs then): long
    enough that a closed-loop load never looks idle between its batches."""

    def __post_init__(self) -> None:
        times = (self.max_queue_delay_s, self.max_queue_wait_s, self.idle_s)
        if (self.max_batch_size < 1 or self.max_queue_size < 1 or self.max_queue_delay_s < 0
                or self.max_queue_wait_s < 0 or self.idle_s <= 0 or not all(map(math.isfinite, times))):
            raise ValueError(f"invalid batching config {self}")


@dataclass(eq=False)
class _Entry(Generic[P, R]):
    # repr=False: a repr of an image payload (a numpy array) costs milliseconds on the event loop
    payload: P = field(repr=False)
    rows: int
    future: asyncio.Future[R] = field(repr=False)
    loop: asyncio.AbstractEventLoop = field(repr=False)
    enqueued: float = field(default_factory=time.perf_counter)
    taken: bool = False
    """Taken into a batch (under the batcher's lock): no longer in the queue."""


def _deliver(future: asyncio.Future[R], result: R | None, error: BaseException | None) -> None:
    """Runs on the caller's loop: a future cancelled meanwhile simply keeps its cancellation."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]


def _answer(entry: _Entry[P, R], result: R | None, error: BaseException | None) -> None:
    """Hand ``entry``'s outcome to its caller's event loop, from an inference thread."""
    with contextlib.suppress(RuntimeError):  # the caller's loop is already closed
        entry.loop.call_soon_threadsafe(_deliver, entry.future, result, error)


class GraphBatcher(Generic[P, R]):
    """A bounded request queue in front of one graph, drained by its own inference thread."""

    def __init__(self, name: str, run_batch: BatchFn[P, R], config: BatchingConfig,
                 on_idle: Callable[[], None] | None = None, instances: int = 1):
        """``on_idle`` runs on an inference thread once the queue has stayed empty for
        ``config.idle_s`` after a batch (housekeeping that must not slow a busy graph, e.g.
        shrinking its memory arena). ``instances``: inference threads draining the queue
        (``run_batch`` must then be safe to call concurrently, as ONNX Runtime sessions are)."""
        if instances < 1:
            raise ValueError(f"{name}: instances must be >= 1, got {instances}")
        self.name = name
        self.config = config
        self._run_batch = run_batch
        self._on_idle = on_idle
        self._idle_due = False  # a batch ran since on_idle last did
        self._queue: deque[_Entry[P, R]] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self.failure: str | None = None  # why an inference thread died (a bug): the service is then not alive
        self._row_s = 0.0  # exponential average of run time per row: the queue's time bound and Retry-After
        self._running_rows = 0  # rows of the batches being run now (all instances)
        self._running_batches = 0  # batches being run now (one per busy instance)
        # Rows queued, kept as a count (under _cond) so that refuse_if_full, called from the event loop
        # without the lock, never iterates a deque an inference thread is popping from.
        self._queued_rows = 0
        self._instance = threading.local()
        self._threads = [
            threading.Thread(target=self._loop, args=(i,), name=f"infer-{name}" + (f"-{i}" if i else ""),
                             daemon=True)
            for i in range(instances)
        ]
        self._depth = metrics.QUEUE_DEPTH.labels(name)
        self._depth.set(0)
        for thread in self._threads:
            thread.start()

    # -- caller side (event loop) ---------------------------------------------------------
    @property
    def instances(self) -> int:
        """Inference threads draining this queue."""
        return len(self._threads)

    @property
    def alive(self) -> bool:
        """Every inference thread is running (or has stopped because of :meth:`close`). A thread that died
        of a bug leaves requests waiting for their deadline; /livez reports it so the process is replaced."""
        return self.failure is None

    @property
    def running_batches(self) -> int:
        """Batches being run now, counting the caller's own when asked from a batch function."""
        return self._running_batches

    def current_instance(self) -> int:
        """The instance (0 .. instances-1) of the inference thread calling; 0 off those threads."""
        return int(getattr(self._instance, "index", 0))

    @property
    def depth(self) -> int:
        """Requests queued and not yet taken into a batch."""
        return len(self._queue)

    def retry_after_s(self, extra_rows: int = 0) -> int:
        """Seconds until the work queued now has probably drained (at least 1): what a 503 tells clients.
        The same estimate as admission's (:meth:`expected_wait_s`), so a client that waits as told comes
        back once the work ahead of it has drained; it replaced a second estimate (queued requests / batch
        size x batch time) that could disagree with the one that refused."""
        return max(1, math.ceil(self.expected_wait_s(extra_rows)))

    def expected_wait_s(self, extra_rows: int = 0) -> float:
        """How long a request queued now would wait: the rows queued ahead of it (plus ``extra_rows``
        on their way here) and the batches running, at the measured time per row (0 before the first
        batch has been timed). Running batches count in full, so the estimate errs long."""
        rows = self._queued_rows + extra_rows + self._running_rows
        return rows * self._row_s / len(self._threads)

    def refuse_if_full(self, extra_rows: int = 0) -> None:
        """Raise :class:`OverloadedError` (counted as rejected) when the queue is full, in requests or
        in time: :meth:`submit`'s own check, callable earlier so that no costly work (an image decode)
        is spent on a request the queue would refuse anyway. ``extra_rows``: rows that will join the
        queue before this request (images still being decoded)."""
        cfg = self.config
        if self.depth >= cfg.max_queue_size:
            metrics.REJECTED.labels(self.name, "queue_full").inc()
            raise OverloadedError(
                f"the {self.name} queue is full ({cfg.max_queue_size} requests waiting); retry shortly",
                retry_after_s=self.retry_after_s(extra_rows),
            )
        # Only with something queued ahead: a request may always wait behind the batches running,
        # or a batch slower than the bound would refuse every request of an idle queue.
        if (cfg.max_queue_wait_s > 0 and (self._queued_rows or extra_rows)
                and (wait := self.expected_wait_s(extra_rows)) > cfg.max_queue_wait_s):
            metrics.REJECTED.labels(self.name, "queue_wait").inc()
            raise OverloadedError(
                f"the {self.name} queue holds ~{wait * 1000:.0f} ms of work, more than MMFUSION_MAX_QUEUE_WAIT_MS "
                f"({cfg.max_queue_wait_s * 1000:.0f} ms); retry shortly",
                retry_after_s=self.retry_after_s(extra_rows),
            )

    async def submit(self, payload: P, rows: int = 1) -> R:
        """Queue ``payload`` (``rows`` rows of the batch axis) and wait for its result.

        Raises :class:`OverloadedError` at once when the queue is full, :class:`NotReadyError`
        after :meth:`close`, and whatever ``run_batch`` raised for the batch this request was in.
        """
        loop = asyncio.get_running_loop()
        entry: _Entry[P, R] = _Entry(payload, max(1, rows), loop.create_future(), loop)
        with self._cond:
            if self._closing:
                raise NotReadyError("the server is shutting down", retry_after_s=1)
            if self.failure is not None:
                raise self._not_running()
            self.refuse_if_full()
            self._queue.append(entry)
            self._queued_rows += entry.rows
            self._depth.inc()
            # With overflow instances the one woken might have to go back to waiting: every thread looks.
            if len(self._threads) == 1:
                self._cond.notify()
            else:
                self._cond.notify_all()
        try:
            return await entry.future
        except asyncio.CancelledError:
            self._discard(entry)
            raise

    def _discard(self, entry: _Entry[P, R]) -> None:
        """Drop a cancelled request that no batch has taken yet (its slot frees up at once)."""
        with self._cond:
            # Not deque.remove's ValueError for a taken entry: it formats the entry's repr, and that
            # cost 10 % of the event loop under a 4x storm (classify's text side, cancelled when its
            # image side was refused, had usually been taken already; py-spy, benchmarks/overload.py).
            if entry.taken:
                return  # already taken into a batch: it runs, its result is dropped
            self._queue.remove(entry)
            self._queued_rows -= entry.rows
            self._depth.dec()
            metrics.CANCELLED.labels(self.name).inc()
            self._cond.notify()

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop accepting requests, run everything already queued (no delay), then stop the threads."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():  # pragma: no cover - a graph call hung for 30 s
                log.error("%s did not stop within %.0fs", thread.name, timeout_s)

    # -- inference thread -----------------------------------------------------------------
    def _take_batch(self, instance: int = 0) -> list[_Entry[P, R]] | None:
        """Block until a batch is due (Triton's rule) and take it; None once closed and drained,
        ``[]`` when the queue stayed empty for ``idle_s`` after a batch (time for ``on_idle``).
        ``instance``: which inference thread asks; an overflow instance (> 0) takes a batch only while
        another instance runs one."""
        cfg = self.config
        with self._cond:
            while True:
                while instance and not self._closing and (not self._queue or self._running_batches == 0):
                    self._cond.wait()  # an overflow instance works only behind a busy one
                while not self._queue and not self._closing:
                    if self._idle_due and self._on_idle is not None:
                        # Not while another instance still runs a batch on the same session: the
                        # housekeeping (an arena shrink) would land in the middle of the load.
                        if (not self._cond.wait(cfg.idle_s) and not self._queue and not self._closing
                                and self._idle_due and self._running_rows == 0):  # or another instance did it
                            self._idle_due = False
                            return []
                    else:
                        self._cond.wait()
                if not self._queue:
                    return None  # closing, nothing left
                deadline = self._queue[0].enqueued + cfg.max_queue_delay_s
                while not self._closing:
                    if self._queued_rows >= cfg.max_batch_size:
                        break
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0 or not self._queue:
                        break
                    self._cond.wait(remaining)
                if not self._queue:
                    continue  # everything queued was cancelled while we waited
                batch = [self._queue.popleft()]
                rows = batch[0].rows
                while self._queue and rows + self._queue[0].rows <= cfg.max_batch_size:
                    entry = self._queue.popleft()
                    batch.append(entry)
                    rows += entry.rows
                for entry in batch:
                    entry.taken = True
                self._depth.dec(len(batch))
                self._queued_rows -= rows
                self._running_rows += rows
                self._running_batches += 1
                if len(self._threads) > 1:
                    self._cond.notify_all()  # an overflow instance may now take what is still queued
                return batch

    def _loop(self, instance: int = 0) -> None:
        """The thread's body: :meth:`_serve`, and if that ever raises (a bug: graph errors are caught per
        batch), a logged traceback, the batch it held and every queued request failed at once instead of
        at their deadline (never, with no deadline), and :attr:`alive` False."""
        try:
            self._serve(instance)
        except BaseException as exc:
            log.exception("%s: inference thread %d died; queued requests fail and /livez reports it",
                          self.name, instance)
            with self._cond:
                self.failure = f"{type(exc).__name__} in inference thread {instance}"
                error = self._not_running()
                held: list[_Entry[P, R]] = getattr(self._instance, "batch", None) or []
                if held:  # taken and counted as running, never delivered
                    self._running_rows -= sum(e.rows for e in held)
                    self._running_batches -= 1
                for entry in held:  # _deliver skips futures already done
                    _answer(entry, None, error)
                while self._queue:
                    entry = self._queue.popleft()
                    self._queued_rows -= entry.rows
                    self._depth.dec()
                    _answer(entry, None, error)
                self._cond.notify_all()

    def _not_running(self) -> NotReadyError:
        return NotReadyError(f"{self.name} is not running ({self.failure}); the process needs a restart",
                             retry_after_s=5)

    def _serve(self, instance: int) -> None:
        self._instance.index = instance
        while True:
            batch = self._take_batch(instance)
            if batch is None:
                return
            if not batch:
                try:
                    self._on_idle()  # type: ignore[misc]
                except Exception:  # housekeeping must never stop the inference thread
                    log.exception("%s idle housekeeping failed", self.name)
                continue
            self._instance.batch = batch  # what the failure handler of _loop must answer if this thread dies
            self._idle_due = True
            started = time.perf_counter()
            wait = metrics.QUEUE_WAIT.labels(self.name)
            for entry in batch:
                wait.observe(started - entry.enqueued)
            outcomes, per_row = self._run(batch)
            rows = sum(e.rows for e in batch)
            with self._cond:
                self._running_rows -= rows
                self._running_batches -= 1
                self._instance.batch = None
            if per_row is not None:  # failures are quick and would make the queue look faster than it is
                self._row_s = per_row if self._row_s <= 0 else 0.8 * self._row_s + 0.2 * per_row
            for entry, (result, error) in zip(batch, outcomes, strict=True):
                _answer(entry, result, error)

    def _call_graph(self, batch: list[_Entry[P, R]]) -> tuple[list[R], float]:
        started = time.perf_counter()
        results = self._run_batch([e.payload for e in batch])
        if len(results) != len(batch):
            raise RuntimeError(f"{self.name}: {len(results)} results for {len(batch)} requests")
        return results, (time.perf_counter() - started) / sum(e.rows for e in batch)

    def _run(self, batch: list[_Entry[P, R]]
             ) -> tuple[list[tuple[R | None, BaseException | None]], float | None]:
        """Each request's (result, error), and the seconds per row of a call that succeeded (None if none did).

        A batch of several requests that fails is retried one request at a time: the requests merged
        into one call are unrelated, and one that cannot run (or a merged batch too large for memory)
        must not fail the others with it."""
        try:
            results, per_row = self._call_graph(batch)
            return [(r, None) for r in results], per_row
        except BaseException as exc:
            if len(batch) == 1:
                log.exception("%s request failed", self.name)
                return [(None, exc)], None
            # With its traceback: a failure that only merged batches show (padding, concatenation) is a
            # bug to fix, not only a request to retry.
            log.warning("%s batch of %d requests failed; running them one at a time", self.name, len(batch),
                        exc_info=True)
            metrics.BATCH_RETRIES.labels(self.name).inc()
        outcomes: list[tuple[R | None, BaseException | None]] = []
        per_row = None
        for entry in batch:
            if entry.future.done():  # its caller is gone (cancelled, past its deadline): nothing to retry for
                outcomes.append((None, None))
                continue
            try:
                (result,), per_row = self._call_graph([entry])
                outcomes.append((result, None))
            except BaseException as exc:
                log.warning("%s request failed alone too: %s: %s", self.name, type(exc).__name__, exc)
                outcomes.append((None, exc))
        return outcomes, per_row
