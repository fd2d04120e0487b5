"""Several ``python -m ai_service`` worker processes on one port, each with its own GPU.

uvicorn starts the processes (``workers=N``), shares the listening socket between them and restarts
one that dies; it has no notion of a worker's index, so each process claims one itself: the first of
N lock files, in a folder the parent created, that it can ``flock``. The lock is held for the life of
the process and released by the kernel when it exits, so a restarted worker takes over the slot (and
the GPU) of the one that died. Worker ``i`` uses ``AI_SERVICE_DEVICE_IDS[i % len]``.

A process that never claimed a slot (one worker, the gateway's in-process models, tests) is slot 0.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ai_service.settings import AIServiceSettings

log = logging.getLogger(__name__)

# Set by the parent for its workers only; an implementation detail, not a user setting.
SLOT_DIR_ENV = "IMMICH_ZH_AI_WORKER_SLOT_DIR"

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


def configure_logging(settings: AIServiceSettings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def create_worker_app() -> FastAPI:
    """uvicorn's app factory in each worker process: claim a slot, pick the GPU, build the app."""
    from ai_service.app import create_app
    from ai_service.settings import AIServiceSettings

    settings = AIServiceSettings()
    configure_logging(settings)  # worker processes are spawned fresh: nothing of the parent's logging is left
    directory = os.environ.get(SLOT_DIR_ENV)
    if directory:
        claim_slot(Path(directory), settings.workers)
    log.info(
        "worker %d of %d (pid %d) uses GPU device %d when CUDA is available",
        worker_slot(),
        settings.workers,
        os.getpid(),
        settings.effective_device_id(),
    )
    return create_app(settings)


def serve_workers(settings: AIServiceSettings) -> int:
    """Run ``settings.workers`` processes on ``settings.host:settings.port`` until stopped."""
    import uvicorn

    from ai_service.runtime.http_server import uvicorn_http

    with tempfile.TemporaryDirectory(prefix="ai-service-workers-") as slots:
        # Workers inherit the environment: that is how they find the slot folder and their settings.
        os.environ[SLOT_DIR_ENV] = slots
        uvicorn.run(
            f"{__name__}:create_worker_app",
            factory=True,
            workers=settings.workers,
            host=settings.host,
            port=settings.port,
            # Pickled into each worker process: a partial of a module-level class travels by reference.
            http=uvicorn_http(settings.http),  # type: ignore[arg-type]
            log_level=settings.log_level.lower(),
            timeout_graceful_shutdown=30,
        )
    return 0
