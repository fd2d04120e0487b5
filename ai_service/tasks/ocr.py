"""OCR: detection (text line quads), then recognition (the text of each line)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, TypedDict

import numpy as np
from pydantic import ValidationError

from ai_service.imaging import DecodedImage
from ai_service.models.base import OcrModel, TextLines
from ai_service.protocol.immich import (
    DEFAULT_OCR_MAX_RESOLUTION,
    DEFAULT_OCR_MIN_DETECTION_SCORE,
    DEFAULT_OCR_MIN_RECOGNITION_SCORE,
    ModelTask,
    ModelType,
)
from ai_service.protocol.mtphotos import OcrResponse
from ai_service.protocol.reading_order import sort_lines
from ai_service.tasks.base import Entries, InvalidReply, Models, MtPhotosCall, Task, finite_number, is_number, option

_BOX_SLACK = 1e-3  # normalised coordinates may overshoot 0-1 by float error, not by more


class OcrOutput(TypedDict):
    text: list[str]
    box: list[float]
    boxScore: list[float]
    textScore: list[float]


"""Line i is ``text[i]``, ``box[8i:8i+8]`` (a normalised quad clockwise from top-left), ``boxScore[i]``,
``textScore[i]``; detection-only replies have empty ``text``/``textScore``."""


def read_text(
    engine: object, rgb: np.ndarray, det_min_score: float, max_resolution: int, rec_min_score: float | None
) -> TextLines:
    """Detect text lines, then recognise them unless ``rec_min_score`` is None (detection-only requests)."""
    assert isinstance(engine, OcrModel)
    detections = engine.detect(rgb, det_min_score, max_resolution)
    if rec_min_score is None:
        return TextLines(quads=detections.quads, box_scores=detections.scores)
    return engine.recognize(rgb, detections, rec_min_score)


def ocr_to_immich(lines: TextLines, width: int, height: int) -> OcrOutput:
    quads = np.asarray(lines.quads, dtype=np.float64).reshape(-1, 4, 2)
    scale = np.array([width, height], dtype=np.float64)
    normalised = np.clip(quads / scale, 0.0, 1.0).reshape(-1)
    return {
        "text": list(lines.texts),
        "box": [float(v) for v in normalised],
        "boxScore": [float(s) for s in lines.box_scores],
        "textScore": [float(s) for s in lines.text_scores],
    }


def mtphotos_to_immich(data: dict[str, Any], width: int, height: int, min_score: float) -> OcrOutput:
    """MT Photos' ``/ocr`` reply: pixel rectangles -> normalised quads in reading order, minScore applied."""
    try:
        result = OcrResponse.model_validate(data).result
    except ValidationError as exc:
        raise InvalidReply(f"OCR reply has the wrong shape: {exc.error_count()} errors") from None
    if not len(result.texts) == len(result.scores) == len(result.boxes):
        raise InvalidReply(
            f"OCR reply arrays differ in length: {len(result.texts)} texts, {len(result.scores)} scores, "
            f"{len(result.boxes)} boxes"
        )
    lines: list[tuple[float, float, tuple[str, float, list[float]]]] = []
    for text, raw_score, box in zip(result.texts, result.scores, result.boxes, strict=True):
        score = finite_number(raw_score, "OCR score")
        if score <= min_score:  # Immich's rule: a line at exactly minScore is dropped
            continue
        x, y = finite_number(box.x, "OCR box x"), finite_number(box.y, "OCR box y")
        w, h = finite_number(box.width, "OCR box width"), finite_number(box.height, "OCR box height")
        left, right = sorted((x, x + w))
        top, bottom = sorted((y, y + h))
        corners = [left, top, right, top, right, bottom, left, bottom]  # clockwise from top-left
        quad = [min(1.0, max(0.0, v / (width if i % 2 == 0 else height))) for i, v in enumerate(corners)]
        lines.append((top, left, (text, score, quad)))
    out: OcrOutput = {"text": [], "box": [], "boxScore": [], "textScore": []}
    for text, score, quad in sort_lines(lines):
        out["text"].append(text)
        out["box"].extend(quad)
        out["boxScore"].append(score)
        out["textScore"].append(score)  # MT Photos reports one score per line
    return out


def _check_text(out: OcrOutput, n: int) -> None:
    text, text_score = out["text"], out["textScore"]
    if not isinstance(text, list) or not all(isinstance(t, str) for t in text) or len(text) != n:
        raise InvalidReply(f"ocr 'text' must be {n} strings")
    if not isinstance(text_score, list) or len(text_score) != n or not all(is_number(v) for v in text_score):
        raise InvalidReply(f"ocr 'textScore' must be {n} numbers")


class Ocr(Task):
    name = ModelTask.OCR
    types = frozenset({ModelType.DETECTION, ModelType.RECOGNITION})
    depends_on: ClassVar[Mapping[ModelType, ModelType]] = {ModelType.RECOGNITION: ModelType.DETECTION}
    timeout_s = 60.0

    def run_image(self, models: Models, entries: Entries, image: DecodedImage) -> OcrOutput:
        rec_min = (
            option(entries, ModelType.RECOGNITION, "min_score", DEFAULT_OCR_MIN_RECOGNITION_SCORE)
            if ModelType.RECOGNITION in entries
            else None
        )
        lines = read_text(
            models[ModelType.DETECTION],
            image.rgb,
            option(entries, ModelType.DETECTION, "min_score", DEFAULT_OCR_MIN_DETECTION_SCORE),
            option(entries, ModelType.DETECTION, "max_resolution", DEFAULT_OCR_MAX_RESOLUTION),
            rec_min,
        )
        return ocr_to_immich(lines, image.width, image.height)

    def check_reply(self, value: object, entries: Entries, expected_dim: int | None) -> OcrOutput:
        if not isinstance(value, dict):
            raise InvalidReply(f"ocr must be an object, got {type(value).__name__}")
        box, box_score = value.get("box"), value.get("boxScore")
        if not isinstance(box, list) or not isinstance(box_score, list):
            raise InvalidReply("ocr needs 'box' and 'boxScore' arrays")
        n = len(box_score)
        if len(box) != 8 * n:
            raise InvalidReply(f"ocr has {len(box)} box numbers for {n} lines (expected 8 per line)")
        if not all(is_number(v) for v in box) or not all(is_number(v) for v in box_score):
            raise InvalidReply("ocr box or boxScore holds something other than finite numbers")
        if any(v < -_BOX_SLACK or v > 1 + _BOX_SLACK for v in box):
            raise InvalidReply("ocr boxes are not normalised to 0-1 (pixel coordinates?)")
        # Fields this gateway does not know pass through: a newer backend may send more than Immich reads today.
        out: OcrOutput = {
            **value,  # type: ignore[typeddict-item]
            "text": value.get("text", []),
            "box": [min(1.0, max(0.0, float(v))) for v in box],
            "boxScore": box_score,
            "textScore": value.get("textScore", []),
        }
        if ModelType.RECOGNITION in entries:
            _check_text(out, n)
        return out

    def mtphotos_call(self, entries: Entries, image: bytes | None, text: str | None) -> MtPhotosCall:
        return MtPhotosCall("ocr")

    def from_mtphotos(self, data: dict[str, Any], entries: Entries, size: tuple[int, int] | None) -> OcrOutput:
        assert size is not None  # the adapter probes every image it sends
        min_score = option(entries, ModelType.RECOGNITION, "min_score", DEFAULT_OCR_MIN_RECOGNITION_SCORE)
        return mtphotos_to_immich(data, size[0], size[1], min_score)


OCR = Ocr()
