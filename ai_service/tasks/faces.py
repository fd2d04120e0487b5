"""Facial recognition: detection (boxes, scores), then recognition (one 512-d embedding per face)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NotRequired, TypedDict

import numpy as np
from pydantic import TypeAdapter, ValidationError

from ai_service.imaging import DecodedImage
from ai_service.models.base import FaceDetectorModel, FaceRecognizerModel
from ai_service.protocol.immich import DEFAULT_FACE_MIN_SCORE, ModelTask, ModelType, embedding_to_str
from ai_service.protocol.mtphotos import RepresentFace
from ai_service.tasks.base import (
    Entries,
    InvalidReply,
    Models,
    MtPhotosCall,
    Task,
    check_embedding,
    finite_number,
    is_number,
    option,
)

EMBEDDING_DIMENSION = 512  # Immich's face_search.embedding is a fixed vector(512)
_MT_FACES = TypeAdapter(list[RepresentFace])


class BoundingBox(TypedDict):
    """Pixels of the image sent; integer-valued (Immich stores them in integer columns)."""

    x1: float
    y1: float
    x2: float
    y2: float


class DetectedFace(TypedDict):
    boundingBox: BoundingBox
    score: float
    embedding: NotRequired[str]


FacesOutput = list[DetectedFace]


@dataclass(frozen=True, slots=True)
class FaceResult:
    boxes: np.ndarray  # N x 4 pixels of the full-size image
    scores: np.ndarray
    embeddings: np.ndarray | None  # N x 512, or None for detection only


def detect_faces(detector: object, recognizer: object | None, rgb: np.ndarray, min_score: float) -> FaceResult:
    """Detect faces, then embed them unless ``recognizer`` is None (detection-only requests)."""
    assert isinstance(detector, FaceDetectorModel)
    detections = detector.detect(rgb, min_score)
    embeddings = None
    if recognizer is not None:
        assert isinstance(recognizer, FaceRecognizerModel)
        embeddings = (
            recognizer.embed(rgb, detections)
            if len(detections)
            else np.zeros((0, recognizer.embedding_size), np.float32)
        )
    return FaceResult(boxes=detections.boxes, scores=detections.scores, embeddings=embeddings)


def faces_to_immich(faces: FaceResult) -> FacesOutput:
    out: FacesOutput = []
    # Immich writes boxes into integer columns: send integer-valued numbers, as its ML service does.
    boxes = np.round(faces.boxes).astype(np.float64)
    for i in range(len(boxes)):
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        face: DetectedFace = {"boundingBox": {"x1": x1, "y1": y1, "x2": x2, "y2": y2}, "score": float(faces.scores[i])}
        if faces.embeddings is not None:
            face["embedding"] = embedding_to_str(faces.embeddings[i])
        out.append(face)
    return out


def _checked_face(i: int, face: object, with_embeddings: bool) -> DetectedFace:
    if not isinstance(face, dict) or not isinstance(face.get("boundingBox"), dict):
        raise InvalidReply(f"face {i} has no boundingBox")
    box = face["boundingBox"]
    coords = [box.get(k) for k in ("x1", "y1", "x2", "y2")]
    if not all(is_number(c) for c in coords):
        raise InvalidReply(f"face {i} boundingBox is not four finite numbers: {box}")
    x1, y1, x2, y2 = (float(round(c)) for c in coords)  # type: ignore[arg-type]
    if x2 < x1 or y2 < y1:
        raise InvalidReply(f"face {i} boundingBox is inverted: {box}")
    if not is_number(face.get("score")):
        raise InvalidReply(f"face {i} score is not a number")
    # Fields this gateway does not know pass through: a newer backend may send more than Immich reads today.
    checked: DetectedFace = {**face, "boundingBox": {**box, "x1": x1, "y1": y1, "x2": x2, "y2": y2}}  # type: ignore[typeddict-item]
    if with_embeddings:
        checked["embedding"] = check_embedding(face.get("embedding"), EMBEDDING_DIMENSION, f"face {i} embedding")
    return checked


def mtphotos_to_immich(data: dict[str, Any], min_score: float, with_embeddings: bool) -> FacesOutput:
    """MT Photos' ``/represent`` reply: ``{x, y, w, h}`` boxes -> Immich's ``{x1, y1, x2, y2}``, minScore applied."""
    try:
        faces = _MT_FACES.validate_python(data.get("result"))
    except ValidationError as exc:
        raise InvalidReply(f"face reply has the wrong shape: {exc.error_count()} errors") from None
    out: FacesOutput = []
    for face in faces:
        score = finite_number(face.face_confidence, "face_confidence")
        if score < min_score:
            continue
        area = face.facial_area
        # Integer-valued floats, as Immich's service sends; Immich stores them in integer columns.
        box: BoundingBox = {
            "x1": float(area.x),
            "y1": float(area.y),
            "x2": float(area.x + area.w),
            "y2": float(area.y + area.h),
        }
        item: DetectedFace = {"boundingBox": box, "score": score}
        if with_embeddings:
            vector = np.array([finite_number(v, "face embedding") for v in face.embedding], dtype=np.float32)
            item["embedding"] = embedding_to_str(vector)
        out.append(item)
    return out


class Faces(Task):
    name = ModelTask.FACIAL_RECOGNITION
    types = frozenset({ModelType.DETECTION, ModelType.RECOGNITION})
    depends_on: ClassVar[Mapping[ModelType, ModelType]] = {ModelType.RECOGNITION: ModelType.DETECTION}
    timeout_s = 60.0
    embedding_dimension = EMBEDDING_DIMENSION

    def run_image(self, models: Models, entries: Entries, image: DecodedImage) -> FacesOutput:
        min_score = option(entries, ModelType.DETECTION, "min_score", DEFAULT_FACE_MIN_SCORE)
        faces = detect_faces(models[ModelType.DETECTION], models.get(ModelType.RECOGNITION), image.rgb, min_score)
        return faces_to_immich(faces)

    def check_reply(self, value: object, entries: Entries, expected_dim: int | None) -> FacesOutput:
        if not isinstance(value, list):
            raise InvalidReply(f"facial-recognition must be a list, got {type(value).__name__}")
        with_embeddings = ModelType.RECOGNITION in entries
        return [_checked_face(i, face, with_embeddings) for i, face in enumerate(value)]

    def mtphotos_call(self, entries: Entries, image: bytes | None, text: str | None) -> MtPhotosCall:
        return MtPhotosCall("represent")

    def from_mtphotos(self, data: dict[str, Any], entries: Entries, size: tuple[int, int] | None) -> FacesOutput:
        min_score = option(entries, ModelType.DETECTION, "min_score", DEFAULT_FACE_MIN_SCORE)
        return mtphotos_to_immich(data, min_score, ModelType.RECOGNITION in entries)


FACES = Faces()
