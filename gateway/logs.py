"""Structured logs: one JSON object (or one key=value line) per event, with the request id of the
request being served. Bodies, headers, API keys and cookies are never passed to a logger."""

from __future__ import annotations

import atexit
import contextvars
import logging
import logging.handlers
import queue
import re
import sys
import time
import uuid
from typing import Any

import orjson

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

# An incoming X-Request-ID is reused only when it is short and plain, so it cannot forge log lines.
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def request_id_from(header: str | None) -> str:
    if header and _REQUEST_ID_RE.fullmatch(header):
        return header
    return uuid.uuid4().hex


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


class DroppingQueueHandler(logging.handlers.QueueHandler):
    """Formats on the caller's side (the request id is a context variable there) and never blocks:
    a slow log consumer (a full Docker log pipe) must not stall the event loop, or /ping with it.
    When the queue is full the line is dropped and counted; the next line that fits reports the count."""

    def __init__(self, queue: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(queue)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            if self.dropped:
                notice = logging.makeLogRecord(
                    {
                        "name": "gateway.logs",
                        "levelno": logging.WARNING,
                        "levelname": "WARNING",
                        "msg": f"{self.dropped} log lines dropped: log output too slow (GATEWAY_LOG_QUEUE_SIZE)",
                    }
                )
                self.queue.put_nowait(self.prepare(notice))
                self.dropped = 0
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


def configure_logging(level: str, fmt: str, queue_size: int = 10_000) -> logging.handlers.QueueListener:
    """Root logging through a bounded queue to a writer thread; returns the (started) listener."""
    records: queue.Queue[logging.LogRecord] = queue.Queue(maxsize=queue_size)
    front = DroppingQueueHandler(records)
    front.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    writer = logging.StreamHandler(sys.stderr)
    writer.setFormatter(logging.Formatter("%(message)s"))  # already formatted by the front handler
    listener = logging.handlers.QueueListener(records, writer)
    listener.start()
    _active.clear()
    _active.append((listener, front.formatter or logging.Formatter()))
    atexit.register(go_direct)
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
    return listener


_active: list[tuple[logging.handlers.QueueListener, logging.Formatter]] = []


def go_direct() -> None:
    """Drain the queue and write synchronously from now on. Called once requests are done (shutdown):
    uvicorn ends a SIGTERM'd process by re-raising the signal, so atexit would come too late."""
    if not _active:
        return
    listener, formatter = _active.pop()
    listener.stop()
    direct = logging.StreamHandler(sys.stderr)
    direct.setFormatter(formatter)
    logging.getLogger().handlers[:] = [direct]
