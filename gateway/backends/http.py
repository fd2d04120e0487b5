"""Shared plumbing of the remote backends: one pooled HTTP client per backend (gateway/backends/client.py),
bounded reads, and the classification of transport errors into failover reasons."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from gateway.backends.base import Backend, BackendFailure
from gateway.backends.client import ClientError, ConnectFailed, ConnectionBroke, HttpClient, ReplyTooLarge
from gateway.settings import BackendSettings, GatewaySettings

REQUEST_ID_HEADER = "X-Request-ID"
_SNIPPET_CHARS = 300  # how much of a backend's error body goes into logs and the 503 reasons


def redact_url(url: str) -> str:
    """The URL without user:password and with query values masked (tokens hide there too), for logs and /status."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.username is not None or parts.password is not None:
        netloc = "***@" + (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    query = "&".join(
        f"{pair.split('=', 1)[0]}=***" if "=" in pair else pair for pair in parts.query.split("&") if pair
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def endpoint_url(base: str, path: str) -> str:
    """``path`` under the configured base URL, which is treated as a folder, its query kept.

    'http://h/ml' and 'http://h/ml/' both lead to 'http://h/ml/predict' (Immich itself resolves
    relatively and would drop a sub-path without its slash: never what an admin means), and
    'http://h:3003/?token=T' leads to 'http://h:3003/predict?token=T': a token in the query is how such
    a backend is reached, so every request carries it (appending the path to the whole string made
    'POST /?token=T/predict', which no backend serves). A fragment is never sent.
    """
    parts = urlsplit(base)
    folder = parts.path if parts.path.endswith("/") else parts.path + "/"
    return urlunsplit((parts.scheme, parts.netloc, folder + path, parts.query, ""))


def base_url(url: str) -> str:
    """The configured URL as the folder that endpoints are resolved in (shown, redacted, in /status)."""
    return endpoint_url(url, "")


def snippet(body: bytes) -> str:
    text = body[:_SNIPPET_CHARS].decode("utf-8", "replace")
    return " ".join(text.split()) + ("…" if len(body) > _SNIPPET_CHARS else "")


@dataclass(frozen=True, slots=True)
class HttpReply:
    status: int
    content_type: str
    body: bytes


def encode_formdata(fields: list[tuple[str, str | tuple[str, bytes, str]]]) -> tuple[str, bytes]:
    """multipart/form-data laid out exactly as Node's (undici) FormData does, which is what Immich sends:
    text fields as bare parts, files with filename and Content-Type, CRLF line ends."""
    while True:
        # Not secret: the loop below makes sure the payload does not hold it (secrets' urandom call per
        # request showed in the gateway's profile).
        boundary = f"----formdata-undici-0{random.randrange(10**11):011d}"
        marker = boundary.encode()
        # A boundary that occurs inside the payload would cut the image; pick another (practically never).
        if not any(marker in (v[1] if isinstance(v, tuple) else v.encode()) for _, v in fields):
            break
    chunks: list[bytes] = []
    for name, value in fields:
        if isinstance(value, tuple):
            filename, data, content_type = value
            chunks.append(
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                f"Content-Type: {content_type}\r\n\r\n".encode()
            )
            chunks.append(data)
            chunks.append(b"\r\n")
        else:
            text = value.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")
            chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{text}\r\n'.encode())
    chunks.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(chunks)


class HttpBackend(Backend):
    def __init__(self, name: str, settings: BackendSettings, gateway: GatewaySettings) -> None:
        super().__init__(name)
        assert settings.url is not None  # checked by BackendSettings
        self.settings = settings
        self.url = base_url(settings.url)
        self.display_url = redact_url(self.url)
        self.max_response_bytes = gateway.max_response_bytes
        self._client: HttpClient | None = None
        self._targets: dict[str, str] = {}

    async def start(self) -> None:
        self._client = HttpClient(
            self.url,
            max_connections=self.settings.max_connections,
            keepalive_s=self.settings.keepalive_s,
            # Only the TCP (and TLS) connect has its own limit (waiting for a free pooled connection does not
            # count); the whole exchange is bounded by the per-task timeout around it.
            connect_timeout_s=self.settings.connect_timeout_s,
            max_body=self.max_response_bytes,
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def _target(self, path: str) -> str:
        """The request target (path and query) of ``path`` under the configured URL."""
        target = self._targets.get(path)
        if target is None:
            parts = urlsplit(endpoint_url(self.url, path))
            target = self._targets[path] = parts.path + (f"?{parts.query}" if parts.query else "")
        return target

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "url": self.display_url}

    async def request(
        self,
        method: str,
        path: str,
        *,
        timeout_s: float,
        request_id: str | None = None,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> HttpReply:
        client = self._client
        if client is None:
            raise BackendFailure("not_started", f"{self.name}: backend client is closed")
        all_headers = dict(headers or {})
        if request_id:
            all_headers[REQUEST_ID_HEADER] = request_id
        try:
            async with asyncio.timeout(timeout_s):
                reply = await client.request(method, self._target(path), all_headers, content)
        except TimeoutError:
            raise BackendFailure("timeout", f"no complete reply within {timeout_s:g}s") from None
        except ConnectFailed as exc:
            raise BackendFailure("connect", f"cannot connect: {exc}") from None
        except ReplyTooLarge as exc:
            raise BackendFailure("response_too_large", str(exc), exc.status or None) from None
        except ConnectionBroke as exc:
            # Closed or reset mid-exchange, a body cut short, or a reply that is not HTTP at all.
            raise BackendFailure("connection", f"connection broke: {exc}") from None
        except ClientError as exc:
            raise BackendFailure("transport", f"{type(exc).__name__}: {exc}") from None
        return HttpReply(reply.status, reply.content_type, reply.body)
