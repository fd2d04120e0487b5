"""The Celery application of library mode: its broker and settings, and how producers start work.

Kept apart from the tasks (library/worker.py, which needs the whole library) so that the API and the CLI
can enqueue work without importing the worker side: ``celery -A library.worker worker`` runs the tasks.
"""

from __future__ import annotations

from celery import Celery

from library.settings import LibrarySettings

DRAIN_TASK = "library.drain"

_settings = LibrarySettings()
app = Celery(
    "library",
    broker=_settings.broker_url.get_secret_value() if _settings.broker_url else "redis://127.0.0.1:6379/0",
)
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


def enqueue(n: int = 1) -> None:
    """Producer side (API, CLI): new steps exist; start ``n`` drain tasks (by name: no worker code here)."""
    for _ in range(max(n, 1)):
        app.send_task(DRAIN_TASK)
