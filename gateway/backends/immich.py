"""Any service speaking Immich's ML protocol: the stock immich-machine-learning, the AI service, another gateway.

The request is rebuilt as the Immich server builds it (``entries`` JSON, then ``image`` as a
"blob" octet-stream file or ``text``), with the mapped model name and every option Immich sent,
including ones this gateway does not know (a newer Immich may add some).
"""

from __future__ import annotations

from typing import Any

import orjson

from ai_service.protocol.immich import IMAGE_HEIGHT, IMAGE_WIDTH
from gateway.backends.base import CLIENT_INPUT_STATUSES, BackendFailure, ClientInputError
from gateway.backends.http import HttpBackend, encode_formdata, snippet
from gateway.routing import RoutedTask


class ImmichBackend(HttpBackend):
    kind = "immich"

    async def predict(
        self, routed: RoutedTask, image: bytes | None, text: str | None, *, timeout_s: float, request_id: str
    ) -> dict[str, Any]:
        entries = orjson.dumps({routed.task.value: routed.raw}).decode()
        fields: list[tuple[str, str | tuple[str, bytes, str]]] = [("entries", entries)]
        if image is not None:
            fields.append(("image", ("blob", image, "application/octet-stream")))
        elif text is not None:
            fields.append(("text", text))
        content_type, body = encode_formdata(fields)
        reply = await self.request(
            "POST",
            "predict",
            timeout_s=timeout_s,
            request_id=request_id,
            headers={"Content-Type": content_type},
            content=body,
        )
        if reply.status in CLIENT_INPUT_STATUSES:
            raise ClientInputError(reply.status, reply.body, reply.content_type or "application/json")
        if reply.status != 200:
            raise BackendFailure("http_status", f"HTTP {reply.status}: {snippet(reply.body)}", reply.status)
        try:
            data = orjson.loads(reply.body)
        except orjson.JSONDecodeError:
            raise BackendFailure("invalid_response", f"reply is not JSON: {snippet(reply.body)}") from None
        if not isinstance(data, dict) or routed.task.value not in data:
            raise BackendFailure("invalid_response", f"reply has no '{routed.task.value}': {snippet(reply.body)}")
        out: dict[str, Any] = {routed.task.value: data[routed.task.value]}
        if image is not None:
            # Checked by the response validator; the stock service always sends both for images.
            for key in (IMAGE_HEIGHT, IMAGE_WIDTH):
                if key in data:
                    out[key] = data[key]
        return out

    async def health(self, timeout_s: float) -> None:
        reply = await self.request("GET", "ping", timeout_s=timeout_s)
        # Immich counts any 2xx as healthy and ignores the body; so does the gateway.
        if not 200 <= reply.status < 300:
            raise BackendFailure("http_status", f"/ping answered HTTP {reply.status}", reply.status)
