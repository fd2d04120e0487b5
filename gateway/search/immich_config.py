"""Immich's machine-learning settings, read where Immich keeps them, so the gateway infers with the same models.

Immich stores only the values an admin changed, as JSON in ``system_metadata`` under the key
``'system-config'`` (or reads a config file, ``IMMICH_CONFIG_FILE``, instead); everything else is the default
of ``server/src/config.ts``. A value Immich itself would refuse falls back to the default with a warning, so a
hand-edited config never breaks search.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ai_service.protocol.immich import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_FACE_MAX_DISTANCE,
    DEFAULT_FACE_MODEL,
    DEFAULT_OCR_MAX_RESOLUTION,
    DEFAULT_OCR_MIN_DETECTION_SCORE,
    DEFAULT_OCR_MIN_RECOGNITION_SCORE,
    DEFAULT_OCR_MODEL,
)

log = logging.getLogger("gateway.search")


@dataclass(frozen=True, slots=True)
class ClipConfig:
    enabled: bool = True
    model_name: str = DEFAULT_CLIP_MODEL


@dataclass(frozen=True, slots=True)
class OcrConfig:
    enabled: bool = True
    model_name: str = DEFAULT_OCR_MODEL
    min_detection_score: float = DEFAULT_OCR_MIN_DETECTION_SCORE
    min_recognition_score: float = DEFAULT_OCR_MIN_RECOGNITION_SCORE
    max_resolution: int = DEFAULT_OCR_MAX_RESOLUTION


@dataclass(frozen=True, slots=True)
class FaceConfig:
    enabled: bool = True
    model_name: str = DEFAULT_FACE_MODEL
    max_distance: float = DEFAULT_FACE_MAX_DISTANCE  # cosine distance at which Immich joins two faces


@dataclass(frozen=True, slots=True)
class MlConfig:
    enabled: bool = True  # machineLearning.enabled
    clip: ClipConfig = ClipConfig()
    ocr: OcrConfig = OcrConfig()
    faces: FaceConfig = FaceConfig()
    source: str = "defaults"  # where it came from: 'database', 'file' or 'defaults' (for logs)

    @property
    def clip_enabled(self) -> bool:
        return self.enabled and self.clip.enabled

    @property
    def ocr_enabled(self) -> bool:
        return self.enabled and self.ocr.enabled

    @property
    def faces_enabled(self) -> bool:
        return self.enabled and self.faces.enabled


def _section(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = data.get(key)
    return value if isinstance(value, Mapping) else {}


def _bool(section: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    value = section.get(key, default)
    if isinstance(value, bool):
        return value
    log.warning("Immich setting %s.%s is not a boolean; using %s", where, key, default)
    return default


def _name(section: Mapping[str, Any], key: str, default: str, where: str) -> str:
    value = section.get(key, default)
    if isinstance(value, str) and value.strip():
        return value.strip()
    log.warning("Immich setting %s.%s is not a model name; using %s", where, key, default)
    return default


def _score(section: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = section.get(key, default)
    # Immich's DTO accepts 0.1..1 for the OCR scores.
    if isinstance(value, int | float) and not isinstance(value, bool) and 0.1 <= float(value) <= 1.0:
        return float(value)
    log.warning("Immich setting %s.%s is out of range; using %s", where, key, default)
    return default


def _max_distance(section: Mapping[str, Any], where: str) -> float:
    value = section.get("maxDistance", DEFAULT_FACE_MAX_DISTANCE)
    # Immich's DTO accepts 0.1..2 for facialRecognition.maxDistance.
    if isinstance(value, int | float) and not isinstance(value, bool) and 0.1 <= float(value) <= 2.0:
        return float(value)
    log.warning("Immich setting %s.maxDistance is out of range; using %s", where, DEFAULT_FACE_MAX_DISTANCE)
    return DEFAULT_FACE_MAX_DISTANCE


def _positive_int(section: Mapping[str, Any], key: str, default: int, where: str) -> int:
    value = section.get(key, default)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    log.warning("Immich setting %s.%s is not a positive integer; using %s", where, key, default)
    return default


def parse_ml_config(raw: Any, source: str) -> MlConfig:
    """The effective machine-learning settings from Immich's stored config (only non-default values)."""
    data = raw if isinstance(raw, Mapping) else {}
    ml = _section(data, "machineLearning")
    clip = _section(ml, "clip")
    ocr = _section(ml, "ocr")
    faces = _section(ml, "facialRecognition")
    where_clip, where_ocr = "machineLearning.clip", "machineLearning.ocr"
    where_faces = "machineLearning.facialRecognition"
    return MlConfig(
        enabled=_bool(ml, "enabled", True, "machineLearning"),
        clip=ClipConfig(
            enabled=_bool(clip, "enabled", True, where_clip),
            model_name=_name(clip, "modelName", DEFAULT_CLIP_MODEL, where_clip),
        ),
        ocr=OcrConfig(
            enabled=_bool(ocr, "enabled", True, where_ocr),
            model_name=_name(ocr, "modelName", DEFAULT_OCR_MODEL, where_ocr),
            min_detection_score=_score(ocr, "minDetectionScore", DEFAULT_OCR_MIN_DETECTION_SCORE, where_ocr),
            min_recognition_score=_score(ocr, "minRecognitionScore", DEFAULT_OCR_MIN_RECOGNITION_SCORE, where_ocr),
            max_resolution=_positive_int(ocr, "maxResolution", DEFAULT_OCR_MAX_RESOLUTION, where_ocr),
        ),
        faces=FaceConfig(
            enabled=_bool(faces, "enabled", True, where_faces),
            model_name=_name(faces, "modelName", DEFAULT_FACE_MODEL, where_faces),
            max_distance=_max_distance(faces, where_faces),
        ),
        source=source if isinstance(raw, Mapping) else "defaults",
    )
