"""Structured logs: one JSON object (or one key=value line) per event, with the request id of the
request being served. Bodies, headers, API keys and cookies are never passed to a logger."""

from __future__ import annotations

import atexit
import collections
import contextlib
import contextvars
import logging
import random
import re
import sys
import threading
import time
from typing import Any, TextIO

import orjson

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# An incoming X-Request-ID is reused only when it is short and plain, so it cannot forge log lines.
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id_from(header: str | None) -> str:
    if header and _REQUEST_ID_RE.fullmatch(header):
        return header
    # 128 random bits as 32 hex digits, like uuid4().hex; a request id needs no cryptographic randomness,
    # and os.urandom (a system call) per request showed in the profile.
    return f"{random.getrandbits(128):032x}"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id:
            entry["request_id"] = request_id
        entry.update(_fields(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            record.levelname.lower(),
            record.name,
            repr(record.getMessage()) if " " in record.getMessage() else record.getMessage(),
        ]
        request_id = REQUEST_ID.get()
        if request_id:
            parts.append(f"request_id={request_id}")
        for key, value in _fields(record).items():
            text = str(value)
            parts.append(f"{key}={text!r}" if (" " in text or not text) else f"{key}={text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _LineWriter:
    """Formatted lines, written to ``stream`` by one thread in batches.

    The event loop only appends to a deque; it wakes the thread (a lock and a futex call) once per burst
    instead of once per line, as a logging.handlers.QueueListener does: on a busy gateway that handoff
    cost more CPU than formatting the line. A line waits at most ``BATCH_S`` to be written.
    """

    BATCH_S = 0.02

    def __init__(self, stream: TextIO, maxsize: int) -> None:
        self.stream = stream
        self.maxsize = maxsize
        self.lines: collections.deque[str] = collections.deque()
        self._wake = threading.Event()
        self._idle = True  # the thread waits for lines: the next one must wake it
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def put(self, line: str) -> bool:
        """Queue a line; False when the queue is full (the line is dropped)."""
        if len(self.lines) >= self.maxsize:
            return False
        self.lines.append(line)
        if self._idle:
            self._idle = False
            self._wake.set()
        return True

    def stop(self) -> None:
        """Write what is queued and end the thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            # A line that finds the thread idle is written at once; while lines keep coming, they are
            # gathered for BATCH_S and written together, and nobody has to wake the thread for them.
            while self.lines and not self._stopping:
                self._drain()
                time.sleep(self.BATCH_S)
            self._idle = True
            if self._stopping:
                self._drain()
                return
            if self.lines:  # came after the last look but before _idle was set: nobody woke us for it
                self._idle = False
                self._wake.set()

    def _drain(self) -> None:
        while self.lines:
            batch: list[str] = []
            with contextlib.suppress(IndexError):
                while True:
                    batch.append(self.lines.popleft())
            try:
                self.stream.write("\n".join(batch) + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # stderr gone or closed: nothing to report it to
                pass


class DroppingQueueHandler(logging.Handler):
    """Formats on the caller's side (the request id is a context variable there) and never blocks:
    a slow log consumer (a full Docker log pipe) must not stall the event loop, or /ping with it.
    When the queue is full the line is dropped and counted; the next line that fits reports the count."""

    def __init__(self, writer: _LineWriter) -> None:
        super().__init__()
        self.writer = writer
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if self.dropped:
            notice = logging.makeLogRecord(
                {
                    "name": "gateway.logs",
                    "levelno": logging.WARNING,
                    "levelname": "WARNING",
                    "msg": f"{self.dropped} log lines dropped: log output too slow (GATEWAY_LOG_QUEUE_SIZE)",
                }
            )
            if not self.writer.put(self.format(notice)):
                self.dropped += 1
                return
            self.dropped = 0
        if not self.writer.put(line):
            self.dropped += 1


def configure_logging(level: str, fmt: str, queue_size: int = 10_000) -> None:
    """Root logging through a bounded queue to a writer thread."""
    writer = _LineWriter(sys.stderr, queue_size)
    front = DroppingQueueHandler(writer)
    front.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    _active.clear()
    _active.append((writer, front.formatter or logging.Formatter()))
    atexit.register(go_direct)
    # No format here shows a caller's file and line, thread or process: logging need not look them up
    # for every record (the optimisations of the logging HOWTO).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [front]
    root.setLevel(level.upper())
    # httpx logs every request at INFO with its full URL, psycopg_pool every connection it lends and takes
    # back; the gateway logs its own attempts and search lines instead (their warnings still show).
    for noisy in ("httpx", "httpcore", "psycopg.pool"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # replaced by the gateway's access line


_active: list[tuple[_LineWriter, logging.Formatter]] = []


def go_direct() -> None:
    """Drain the queue and write synchronously from now on. Called once requests are done (shutdown):
    uvicorn ends a SIGTERM'd process by re-raising the signal, so atexit would come too late."""
    if not _active:
        return
    writer, formatter = _active.pop()
    writer.stop()
    direct = logging.StreamHandler(sys.stderr)
    direct.setFormatter(formatter)
    logging.getLogger().handlers[:] = [direct]
