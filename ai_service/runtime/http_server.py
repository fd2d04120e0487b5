"""uvicorn's httptools protocol with the limits of :class:`HttpLimits`, for both services.

uvicorn bounds neither the request head (httptools buffers a header of any size, and any number of
them) nor the time a client takes to send its request: one connection could make the server buffer
50 MB of an unterminated header, and a few hundred connections dribbling a byte now and then held
their sockets open indefinitely. This subclass adds, per connection:

* **head size**: bytes are fed to the parser only up to ``max_header_bytes`` while a head is being
  read, so an oversized head is refused (431) before it is buffered, whatever its shape;
* **header count**: the ``max_headers + 1``-th field stops the parser (431);
* **head time**: the head must be complete ``header_timeout_s`` after the connection opened (first
  request) or after its first byte (later requests; the idle wait before it is uvicorn's keep-alive
  timeout), else 408;
* **body time**: ``body_timeout_s`` plus one second per ``body_min_bytes_per_s`` bytes received
  (Apache's mod_reqtimeout rule: a slow but steady upload passes, a trickle does not). While the
  server itself has paused reading (the app has not consumed the buffered body yet) the clock restarts,
  so a busy app never gets its client cut off.

One timer per connection, re-armed only when it fires: the per-chunk cost is an addition.
Used through :func:`uvicorn_http`, which also works for uvicorn's worker processes (the partial
pickles by reference).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from ai_service.runtime.http_limits import HttpLimits

log = logging.getLogger(__name__)


class _HeadRefused(Exception):
    """Raised from a parser callback to stop httptools mid-head (it wraps it in HttpParserCallbackError)."""


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        limits: HttpLimits | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits or HttpLimits()
        self._head_bytes = 0  # bytes fed since the last message ended (the head being read)
        self._header_count = 0
        self._in_body = False
        self._body_bytes = 0
        self._body_started = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._refusal: tuple[int, str] | None = None

    # ---- timers ----------------------------------------------------------------------------------------

    def _arm(self, delay: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timed_out(self) -> None:
        self._timer = None
        self._refuse(408, f"request head not complete within {self.limits.header_timeout_s:g}s")

    def _check_body(self) -> None:
        self._timer = None
        if not self._in_body or self.transport.is_closing():
            return
        now = self.loop.time()
        if self.flow.read_paused:
            # The app, not the client, is behind: the client's clock starts again once the server reads.
            self._body_started, self._body_bytes = now, 0
            self._arm(self.limits.body_timeout_s, self._check_body)
            return
        rate = self.limits.body_min_bytes_per_s
        deadline = self._body_started + self.limits.body_timeout_s + (self._body_bytes / rate if rate else 0.0)
        if now < deadline:
            self._arm(deadline - now, self._check_body)
            return
        log.info(
            "request body too slow: %d bytes in %.1fs from %s; connection closed",
            self._body_bytes,
            now - self._body_started,
            self._peer(),
        )
        if self.cycle is not None and not self.cycle.response_started:
            self._refuse(408, "request body arrived too slowly", quiet=True)
        else:
            self.transport.close()

    # ---- refusing ----------------------------------------------------------------------------------------

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "?"

    def _refuse(self, status: int, reason: str, *, quiet: bool = False) -> None:
        """Answer ``status`` with ``reason`` and close: the connection's framing cannot be trusted any more."""
        self._disarm()
        if self.transport.is_closing():
            return
        if not quiet:
            log.info("HTTP %d to %s: %s; connection closed", status, self._peer(), reason)
        body = reason.encode("ascii", "replace")
        content = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: text/plain; charset=utf-8\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(content))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to any parser error; a callback of ours stopped the parser on purpose.
        if self._refusal is not None:
            self._refuse(*self._refusal)
        else:
            super().send_400_response(msg)

    # ---- transport and parser callbacks -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.limits.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        while data and not self.transport.is_closing():
            if self._in_body:
                chunk, data = data, b""
            else:
                # Feed a head only as far as it may go: past the limit nothing is buffered at all.
                budget = self.limits.max_header_bytes - self._head_bytes
                if budget <= 0:
                    self._refuse(431, f"request head larger than {self.limits.max_header_bytes} bytes")
                    return
                chunk, data = (data[:budget], data[budget:]) if len(data) > budget else (data, b"")
                self._head_bytes += len(chunk)
            super().data_received(chunk)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_count = 0
        if self._timer is None:  # the first request's timer runs from connection_made
            self._arm(self.limits.header_timeout_s, self._head_timed_out)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            self._refusal = (431, f"more than {self.limits.max_headers} header fields")
            raise _HeadRefused
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_body = True
        self._body_bytes = 0
        self._body_started = self.loop.time()
        self._arm(self.limits.body_timeout_s, self._check_body)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        self._head_bytes = 0
        self._disarm()
        super().on_message_complete()


def uvicorn_http(limits: HttpLimits) -> Callable[..., asyncio.Protocol]:
    """The ``http=`` argument for ``uvicorn.run``/``uvicorn.Config``: the limited protocol with ``limits``."""
    return functools.partial(LimitedHttpToolsProtocol, limits=limits)
