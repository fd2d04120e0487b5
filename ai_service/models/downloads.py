"""Download on first use, as Immich's ML service does: a request for a model that is not installed
fetches it from the configured hub, then is answered.

* **One download per model**, however many requests arrive together: the first starts it on this
  module's own thread pool (never an inference thread), the others wait on the same future. Across
  worker processes the store's install lock does the same job: a process that finds another one
  installing waits for that install instead of starting its own.
* **Bounded waits.** A request waits at most ``wait_s``; then it gets a 503 that says the model is
  downloading and how far it got, while the download goes on for the next request.
* **Failures are remembered briefly** (``retry_s``), so a hub that is down answers every request at
  once with the same clear 503 instead of each request trying again; after that the next request
  starts a fresh download. A cut download leaves nothing installed (the store installs atomically).
* **Progress** is the size of the install's staging folder, so it is right whatever downloads the
  files (huggingface_hub, a converter); it is logged while a download runs and shown by ``snapshot``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ai_service.errors import Unavailable
from ai_service.models.base import ModelError
from ai_service.models.store import INCOMING_DIR, InstallBusyError, ModelStore
from ai_service.protocol.immich import ModelTask

log = logging.getLogger(__name__)

PullFn = Callable[[str, ModelTask], Path]


class ModelDownloadingError(ModelError, Unavailable):
    """The model is being downloaded and was not ready within the request's wait."""


class ModelDownloadFailedError(ModelError, Unavailable):
    """The download failed; the message says why and how to install the model by hand."""


@dataclass(slots=True)
class Download:
    task: ModelTask
    name: str
    source: str
    started: float = field(default_factory=time.time)
    future: Future[Path] = field(default_factory=Future)
    finished: float | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.future.done()


def _folder_bytes(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
        except OSError:  # a file renamed or removed while we walk: the download is moving on
            continue
    return total


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


class ModelDownloader:
    def __init__(
        self,
        store: ModelStore,
        pull: PullFn,
        *,
        source: str,
        retry_s: float,
        progress_log_s: float = 10.0,
        busy_poll_s: float = 1.0,
    ) -> None:
        self.store = store
        self._pull = pull
        self.source = source  # where downloads come from, for messages (an endpoint URL)
        self.retry_s = retry_s
        self.progress_log_s = progress_log_s
        self.busy_poll_s = busy_poll_s
        self._downloads: dict[tuple[ModelTask, str], Download] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="model-download")
        self._closed = threading.Event()

    # ---- requests -------------------------------------------------------------------------------

    async def fetch(self, task: ModelTask, name: str, wait_s: float) -> None:
        """Make sure ``name`` gets installed; return once it is, or raise within ``wait_s`` seconds."""
        download = self.start(task, name)
        if download.done:
            self._raise_if_failed(download)
            return
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(download.future)), timeout=wait_s)
        except TimeoutError:
            raise ModelDownloadingError(
                f"{task} model '{name}' is being downloaded from {download.source} "
                f"({self._progress(download)}); it is not ready yet, try again shortly"
            ) from None
        except ModelError:
            pass  # the future's error is reported below, with the install hint
        self._raise_if_failed(download)

    def start(self, task: ModelTask, name: str) -> Download:
        """The download of ``name``: the one in flight, a recent failure, or a new one."""
        key = (task, name)
        with self._lock:
            current = self._downloads.get(key)
            if current is not None:
                recent_failure = current.error is not None and time.time() - (current.finished or 0) < self.retry_s
                if not current.done or recent_failure:
                    return current
            download = Download(task, name, self.source)
            self._downloads[key] = download
        log.info("downloading %s model %s from %s (first use)", task, name, download.source)
        self._executor.submit(self._run, download)
        return download

    def _raise_if_failed(self, download: Download) -> None:
        if download.error is not None:
            raise ModelDownloadFailedError(download.error)

    # ---- the download thread ----------------------------------------------------------------------

    def _run(self, download: Download) -> None:
        monitor = threading.Thread(target=self._log_progress, args=(download,), daemon=True)
        monitor.start()
        try:
            path = self._pull_once(download)
        except Exception as exc:
            if not isinstance(exc, ModelError):  # a converter or the hub client failing in an unforeseen way
                log.exception("download of %s model %s failed", download.task, download.name)
            reason = str(exc) if isinstance(exc, ModelError) else f"{type(exc).__name__}: {exc}"
            message = (
                f"could not download {download.task} model '{download.name}': {reason} A later request tries "
                f"again (after AI_SERVICE_AUTO_PULL_RETRY_S={self.retry_s:g}s), or install it by hand with "
                f"`python -m ai_service models pull {download.name}`."
            )
            self._finish(download, error=message)
            download.future.set_exception(ModelDownloadFailedError(message))
        else:
            self._finish(download)
            download.future.set_result(path)

    def _pull_once(self, download: Download) -> Path:
        """Pull, or wait for another process's install of the same model and use its result."""
        while True:
            try:
                return self._pull(download.name, download.task)
            except InstallBusyError:
                # Another worker process is installing it: wait for that install to end, use its result if
                # it succeeded, and pull ourselves only if it failed.
                if self._closed.wait(self.busy_poll_s):
                    raise ModelDownloadFailedError("the service is shutting down") from None
                if self._installed_by_other(download):
                    return self.store.model_dir(download.task, download.name)

    def _installed_by_other(self, download: Download) -> bool:
        incoming = self.store.root / INCOMING_DIR
        busy = any(incoming.glob(f"{download.task}.{download.name}.pull-*"))
        return not busy and self.store.model_dir(download.task, download.name).is_dir()

    def _finish(self, download: Download, error: str | None = None) -> None:
        download.finished = time.time()
        download.error = error
        took = download.finished - download.started
        if error is None:
            log.info("downloaded %s model %s in %.1fs", download.task, download.name, took)
        else:
            log.error("download of %s model %s failed after %.1fs: %s", download.task, download.name, took, error)

    def _log_progress(self, download: Download) -> None:
        while not download.future.done():
            try:
                download.future.exception(timeout=self.progress_log_s)
            except TimeoutError:
                log.info("downloading %s model %s: %s", download.task, download.name, self._progress(download))
            except Exception:  # the future was cancelled; nothing left to report
                return

    # ---- reporting ------------------------------------------------------------------------------

    def bytes_done(self, download: Download) -> int:
        incoming = self.store.root / INCOMING_DIR
        return sum(_folder_bytes(p) for p in incoming.glob(f"{download.task}.{download.name}.pull-*") if p.is_dir())

    def _progress(self, download: Download) -> str:
        elapsed = max(time.time() - download.started, 1e-6)
        done = self.bytes_done(download)
        return f"{_megabytes(done)} so far in {elapsed:.0f}s, {_megabytes(int(done / elapsed))}/s"

    def snapshot(self) -> list[dict[str, Any]]:
        """Downloads in flight and finished ones since start, newest first (for /status and /ai/)."""
        with self._lock:
            downloads = sorted(self._downloads.values(), key=lambda d: d.started, reverse=True)
        rows = []
        for d in downloads:
            row: dict[str, Any] = {
                "task": str(d.task),
                "model": d.name,
                "source": d.source,
                "state": "downloading" if not d.done else ("failed" if d.error else "installed"),
                "started": d.started,
                "seconds": round((d.finished or time.time()) - d.started, 1),
            }
            if not d.done:
                row["bytes"] = self.bytes_done(d)
            if d.error:
                row["error"] = d.error
            rows.append(row)
        return rows

    def close(self) -> None:
        self._closed.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
