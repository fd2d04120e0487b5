"""MT Photos AI API backends (mt-photos-ai, mt-photos-insightface-unofficial, the AI service's MT endpoints).

MT Photos speaks a different dialect, converted here to exactly what Immich reads:

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

import math
from typing import Any

import numpy as np
import orjson
from pydantic import TypeAdapter, ValidationError

from ai_service.imaging import ImageError, ImageTooLargeError, probe_size
from ai_service.protocol.immich import (
    DEFAULT_FACE_MIN_SCORE,
    DEFAULT_OCR_REC_MIN_SCORE,
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    ModelTask,
    ModelType,
    embedding_to_str,
)
from ai_service.protocol.mtphotos import API_KEY_HEADER, ClipResponse, ClipTextRequest, OcrResponse, RepresentFace
from ai_service.protocol.reading_order import sort_lines
from gateway.backends.base import BackendFailure, ClientInputError
from gateway.backends.http import HttpBackend, HttpReply, encode_formdata, snippet
from gateway.routing import RoutedTask, normalise_name
from gateway.settings import BackendSettings, GatewaySettings

# 400 (bad image or text) and 413 (too large) judge the input. A 422 from MT Photos means the request
# the *gateway* built was not accepted (e.g. a missing header), so it is a backend failure instead.
_MT_CLIENT_INPUT_STATUSES = frozenset({400, 413})
_FACES = TypeAdapter(list[RepresentFace])


def _number(value: object, what: str) -> float:
    """MT Photos' numbers: strings or numbers, always finite."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise BackendFailure("invalid_response", f"{what} is not a number: {value!r}") from None
    if not math.isfinite(number):
        raise BackendFailure("invalid_response", f"{what} is not finite: {value!r}")
    return number


def unit_vector(values: list[Any], what: str) -> np.ndarray:
    if not values:
        raise BackendFailure("invalid_response", f"{what} is empty")
    vector = np.array([_number(v, what) for v in values], dtype=np.float64)
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:
        raise BackendFailure("invalid_response", f"{what} is all zeros")
    return (vector / norm).astype(np.float32)


def ocr_to_immich(data: dict[str, Any], width: int, height: int, min_score: float) -> dict[str, Any]:
    try:
        result = OcrResponse.model_validate(data).result
    except ValidationError as exc:
        raise BackendFailure("invalid_response", f"OCR reply has the wrong shape: {exc.error_count()} errors") from None
    if not len(result.texts) == len(result.scores) == len(result.boxes):
        raise BackendFailure(
            "invalid_response",
            f"OCR reply arrays differ in length: {len(result.texts)} texts, {len(result.scores)} scores, "
            f"{len(result.boxes)} boxes",
        )
    lines: list[tuple[float, float, tuple[str, float, list[float]]]] = []
    for text, raw_score, box in zip(result.texts, result.scores, result.boxes, strict=True):
        score = _number(raw_score, "OCR score")
        if score <= min_score:  # Immich's rule: a line at exactly minScore is dropped
            continue
        x, y = _number(box.x, "OCR box x"), _number(box.y, "OCR box y")
        w, h = _number(box.width, "OCR box width"), _number(box.height, "OCR box height")
        left, right = sorted((x, x + w))
        top, bottom = sorted((y, y + h))
        corners = [left, top, right, top, right, bottom, left, bottom]  # clockwise from top-left
        quad = [min(1.0, max(0.0, v / (width if i % 2 == 0 else height))) for i, v in enumerate(corners)]
        lines.append((top, left, (text, score, quad)))
    out: dict[str, Any] = {"text": [], "box": [], "boxScore": [], "textScore": []}
    for text, score, quad in sort_lines(lines):
        out["text"].append(text)
        out["box"].extend(quad)
        out["boxScore"].append(score)
        out["textScore"].append(score)
    return out


def faces_to_immich(data: dict[str, Any], min_score: float, with_embeddings: bool) -> list[dict[str, Any]]:
    try:
        faces = _FACES.validate_python(data.get("result"))
    except ValidationError as exc:
        raise BackendFailure(
            "invalid_response", f"face reply has the wrong shape: {exc.error_count()} errors"
        ) from None
    out: list[dict[str, Any]] = []
    for face in faces:
        score = _number(face.face_confidence, "face_confidence")
        if score < min_score:
            continue
        area = face.facial_area
        item: dict[str, Any] = {
            # Integer-valued floats, as Immich's service sends; Immich stores them in integer columns.
            "boundingBox": {
                "x1": float(area.x),
                "y1": float(area.y),
                "x2": float(area.x + area.w),
                "y2": float(area.y + area.h),
            },
            "score": score,
        }
        if with_embeddings:
            vector = np.array([_number(v, "face embedding") for v in face.embedding], dtype=np.float32)
            item["embedding"] = embedding_to_str(vector)
        out.append(item)
    return out


class MtPhotosBackend(HttpBackend):
    kind = "mtphotos"

    def __init__(self, name: str, settings: BackendSettings, gateway: GatewaySettings) -> None:
        super().__init__(name, settings, gateway)
        assert settings.api_key is not None  # checked by BackendSettings
        self._api_key = settings.api_key
        self.max_image_pixels = gateway.max_image_pixels

    def cannot_serve(self, routed: RoutedTask) -> str | None:
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
        task = routed.task
        if task is ModelTask.CLIP:
            # MT Photos picks /clip/img or /clip/txt by what it is sent, not by the entry's type: refuse a
            # mismatch as the AI service (ai_service/inference.py) and Immich's service do, with the same words.
            if image is not None and ModelType.TEXTUAL in routed.entries:
                raise ClientInputError(400, orjson.dumps({"detail": "clip/textual needs a 'text' field, not an image"}))
            if image is None and any(t != ModelType.TEXTUAL for t in routed.entries):
                raise ClientInputError(400, orjson.dumps({"detail": "clip/visual needs an 'image' file"}))
        size = self._image_size(image) if image is not None else None
        if task is ModelTask.CLIP:
            if image is not None:
                data = await self._call("clip/img", file=image, timeout_s=timeout_s, request_id=request_id)
            else:
                if text is None or not text.strip():
                    raise ClientInputError(400, orjson.dumps({"detail": "'text' is empty"}))
                body = ClipTextRequest(text=text).model_dump_json().encode()
                data = await self._call("clip/txt", json=body, timeout_s=timeout_s, request_id=request_id)
            try:
                values = ClipResponse.model_validate(data).result
            except ValidationError:
                raise BackendFailure("invalid_response", "CLIP reply has no 'result' list of numbers") from None
            output: Any = embedding_to_str(unit_vector(values, "CLIP vector"))
        else:
            if image is None or size is None:
                raise ClientInputError(400, orjson.dumps({"detail": f"{task} needs an 'image' file"}))
            if task is ModelTask.FACIAL_RECOGNITION:
                data = await self._call("represent", file=image, timeout_s=timeout_s, request_id=request_id)
                detection = routed.entries[ModelType.DETECTION].options.min_score
                output = faces_to_immich(
                    data,
                    DEFAULT_FACE_MIN_SCORE if detection is None else detection,
                    ModelType.RECOGNITION in routed.entries,
                )
            else:
                data = await self._call("ocr", file=image, timeout_s=timeout_s, request_id=request_id)
                recognition = routed.entries.get(ModelType.RECOGNITION)
                rec_min = recognition.options.min_score if recognition is not None else None
                output = ocr_to_immich(
                    data, size[0], size[1], DEFAULT_OCR_REC_MIN_SCORE if rec_min is None else rec_min
                )
        out: dict[str, Any] = {task.value: output}
        if size is not None:
            out[IMAGE_HEIGHT] = size[1]
            out[IMAGE_WIDTH] = size[0]
        return out

    async def health(self, timeout_s: float) -> None:
        reply = await self.request("POST", "check", timeout_s=timeout_s, headers=self._headers())
        data = self._parse("check", reply)
        if data.get("result") != "pass":
            raise BackendFailure("health", f"/check answered {snippet(reply.body)}")
