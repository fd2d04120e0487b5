"""Any service speaking Immich's ML protocol: the stock immich-machine-learning, the AI service, another gateway.

The request is rebuilt as the Immich server builds it (``entries`` JSON, then ``image`` as a
"blob" octet-stream file or ``text``), with the mapped model name and every option Immich sent,
including ones this gateway does not know (a newer Immich may add some).
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from ai_service.protocol.immich import IMAGE_HEIGHT, IMAGE_WIDTH
from gateway.backends.base import CLIENT_INPUT_STATUSES, BackendFailure, ClientInputError
from gateway.backends.http import HttpBackend, encode_formdata, snippet
from gateway.routing import RoutedTask
from gateway.settings import BackendSettings, GatewaySettings

# The protocol probe's 'entries': not JSON, so Immich's service (and the AI service, and a gateway) answers
# 422 "Invalid request format." from its form parsing, before any model is touched.
PROBE_ENTRIES = "gateway protocol probe"
# What a service speaking Immich's protocol answers to that probe.
_PROBE_STATUSES = frozenset({400, 422})


class ImmichBackend(HttpBackend):
    kind = "immich"

    def __init__(self, name: str, settings: BackendSettings, gateway: GatewaySettings) -> None:
        super().__init__(name, settings, gateway)
        # Whether POST /predict was shown to be Immich's since the last failure (see health()).
        self._protocol_ok = False

    async def predict(
        self, routed: RoutedTask, image: bytes | None, text: str | None, *, timeout_s: float, request_id: str
    ) -> dict[str, Any]:
        try:
            return await self._predict(routed, image, text, timeout_s=timeout_s, request_id=request_id)
        except BackendFailure as exc:
            if exc.status is not None:
                # It answered, but not as expected (a proxy or URL changed?): the next health check probes
                # /predict again. A timeout or a refused connection says nothing about the protocol.
                self._protocol_ok = False
            raise

    async def _predict(
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
        """GET /ping, and at start and after any failure also a protocol probe of POST /predict.

        A 2xx /ping alone (what Immich checks) is answered by many things that cannot serve /predict:
        another app's /ping, a URL whose path or query leads elsewhere (then every predict gets 404/405
        while the backend looks up). The probe is one small form whose 'entries' is not JSON: a service
        speaking Immich's protocol refuses it with 422 (400 from some) before any model runs, so it costs
        no inference. Once it passed, only /ping is checked until a predict gets an unexpected status or a
        check fails. Only a wrong *answer* fails the probe: if it times out (a busy backend is slow, not
        wrong), the check rests on /ping and the probe is tried again next time.
        """
        deadline = time.monotonic() + timeout_s
        try:
            reply = await self.request("GET", "ping", timeout_s=timeout_s)
            # Immich counts any 2xx as healthy and ignores the body; so does the gateway.
            if not 200 <= reply.status < 300:
                raise BackendFailure("http_status", f"/ping answered HTTP {reply.status}", reply.status)
            if not self._protocol_ok:
                self._protocol_ok = await self._probe_predict(max(0.05, deadline - time.monotonic()))
        except BackendFailure:
            self._protocol_ok = False
            raise

    async def _probe_predict(self, timeout_s: float) -> bool:
        """True when /predict answered as Immich's does; False when it did not answer in time."""
        content_type, body = encode_formdata([("entries", PROBE_ENTRIES)])
        try:
            reply = await self.request(
                "POST", "predict", timeout_s=timeout_s, headers={"Content-Type": content_type}, content=body
            )
        except BackendFailure as exc:
            if exc.kind == "timeout":
                return False
            raise
        if reply.status not in _PROBE_STATUSES:
            raise BackendFailure(
                "protocol",
                f"POST /predict with malformed entries answered HTTP {reply.status}, not Immich's 422: this URL "
                f"does not lead to an Immich ML service ({snippet(reply.body)})",
                reply.status,
            )
        return True
