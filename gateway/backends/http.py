"""Shared plumbing of the remote backends: one pooled aiohttp client per backend, bounded reads,
and the classification of transport errors into failover reasons.

aiohttp rather than httpx (which the rest of the project uses for its few calls to Immich's API): every
Immich request costs one forward, and httpx spent ~0.8 ms of CPU on each (~2 ms with 32 in flight, its pool
scans every waiting request), aiohttp ~0.15 ms, measured on a loopback echo (bench/profile_gateway.py
shows the whole gateway). On a machine whose cores the gateway shares with the models, that CPU is
taken from inference."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from yarl import URL

from gateway.backends.base import Backend, BackendFailure
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
        boundary = f"----formdata-undici-0{secrets.randbelow(10**11):011d}"
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
        self._client: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}

    async def start(self) -> None:
        keepalive = self.settings.keepalive_s
        connector = aiohttp.TCPConnector(
            limit=self.settings.max_connections,
            limit_per_host=0,
            # 0 s of keep-alive means a connection per request; aiohttp spells that force_close.
            keepalive_timeout=keepalive if keepalive > 0 else None,
            force_close=keepalive <= 0,
        )
        self._client = aiohttp.ClientSession(
            connector=connector,
            # Only the TCP connect has its own limit (waiting for a free pooled connection does not count);
            # the whole exchange is bounded by the per-task timeout around it.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.settings.connect_timeout_s),
            # Proxy variables meant for the host's internet access must not capture calls to ML backends.
            trust_env=False,
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def _url(self, path: str) -> URL:
        url = self._urls.get(path)
        if url is None:
            # encoded=True: sent exactly as configured (a token in the query must not be re-quoted).
            url = self._urls[path] = URL(endpoint_url(self.url, path), encoded=True)
        return url

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
        if self._client is None:
            raise BackendFailure("not_started", f"{self.name}: backend client is closed")
        all_headers = dict(headers or {})
        if request_id:
            all_headers[REQUEST_ID_HEADER] = request_id
        try:
            async with asyncio.timeout(timeout_s):
                async with self._client.request(
                    method, self._url(path), headers=all_headers, data=content, allow_redirects=False
                ) as resp:
                    return HttpReply(resp.status, resp.headers.get("content-type", ""), await self._read(resp))
        except aiohttp.ConnectionTimeoutError as exc:  # a TimeoutError too: checked first
            raise BackendFailure("connect", f"cannot connect: timed out ({exc or type(exc).__name__})") from None
        except aiohttp.ClientConnectorError as exc:
            raise BackendFailure("connect", f"cannot connect: {exc.os_error or exc}") from None
        except TimeoutError:
            raise BackendFailure("timeout", f"no complete reply within {timeout_s:g}s") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, aiohttp.ClientResponseError) as exc:
            # Closed or reset mid-exchange, a body cut short, or a reply that is not HTTP at all.
            raise BackendFailure("connection", f"connection broke: {exc or type(exc).__name__}") from None
        except aiohttp.ClientError as exc:
            raise BackendFailure("transport", f"{type(exc).__name__}: {exc}") from None

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        """The reply's body, refused (BackendFailure) once it passes GATEWAY_MAX_RESPONSE_BYTES."""
        declared = resp.content_length
        if declared is not None:
            if declared > self.max_response_bytes:
                raise BackendFailure(
                    "response_too_large",
                    f"reply of {declared} bytes exceeds GATEWAY_MAX_RESPONSE_BYTES={self.max_response_bytes}",
                    resp.status,
                )
            return await resp.read()  # framed by Content-Length: no more than declared is read
        body = bytearray()
        async for chunk in resp.content.iter_any():
            body += chunk
            if len(body) > self.max_response_bytes:
                raise BackendFailure(
                    "response_too_large",
                    f"reply exceeds GATEWAY_MAX_RESPONSE_BYTES={self.max_response_bytes}",
                    resp.status,
                )
        return bytes(body)
