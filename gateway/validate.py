"""Every backend reply is checked before Immich sees it: a failure must never reach Immich as a 200.

Immich stores what it gets without looking: an empty or short CLIP vector breaks its SQL insert
(or worse, lands in the table), a fractional face box breaks an integer column, an OCR box in
pixels lands as nonsense coordinates. Whatever does not fit raises :class:`InvalidResponse`, which
the dispatcher treats as that backend's failure and fails over.

Small repairs that cannot change meaning are made here instead of failing: face boxes are rounded
to integer values and OCR coordinates a rounding error outside 0-1 are clamped.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from ai_service.protocol.immich import IMAGE_HEIGHT, IMAGE_WIDTH, ModelTask, ModelType
from gateway.routing import FACE_EMBEDDING_DIMENSION, RoutedTask

_BOX_SLACK = 1e-3  # normalised OCR coordinates may overshoot 0-1 by float error, not by more
_NUMBER_TYPES = frozenset({float, int})  # exact types: bool is an int subclass and is not a number here


class InvalidResponse(ValueError):
    pass


def _is_number(value: object) -> bool:
    return type(value) in (float, int) and math.isfinite(value)  # type: ignore[arg-type]


def check_embedding(value: object, dimension: int | None, what: str) -> str:
    """A JSON-array string of finite numbers, non-zero, of ``dimension`` entries when known."""
    if not isinstance(value, str):
        raise InvalidResponse(f"{what} must be a string holding a JSON array, got {type(value).__name__}")
    try:
        vector = orjson.loads(value)
    except orjson.JSONDecodeError:
        raise InvalidResponse(f"{what} is not a JSON array: {value[:80]!r}") from None
    if not isinstance(vector, list) or not vector:
        raise InvalidResponse(f"{what} is empty")
    if dimension is not None and len(vector) != dimension:
        raise InvalidResponse(f"{what} has {len(vector)} dimensions, expected {dimension}")
    # C-level checks (map/set/sum), not a Python loop per element: this runs on every reply on the event loop.
    # orjson never yields inf/nan, so a non-finite sum can only come from absurd magnitudes.
    if not set(map(type, vector)) <= _NUMBER_TYPES or not math.isfinite(sum(vector)):
        raise InvalidResponse(f"{what} holds something other than finite numbers")
    if not any(vector):
        raise InvalidResponse(f"{what} is all zeros (cosine distance would be undefined)")
    return value


def _faces(value: object, with_embeddings: bool) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise InvalidResponse(f"facial-recognition must be a list, got {type(value).__name__}")
    out: list[dict[str, Any]] = []
    for i, face in enumerate(value):
        if not isinstance(face, dict) or not isinstance(face.get("boundingBox"), dict):
            raise InvalidResponse(f"face {i} has no boundingBox")
        box = face["boundingBox"]
        coords = [box.get(k) for k in ("x1", "y1", "x2", "y2")]
        if not all(_is_number(c) for c in coords):
            raise InvalidResponse(f"face {i} boundingBox is not four finite numbers: {box}")
        x1, y1, x2, y2 = (float(round(c)) for c in coords)  # type: ignore[arg-type]
        if x2 < x1 or y2 < y1:
            raise InvalidResponse(f"face {i} boundingBox is inverted: {box}")
        score = face.get("score")
        if not _is_number(score):
            raise InvalidResponse(f"face {i} score is not a number")
        item: dict[str, Any] = {"boundingBox": {"x1": x1, "y1": y1, "x2": x2, "y2": y2}, "score": score}
        if with_embeddings:
            item["embedding"] = check_embedding(face.get("embedding"), FACE_EMBEDDING_DIMENSION, f"face {i} embedding")
        elif "embedding" in face:
            item["embedding"] = face["embedding"]
        out.append(item)
    return out


def _ocr(value: object, with_text: bool) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidResponse(f"ocr must be an object, got {type(value).__name__}")
    box, box_score = value.get("box"), value.get("boxScore")
    if not isinstance(box, list) or not isinstance(box_score, list):
        raise InvalidResponse("ocr needs 'box' and 'boxScore' arrays")
    n = len(box_score)
    if len(box) != 8 * n:
        raise InvalidResponse(f"ocr has {len(box)} box numbers for {n} lines (expected 8 per line)")
    if not all(_is_number(v) for v in box) or not all(_is_number(v) for v in box_score):
        raise InvalidResponse("ocr box or boxScore holds something other than finite numbers")
    if any(v < -_BOX_SLACK or v > 1 + _BOX_SLACK for v in box):
        raise InvalidResponse("ocr boxes are not normalised to 0-1 (pixel coordinates?)")
    out: dict[str, Any] = {
        "text": value.get("text", []),
        "box": [min(1.0, max(0.0, float(v))) for v in box],
        "boxScore": box_score,
        "textScore": value.get("textScore", []),
    }
    if with_text:
        text, text_score = out["text"], out["textScore"]
        if not isinstance(text, list) or not all(isinstance(t, str) for t in text) or len(text) != n:
            raise InvalidResponse(f"ocr 'text' must be {n} strings")
        if not isinstance(text_score, list) or len(text_score) != n or not all(_is_number(v) for v in text_score):
            raise InvalidResponse(f"ocr 'textScore' must be {n} numbers")
    return out


def _image_dimension(response: dict[str, Any], key: str) -> int:
    value = response.get(key)
    if not _is_number(value) or value != int(value) or value <= 0:  # type: ignore[operator,arg-type]
        raise InvalidResponse(f"'{key}' must be a positive integer for image requests, got {value!r}")
    return int(value)  # type: ignore[arg-type]


def validate_response(routed: RoutedTask, response: dict[str, Any], *, image: bool) -> dict[str, Any]:
    """The reply for one task, checked and normalised; raises InvalidResponse."""
    task = routed.task
    if task.value not in response:
        raise InvalidResponse(f"reply has no '{task.value}'")
    value = response[task.value]
    out: dict[str, Any] = {}
    if task is ModelTask.CLIP:
        out[task.value] = check_embedding(value, routed.model.expected_dim, "clip embedding")
    elif task is ModelTask.FACIAL_RECOGNITION:
        out[task.value] = _faces(value, ModelType.RECOGNITION in routed.entries)
    else:
        out[task.value] = _ocr(value, ModelType.RECOGNITION in routed.entries)
    if image:
        # Immich's face job stores both in asset_face; its own service always sends them for images.
        out[IMAGE_HEIGHT] = _image_dimension(response, IMAGE_HEIGHT)
        out[IMAGE_WIDTH] = _image_dimension(response, IMAGE_WIDTH)
    return out
