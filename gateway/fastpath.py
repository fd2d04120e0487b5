"""``POST /predict`` in Immich's shape served without FastAPI's request machinery.

Every Immich request is one of these, and on a machine whose few cores the gateway shares with the
models each millisecond of its CPU is one the models do not get. Routing, dependency solving, the form
parser (an UploadFile spooled per image) and the response model cost more than the gateway's own work;
this plain ASGI middleware reads the body, parses Immich's form directly (gateway/form.py) and calls the
same request handler as the FastAPI route. Any other request, and any /predict body not in Immich's exact
shape, goes on to FastAPI unchanged (the body replayed), so its answers stay the reference.

It sits inside the request-id/access-log and body-limit middlewares: those apply to both paths alike.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.form import PredictForm, parse_predict_form

Serve = Callable[[Scope, PredictForm], Awaitable[Response]]
ErrorHandler = Callable[[Request, Any], Awaitable[Response]]


class PredictFastPath:
    def __init__(self, app: ASGIApp, serve: Serve, error_handlers: dict[type[Exception], ErrorHandler]) -> None:
        self.app = app
        self.serve = serve
        self.error_handlers = error_handlers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] != "/predict"
            or scope.get("root_path")
        ):
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        form = parse_predict_form(scope["headers"], body)
        if form is None:
            await self.app(scope, _replay(body, receive), send)
            return
        try:
            response = await self.serve(scope, form)
        except Exception as exc:
            handler = next((self.error_handlers[c] for c in type(exc).__mro__ if c in self.error_handlers), None)
            if handler is None:
                raise  # ServerErrorMiddleware's 500, as for the FastAPI route
            response = await handler(Request(scope, receive), exc)
        await response(scope, receive, send)


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientDisconnect()  # what Starlette's request.body() raises
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """``receive`` for the app behind: the body already read, then whatever the server sends next."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
