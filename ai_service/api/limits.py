"""Request-body checks as plain ASGI middleware (the gateway uses it too): size limit, complete multipart.

Size is checked twice: the declared Content-Length is refused before anything is read, and a chunked
or lying body is cut off as soon as it passes the limit, so a client cannot fill memory or disk.

A multipart body must end with its closing boundary (``--BOUNDARY--``). The form parser accepts a body
cut off before it and silently drops the unfinished part, so a truncated upload would otherwise be
answered as if the image had never been sent ("Either image or text must be provided").

Both refusals happen while the body is being read, usually inside the framework's form parsing, which
turns any error there into its own generic 400: the refusal is remembered and replaces whatever
response the app then starts, so the client gets the real reason (413, or 400 "truncated").
"""

from __future__ import annotations

from collections.abc import Callable

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class _BodyRejected(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


TRUNCATED_MULTIPART = (
    "Multipart body is malformed or truncated: it ends without its closing boundary (was the upload cut off?)"
)


def multipart_boundary(headers: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...]) -> bytes | None:
    """The boundary of a multipart/form-data request, else None (no boundary: the parser refuses it)."""
    for name, value in headers:
        if name != b"content-type":
            continue
        media_type, _, params = value.partition(b";")
        if media_type.strip().lower() != b"multipart/form-data":
            return None
        for param in params.split(b";"):
            key, _, raw = param.strip().partition(b"=")
            if key.strip().lower() == b"boundary" and raw.strip().strip(b'"'):
                return raw.strip().strip(b'"')
        return None
    return None


def closing_delimiter(headers: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...]) -> bytes | None:
    """``--BOUNDARY--`` for a multipart/form-data request, else None (no boundary: the parser refuses it)."""
    boundary = multipart_boundary(headers)
    return None if boundary is None else b"--" + boundary + b"--"


ErrorBody = Callable[[str, str], dict[str, object]]  # (path, detail) -> JSON body


def detail_body(path: str, detail: str) -> dict[str, object]:
    return {"detail": detail}


class RequestBodyMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, setting_name: str, error_body: ErrorBody = detail_body) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.setting_name = setting_name
        self.error_body = error_body  # the app's error shape (MT Photos clients read 'msg')

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers", ())
        for name, value in headers:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await self._reject(scope, send, 400, "Content-Length is not a number")
                    return
                if declared > self.max_bytes:
                    await self._reject(scope, send, 413, self._message(declared))
                    return
        closing = closing_delimiter(headers)
        received = 0
        tail = b""  # the last len(closing) - 1 bytes, so a delimiter split across chunks is still seen
        closed = closing is None
        rejected: _BodyRejected | None = None
        response_started = replaced = False

        async def checked_receive() -> Message:
            nonlocal received, tail, closed, rejected
            if rejected is not None:
                raise rejected
            message = await receive()
            if message["type"] != "http.request":
                return message
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                rejected = _BodyRejected(413, self._message(received))
                raise rejected
            if not closed and closing is not None:
                window = tail + chunk
                closed = closing in window
                tail = window[-(len(closing) - 1) :]
            if not closed and not message.get("more_body", False):
                rejected = _BodyRejected(400, TRUNCATED_MULTIPART)
                raise rejected
            return message

        async def checked_send(message: Message) -> None:
            nonlocal response_started, replaced
            if message["type"] == "http.response.start":
                if rejected is not None and not response_started:
                    # The app answered the error it saw (e.g. FastAPI's "error parsing the body"): ours instead.
                    replaced = True
                    await self._reject(scope, send, rejected.status, rejected.detail)
                    return
                response_started = True
            elif replaced:
                return  # the replaced response's body
            await send(message)

        try:
            await self.app(scope, checked_receive, checked_send)
        except _BodyRejected as exc:
            if not response_started and not replaced:
                await self._reject(scope, send, exc.status, exc.detail)

    def _message(self, size: int) -> str:
        return f"request body of {size} bytes is larger than the limit of {self.max_bytes} bytes ({self.setting_name})"

    async def _reject(self, scope: Scope, send: Send, status: int, detail: str) -> None:
        body = orjson.dumps(self.error_body(scope.get("path", ""), detail))
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
