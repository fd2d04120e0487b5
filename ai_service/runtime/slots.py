"""Which worker process this is: one of N lock files that it can ``flock``, held for its life.

uvicorn starts the worker processes (``workers=N``), shares the listening socket between them and restarts
one that dies; it has no notion of a worker's index, so each process claims one itself: the first of N lock
files, in a folder the parent created, that it can ``flock``. The lock is held for the life of the process
and released by the kernel when it exits, so a restarted worker takes over the slot (and the GPU) of the one
that died. A process that never claimed a slot (one worker, the gateway's in-process models, tests) is slot 0.

Kept apart from :mod:`ai_service.runtime.workers` (which builds the app) because the settings read the slot:
settings -> slots, workers -> app -> settings, and no way back.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

_slot = 0
_lock_fd: int | None = None


def worker_slot() -> int:
    """This process's worker index (0 unless it claimed another)."""
    return _slot


def claim_slot(directory: Path, count: int) -> int:
    """Take the lowest free slot in ``directory`` (0 .. count-1) for the rest of this process's life."""
    import fcntl  # POSIX only; imported here so that merely importing this module works everywhere

    global _slot, _lock_fd
    for index in range(count):
        fd = os.open(directory / f"worker-{index}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        if _lock_fd is not None:
            os.close(_lock_fd)
        _slot, _lock_fd = index, fd
        return index
    # Every slot is held: a restarted worker can start before its predecessor has fully exited. Sharing a
    # slot (and a GPU) for a while is better than not serving at all.
    _slot = os.getpid() % count
    log.warning("all %d worker slots are taken; this worker (pid %d) shares slot %d", count, os.getpid(), _slot)
    return _slot
