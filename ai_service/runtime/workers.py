"""Several ``python -m ai_service`` worker processes on one port, each with its own GPU.

Each process claims a worker slot (:mod:`ai_service.runtime.slots`) and uses ``AI_SERVICE_DEVICE_IDS[i % len]``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from fastapi import FastAPI

from ai_service.app import create_app
from ai_service.runtime.slots import claim_slot, worker_slot
from ai_service.settings import AIServiceSettings

log = logging.getLogger(__name__)

# Set by the parent for its workers only; an implementation detail, not a user setting.
SLOT_DIR_ENV = "IMMICH_ZH_AI_WORKER_SLOT_DIR"


def configure_logging(settings: AIServiceSettings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def create_worker_app() -> FastAPI:
    """uvicorn's app factory in each worker process: claim a slot, pick the GPU, build the app."""
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
