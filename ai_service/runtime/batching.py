"""Micro-batching: requests for one model that arrive together share one ONNX Runtime call.

Model objects stay synchronous (``encode_image``, ``encode_text``, ``embed``) and are called from the
inference thread pool, one request per thread. An encoder with a :class:`MicroBatcher` preprocesses
its input in the caller's thread, then hands the tensor to the batcher, which

* queues it; the first caller that finds nobody collecting becomes the *collector*. On an idle model
  (nothing running, nothing else queued) it runs the lone request at once: waiting could only add
  latency, and requests that arrive meanwhile queue up and form the next batch. Otherwise it waits
  until the queue holds ``max_size`` items or until ``wait_s`` has passed since the **oldest** queued
  item arrived, whichever comes first, so no request is held longer than ``wait_s`` for company;
* takes up to ``max_size`` items (by weight: an ArcFace item weighs its number of faces) off the
  queue and runs them as one batch **in its own thread** (no extra threads to manage or leak: when
  the cache drops a model, nothing else keeps it alive);
* hands every item its own row (or its own exception); the caller then post-processes only its row,
  so a zero or non-finite embedding fails only the request it belongs to.

At most ``concurrency`` batches of one model run at once. Items that arrive while that many are
running wait in the queue and form the next batch as soon as one finishes; since the oldest of
them has usually waited ``wait_s`` already, that batch starts at once.

When a batch as a whole raises (e.g. one request's tokens are out of the model's vocabulary, or the
GPU runs out of memory for the full batch), every item of it is run again on its own, so only the
items that fail alone fail, with the exception they raise alone: batching never changes what a
request gets back, only when.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

# Defaults shared by the settings and direct users (tests, benchmarks).
DEFAULT_WAIT_MS = 2.0
DEFAULT_MAX_SIZE = 16


@dataclass(frozen=True, slots=True)
class BatchOptions:
    """How models opened with these options batch concurrent requests (``AI_SERVICE_BATCH_*``)."""

    # True / False force it; None (auto) batches models whose session runs on a GPU provider only. On CPUs
    # batching measured neutral to harmful (ViT-B/16 on 2 cores: 101 ms per image alone, 135-184 ms in
    # batches of 8-16; ArcFace R50 +8-24 % at 8-32 concurrent requests): see bench/bench_batching.py.
    # Off by default here so that direct users of the encoders opt in; the service's default is auto.
    enabled: bool | None = False
    max_size: int = DEFAULT_MAX_SIZE  # most items (faces, for ArcFace) per ONNX Runtime call
    wait_ms: float = DEFAULT_WAIT_MS  # longest time the oldest queued item waits for company
    concurrency: int = 0  # batches of one model running at once; 0: auto (see resolve_concurrency)

    def __post_init__(self) -> None:
        if self.max_size < 1:
            raise ValueError("max_size must be >= 1")
        if self.wait_ms < 0:
            raise ValueError("wait_ms must be >= 0")
        if self.concurrency < 0:
            raise ValueError("concurrency must be >= 0")


@dataclass(frozen=True, slots=True)
class BatchStats:
    batches: int  # ONNX Runtime calls made for batches (a split-up failed batch counts once)
    items: int  # items answered
    largest: int  # most items in one batch
    split: int  # batches that raised and were re-run item by item


class _Pending(Generic[ItemT, ResultT]):
    __slots__ = ("done", "enqueued", "error", "item", "result", "weight")

    def __init__(self, item: ItemT, weight: int) -> None:
        self.item = item
        self.weight = weight
        self.enqueued = time.monotonic()
        self.done = False
        self.result: ResultT | None = None
        self.error: BaseException | None = None


class MicroBatcher(Generic[ItemT, ResultT]):
    """Collects concurrent :meth:`submit` calls into batches for ``run_batch``.

    ``run_batch(items)`` must return one result per item, in order. ``weight(item)`` (default 1)
    counts an item against ``max_size``; an item heavier than ``max_size`` is run alone.
    """

    def __init__(
        self,
        run_batch: Callable[[list[ItemT]], Sequence[ResultT]],
        *,
        max_size: int = DEFAULT_MAX_SIZE,
        wait_s: float = DEFAULT_WAIT_MS / 1000,
        concurrency: int = 1,
        weight: Callable[[ItemT], int] | None = None,
        name: str = "model",
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        if wait_s < 0:
            raise ValueError("wait_s must be >= 0")
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.run_batch = run_batch
        self.max_size = max_size
        self.wait_s = wait_s
        self.concurrency = concurrency
        self.name = name
        self._weight = weight
        self._cond = threading.Condition()
        self._queue: deque[_Pending[ItemT, ResultT]] = deque()
        self._queued_weight = 0
        self._collecting = False
        self._running = 0
        self._batches = 0
        self._items = 0
        self._largest = 0
        self._split = 0

    def queued(self) -> int:
        """Items waiting for a batch (not counting those in batches that are running)."""
        with self._cond:
            return len(self._queue)

    def stats(self) -> BatchStats:
        with self._cond:
            return BatchStats(self._batches, self._items, self._largest, self._split)

    def submit(self, item: ItemT) -> ResultT:
        """Run ``item`` as part of a batch; blocks until its result is there. Raises what the item raised."""
        pending: _Pending[ItemT, ResultT] = _Pending(item, max(1, self._weight(item)) if self._weight else 1)
        with self._cond:
            self._queue.append(pending)
            self._queued_weight += pending.weight
            if self._collecting and self._queued_weight >= self.max_size:
                self._cond.notify_all()  # the collector's batch is full: no reason to wait longer
            while not pending.done:
                if not self._collecting and self._running < self.concurrency and self._queue:
                    self._collect_and_run()
                else:
                    self._cond.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result  # type: ignore[return-value]

    # ---- the collector (called with the lock held; returns with it held) -----------------------------

    def _collect_and_run(self) -> None:
        self._collecting = True
        try:
            idle = self._running == 0 and len(self._queue) == 1
            deadline = self._queue[0].enqueued + (0.0 if idle else self.wait_s)
            while self._queued_weight < self.max_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch = self._take()
        finally:
            self._collecting = False
        self._running += 1
        self._cond.notify_all()  # another waiter may start collecting the next batch right away
        self._cond.release()
        outcomes: list[tuple[ResultT | None, BaseException | None]] | None = None
        try:
            outcomes = self._execute(batch)
        finally:
            self._cond.acquire()
            self._running -= 1
            if outcomes is None:
                # Only a BaseException (KeyboardInterrupt, SystemExit) gets here; it propagates in this
                # thread, but the other items' owners must not wait forever for results that never come.
                interrupted = RuntimeError(f"{self.name}: the batch was interrupted")
                outcomes = [(None, interrupted)] * len(batch)
            for pending, (result, error) in zip(batch, outcomes, strict=True):
                pending.result, pending.error, pending.done = result, error, True
            self._batches += 1
            self._items += len(batch)
            self._largest = max(self._largest, len(batch))
            self._cond.notify_all()  # wake the owners of the finished items, and a possible next collector

    def _take(self) -> list[_Pending[ItemT, ResultT]]:
        first = self._queue.popleft()
        batch, total = [first], first.weight
        while self._queue and total + self._queue[0].weight <= self.max_size:
            nxt = self._queue.popleft()
            batch.append(nxt)
            total += nxt.weight
        self._queued_weight -= total
        return batch

    # ---- running (without the lock) ------------------------------------------------------------------

    def _execute(self, batch: list[_Pending[ItemT, ResultT]]) -> list[tuple[ResultT | None, BaseException | None]]:
        items = [p.item for p in batch]
        try:
            results = self.run_batch(items)
            if len(results) != len(items):
                raise RuntimeError(f"{self.name}: a batch of {len(items)} gave {len(results)} results")
            return [(r, None) for r in results]
        except Exception as exc:
            if len(items) == 1:
                return [(None, exc)]
            with self._cond:
                self._split += 1
            log.warning(
                "%s: a batch of %d failed (%s: %s); running its items one by one",
                self.name,
                len(items),
                type(exc).__name__,
                exc,
            )
        outcomes: list[tuple[ResultT | None, BaseException | None]] = []
        for item in items:
            try:
                (result,) = self.run_batch([item])
                outcomes.append((result, None))
            except Exception as exc:
                outcomes.append((None, exc))
        return outcomes


# ---- what the encoders call -------------------------------------------------------------------------


def on_gpu(session: ort.InferenceSession) -> bool:
    """Whether the session's first execution provider is an accelerator (anything but the CPU provider)."""
    providers = session.get_providers()
    return bool(providers) and providers[0] != "CPUExecutionProvider"


def resolve_concurrency(configured: int, session: ort.InferenceSession) -> int:
    """Batches of one model allowed to run at once.

    ``configured`` > 0 wins. Auto: 1 on a GPU (batches are what a GPU is fast at; a second run in
    parallel only competes for the same device), else enough runs to keep the cores busy: cores
    divided by the session's intra-op threads (2 cores, 2 threads: 1; 16 cores, 4 threads: 4), so a
    batcher never leaves cores idle that unbatched concurrent requests would have used.
    """
    if configured > 0:
        return configured
    if on_gpu(session):
        return 1
    threads = session.get_session_options().intra_op_num_threads or 1
    return max(1, (os.cpu_count() or 1) // max(1, threads))


def make_batcher(
    options: BatchOptions,
    session: ort.InferenceSession,
    run_batch: Callable[[list[ItemT]], Sequence[ResultT]],
    *,
    fixed_batch: int | None,
    name: str,
    weight: Callable[[ItemT], int] | None = None,
) -> MicroBatcher[ItemT, ResultT] | None:
    """A batcher for a model, or None when batching is off (or auto, on a CPU) or pointless.

    ``fixed_batch``: the graph's batch axis when it is a constant. A model exported with batch size 1
    can only ever run one item per call, so it is served per item, exactly as without batching.
    """
    enabled = options.enabled if options.enabled is not None else on_gpu(session)
    if not enabled or options.max_size <= 1 or fixed_batch == 1:
        return None
    return MicroBatcher(
        run_batch,
        max_size=options.max_size,
        wait_s=options.wait_ms / 1000,
        concurrency=resolve_concurrency(options.concurrency, session),
        weight=weight,
        name=name,
    )
