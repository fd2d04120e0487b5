"""The gateway's HTTP/1.1 client for its backends: pooled keep-alive connections on asyncio transports,
replies parsed by httptools (the parser uvicorn serves both services with).

Every Immich job is one forward, and on a machine whose cores the gateway shares with the models its CPU
is taken from inference. Measured on a loopback echo, a forward cost ~0.8 ms of CPU with httpx (~2 ms
with 32 in flight), ~0.15 ms with aiohttp, and a few tens of microseconds here: a backend call needs only
a small part of what those clients do. What it does:

* one request per connection at a time, at most ``max_connections`` per backend (callers wait for one);
  idle connections are reused for ``keepalive_s`` (0: a connection per request), then closed;
* TLS for https URLs (the system's CAs), Basic auth from a URL's ``user:password``;
* no redirects, no proxies, no cookies, no compression; a reply's head and body are bounded;
* errors: :class:`ConnectFailed`, :class:`ConnectionBroke`, :class:`ReplyTooLarge`. The caller bounds
  the whole exchange (waiting for a connection included) with its own timeout; a cancelled request closes
  its connection, so a late reply can never be read as the next request's.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import time
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

import httptools

MAX_HEAD_BYTES = 64 * 1024  # status line and headers of a reply; a backend has no reason to send more


class ClientError(Exception):
    """The exchange failed; the message says how."""


class ConnectFailed(ClientError):
    pass


class ConnectionBroke(ClientError):
    pass


class ReplyTooLarge(ClientError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    content_type: str
    body: bytes


class _Connection(asyncio.Protocol):
    """One connection: sends a request, parses its reply (httptools calls the ``on_*`` methods)."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.keep_alive = False
        self._waiter: asyncio.Future[None] | None = None
        self._error: ClientError | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.content_type = b""
        self.body = bytearray()
        self._head_bytes = 0  # bytes fed before the head was complete (an unterminated head is buffered)
        self._header_bytes = 0  # the header lines parsed so far
        self._framed = False  # Content-Length or chunked: the reply does not end with the connection
        self._complete = False

    async def exchange(self, request: bytes) -> Reply:
        assert self.transport is not None
        if self.transport.is_closing():
            raise ConnectionBroke("connection closed by the server while idle")
        self._reset()
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        await self._waiter
        return Reply(self.status, self.content_type.decode("latin-1"), bytes(self.body))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # ---- transport callbacks -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            self.close()  # bytes nobody asked for: this connection's framing cannot be trusted
            return
        if not self.status:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._error = self._error or ConnectionBroke(f"invalid HTTP reply ({exc})")
        if self._error is None and not self.status and self._head_bytes > MAX_HEAD_BYTES:
            self._error = ConnectionBroke(f"reply head larger than {MAX_HEAD_BYTES} bytes")
        if self._error is not None:
            self._finish(self._error)
        elif self._complete:
            self._finish(None)

    def eof_received(self) -> bool:
        self.closed = True  # never lent again, even before connection_lost is called
        # A reply with neither Content-Length nor chunking ends when the server closes the connection.
        if self._waiter is not None and not self._waiter.done():
            if self.status and not self._framed and self._error is None:
                self.keep_alive = False
                self._finish(None)
            else:
                self._finish(ConnectionBroke("server closed the connection before the reply was complete"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._finish(ConnectionBroke(f"connection lost ({exc or 'closed by the server'})"))

    def _finish(self, error: ClientError | None) -> None:
        waiter = self._waiter
        if error is not None:
            self.close()
        if waiter is not None and not waiter.done():
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)

    # ---- httptools callbacks (exceptions raised here would be wrapped: errors are kept in _error) --------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_HEAD_BYTES and self._error is None:  # a head that ends, but too late
            self._error = ConnectionBroke(f"reply head larger than {MAX_HEAD_BYTES} bytes")
        name = name.lower()
        if name == b"content-type":
            self.content_type = value
        elif name == b"content-length":
            self._framed = True
            if value.strip().isdigit() and int(value) > self.max_body:
                self._error = self._error or ReplyTooLarge(
                    f"reply of {int(value)} bytes exceeds GATEWAY_MAX_RESPONSE_BYTES={self.max_body}", 0
                )
        elif name == b"transfer-encoding":
            self._framed = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if isinstance(self._error, ReplyTooLarge):
            self._error.status = self.status

    def on_body(self, body: bytes) -> None:
        self.body += body
        if len(self.body) > self.max_body and self._error is None:
            message = f"reply exceeds GATEWAY_MAX_RESPONSE_BYTES={self.max_body}"
            self._error = ReplyTooLarge(message, self.status)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        self._complete = True


class HttpClient:
    """Requests to one server (``base_url``'s scheme, host and port), over a pool of connections."""

    def __init__(
        self, base_url: str, *, max_connections: int, keepalive_s: float, connect_timeout_s: float, max_body: int
    ) -> None:
        parts = urlsplit(base_url)
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if parts.scheme == "https" else None
        host_header = parts.netloc.rpartition("@")[2]
        self._fixed = f"Host: {host_header}\r\n"
        if parts.username is not None or parts.password is not None:
            pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode()
            self._fixed += f"Authorization: Basic {base64.b64encode(pair).decode()}\r\n"
        self.keepalive_s = keepalive_s
        self.connect_timeout_s = connect_timeout_s
        self.max_body = max_body
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []

    async def request(self, method: str, target: str, headers: dict[str, str], body: bytes | None) -> Reply:
        """``method target`` (the path and query, as sent) with ``headers`` and ``body``; raises ClientError."""
        head = self._head(method, target, headers, body)
        async with self._slots:
            connection = self._reusable() or await self._connect()
            try:
                reply = await connection.exchange(head + body if body else head)
            except BaseException:  # failed, or cancelled mid-exchange: the connection's state is unknown
                connection.close()
                raise
            if connection.keep_alive and self.keepalive_s > 0 and not connection.closed:
                connection.idle_since = time.monotonic()
                self._idle.append(connection)
            else:
                connection.close()
            return reply

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

    def _head(self, method: str, target: str, headers: dict[str, str], body: bytes | None) -> bytes:
        lines = [f"{method} {quote(target, safe=_URL_SAFE)} HTTP/1.1\r\n", self._fixed]
        for name, value in headers.items():
            if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
                raise ClientError(f"header {name!r} holds a line break")
            lines.append(f"{name}: {value}\r\n")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body or b'')}\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    def _reusable(self) -> _Connection | None:
        """The most recently used idle connection still open and within keepalive_s; stale ones are closed."""
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and now - connection.idle_since < self.keepalive_s:
                return connection
            connection.close()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self.max_body),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except TimeoutError:
            raise ConnectFailed(f"timed out after {self.connect_timeout_s:g}s") from None
        except OSError as exc:  # refused, unreachable, unknown host, TLS handshake or certificate
            raise ConnectFailed(str(exc) or type(exc).__name__) from None
        return connection


# Sent as configured, except what may not appear in a request line (spaces, non-ASCII): percent-encoded.
_URL_SAFE = "!#$%&'()*+,/:;=?@[]~"
