"""Celery workers over Redis: ``celery -A library.worker worker`` (LIBRARY_BROKER_URL set, same
LIBRARY_DATABASE_URL as the API).

The ``step`` table stays the only record of what is to be done: a task carries no item, it *drains* the
table (claims due steps with SKIP LOCKED and a lease, runs them, records the outcome), then hands over to a
successor task -- at once when there may be more, later when only back-off retries are waiting. So
duplicate, lost or redelivered messages can neither lose work nor do it twice: a killed worker's claims are
released by the next worker that starts on the same machine, or taken over when their lease expires, and
its unacknowledged task is redelivered (acks_late). Inference runs inside the worker (library.inference).
"""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_ready

from library.celery_app import DRAIN_TASK, app
from library.service import Library
from library.settings import LibrarySettings

log = logging.getLogger(__name__)

_library: Library | None = None
_lock = threading.Lock()


def library() -> Library:
    """One Library per worker process, opened in the process that runs tasks (after the fork)."""
    global _library
    with _lock:
        if _library is None:
            _library = Library(LibrarySettings())
        return _library


def _next_due_s(lib: Library) -> float | None:
    with lib.db.conn() as conn:
        row = conn.execute(
            """SELECT extract(epoch FROM min(CASE WHEN state = 'pending' THEN next_attempt_at ELSE lease_until END)
                                 - now())
               FROM step WHERE state = 'pending' OR (state = 'running' AND lease_until IS NOT NULL)"""
        ).fetchone()
    return None if row is None or row[0] is None else max(float(row[0]), 0.0)


@app.task(name=DRAIN_TASK)
def drain() -> int:
    """Run up to ``celery_drain_batch`` due steps; schedule the successor task. Returns steps run."""
    lib = library()
    ran = 0
    while ran < lib.settings.celery_drain_batch and lib.pipeline.run_once():
        ran += 1
    if ran >= lib.settings.celery_drain_batch:
        drain.delay()
    else:
        wait = _next_due_s(lib)
        if wait is not None:
            # Only retries or steps held by other (busy or dead) workers are left: come back when one is due,
            # and at least every 30 s, when a dead worker's steps may be released (Pipeline.run_once).
            drain.apply_async(countdown=min(max(wait, 1.0), 30.0))
    return ran


@worker_ready.connect
def _kick(**_: object) -> None:
    """A (re)started worker looks for work at once: steps left behind by a killed worker included."""
    drain.delay()


__all__ = ["app", "drain"]
