"""MT Photos AI API backends (mt-photos-ai, mt-photos-insightface-unofficial, the AI service's MT endpoints).

MT Photos speaks a different dialect, converted to exactly what Immich reads by each task's
``from_mtphotos`` (``ai_service/tasks/<task>.py``); this module is the HTTP side:

* numbers arrive as strings ("0.98", "4.0") -> floats; CLIP vectors are raw, un-normalised model
  features -> L2-normalised like Immich's own exports;
* face boxes ``{x, y, w, h}`` -> ``{x1, y1, x2, y2}`` integer-valued pixels; OCR boxes
  ``{x, y, width, height}`` in pixels -> Immich's flat, normalised 8-number quads (the rectangle's
  corners clockwise from top-left), lines sorted top-to-bottom then left-to-right;
* MT Photos ignores Immich's options, so ``minScore`` is applied here (faces: drop below it; OCR:
  drop lines whose score is <= the recognition minScore). It reports one score per OCR line, used as
  both ``boxScore`` and ``textScore``; the detection threshold and ``maxResolution`` stay the server's;
* ``imageHeight``/``imageWidth`` are read from the image header (no pixel decode);
* failures come back as HTTP 200 with a ``msg`` (or an empty ``result`` where a vector was
  expected): those are backend failures, never an empty answer for Immich.
"""

from __future__ import annotations

from typing import Any

import orjson

from ai_service.imaging import ImageError, ImageTooLargeError, probe_size
from ai_service.protocol.immich import IMAGE_HEIGHT, IMAGE_WIDTH
from ai_service.protocol.mtphotos import API_KEY_HEADER
from ai_service.tasks import InvalidReply, input_problem, task_for
from gateway.backends.base import BackendFailure, ClientInputError
from gateway.backends.http import HttpBackend, HttpReply, encode_formdata, snippet
from gateway.routing import RoutedTask, normalise_name
from gateway.settings import BackendSettings, GatewaySettings

# 400 (bad image or text) and 413 (too large) judge the input. A 422 from MT Photos means the request
# the *gateway* built was not accepted (e.g. a missing header), so it is a backend failure instead.
_MT_CLIENT_INPUT_STATUSES = frozenset({400, 413})


def _input_error(detail: str) -> ClientInputError:
    return ClientInputError(400, orjson.dumps({"detail": detail}))


class MtPhotosBackend(HttpBackend):
    kind = "mtphotos"

    def __init__(self, name: str, settings: BackendSettings, gateway: GatewaySettings) -> None:
        super().__init__(name, settings, gateway)
        assert settings.api_key is not None  # checked by BackendSettings
        self._api_key = settings.api_key
        self.max_image_pixels = gateway.max_image_pixels

    def cannot_serve(self, routed: RoutedTask) -> str | None:
        if not task_for(routed.task).mtphotos:  # e.g. tagging: skipped, never sent to another task's endpoint
            return f"MT Photos' API has no {routed.task} endpoint"
        served = self.settings.served_model(routed.task)
        if served is not None and normalise_name(served) != normalise_name(routed.model.target):
            return f"runs {routed.task} model '{served}', request is for '{routed.model.target}'"
        return None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "models": {str(k): v for k, v in (self.settings.models or {}).items()}}

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {API_KEY_HEADER: self._api_key.get_secret_value(), **(extra or {})}

    async def _call(self, path: str, *, timeout_s: float, request_id: str | None, **kwargs: Any) -> dict[str, Any]:
        content_type: str
        if "file" in kwargs:
            content_type, content = encode_formdata([("file", ("blob", kwargs["file"], "application/octet-stream"))])
        else:
            content_type, content = "application/json", kwargs["json"]
        reply = await self.request(
            "POST",
            path,
            timeout_s=timeout_s,
            request_id=request_id,
            headers=self._headers({"Content-Type": content_type}),
            content=content,
        )
        return self._parse(path, reply)

    def _parse(self, path: str, reply: HttpReply) -> dict[str, Any]:
        if reply.status in _MT_CLIENT_INPUT_STATUSES:
            raise ClientInputError(reply.status, reply.body, reply.content_type or "application/json")
        if reply.status == 401:
            raise BackendFailure("http_status", f"/{path}: API key rejected (check this backend's api_key)", 401)
        if reply.status != 200:
            raise BackendFailure("http_status", f"/{path}: HTTP {reply.status}: {snippet(reply.body)}", reply.status)
        try:
            data = orjson.loads(reply.body)
        except orjson.JSONDecodeError:
            raise BackendFailure("invalid_response", f"/{path}: reply is not JSON: {snippet(reply.body)}") from None
        if not isinstance(data, dict):
            raise BackendFailure("invalid_response", f"/{path}: reply is not an object: {snippet(reply.body)}")
        if data.get("msg"):
            # MT Photos reports its own failures as HTTP 200 {"result": [], "msg": "..."}.
            raise BackendFailure("backend_error", f"/{path}: {str(data['msg'])[:300]}")
        return data

    def _image_size(self, image: bytes) -> tuple[int, int]:
        try:
            return probe_size(image, max_pixels=self.max_image_pixels)
        except ImageTooLargeError as exc:
            raise ClientInputError(413, orjson.dumps({"detail": str(exc)})) from None
        except ImageError as exc:
            raise ClientInputError(400, orjson.dumps({"detail": str(exc)})) from None

    async def predict(
        self, routed: RoutedTask, image: bytes | None, text: str | None, *, timeout_s: float, request_id: str
    ) -> dict[str, Any]:
        task = task_for(routed.task)  # an unknown task is an error, never another task's endpoint
        # MT Photos picks its endpoint by what it is sent, not by the entry's type: refuse a mismatch as the
        # gateway, the AI service and Immich's service do, with the same words.
        problem = input_problem({routed.task: routed.entries}, image is not None)
        if problem is not None:
            raise _input_error(problem)
        if image is None and (text is None or not text.strip()):
            raise _input_error("'text' is empty")
        size = self._image_size(image) if image is not None else None
        call = task.mtphotos_call(routed.entries, image, text)
        if call.json is not None:
            data = await self._call(call.path, json=call.json, timeout_s=timeout_s, request_id=request_id)
        else:
            data = await self._call(call.path, file=image, timeout_s=timeout_s, request_id=request_id)
        try:
            output = task.from_mtphotos(data, routed.entries, size)
        except InvalidReply as exc:
            raise BackendFailure("invalid_response", str(exc)) from None
        out: dict[str, Any] = {routed.task.value: output}
        if size is not None:
            out[IMAGE_HEIGHT] = size[1]
            out[IMAGE_WIDTH] = size[0]
        return out

    async def health(self, timeout_s: float) -> None:
        reply = await self.request("POST", "check", timeout_s=timeout_s, headers=self._headers())
        data = self._parse("check", reply)
        if data.get("result") != "pass":
            raise BackendFailure("health", f"/check answered {snippet(reply.body)}")
