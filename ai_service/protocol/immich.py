"""Immich machine-learning protocol (Immich 3.1): the one definition of its request and response shapes.

The gateway imports these too, so a field name is spelled in exactly one place.
What Immich sends: a multipart form with ``entries`` (JSON, ``task -> type -> {modelName, options}``)
and either an ``image`` file part or a ``text`` field. What it reads back: per task, the shapes below,
with embeddings serialised as *strings* holding a JSON array (Immich passes them to pgvector as is).
"""

from __future__ import annotations

import unicodedata
from enum import StrEnum
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, RootModel, ValidationError, field_validator


class ModelTask(StrEnum):
    CLIP = "clip"
    FACIAL_RECOGNITION = "facial-recognition"
    OCR = "ocr"


class ModelType(StrEnum):
    VISUAL = "visual"
    TEXTUAL = "textual"
    DETECTION = "detection"
    RECOGNITION = "recognition"


# Which (task, type) pairs exist and which ones depend on another's output.
VALID_TYPES: dict[ModelTask, frozenset[ModelType]] = {
    ModelTask.CLIP: frozenset({ModelType.VISUAL, ModelType.TEXTUAL}),
    ModelTask.FACIAL_RECOGNITION: frozenset({ModelType.DETECTION, ModelType.RECOGNITION}),
    ModelTask.OCR: frozenset({ModelType.DETECTION, ModelType.RECOGNITION}),
}
DEPENDS_ON: dict[tuple[ModelTask, ModelType], ModelType] = {
    (ModelTask.FACIAL_RECOGNITION, ModelType.RECOGNITION): ModelType.DETECTION,
    (ModelTask.OCR, ModelType.RECOGNITION): ModelType.DETECTION,
}


# What Immich's server sends by default; used when a client leaves an option out.
DEFAULT_FACE_MIN_SCORE = 0.7
DEFAULT_OCR_DET_MIN_SCORE = 0.5
DEFAULT_OCR_REC_MIN_SCORE = 0.8
DEFAULT_OCR_MAX_RESOLUTION = 736


class PredictOptions(BaseModel):
    """Per-request options. Unknown keys are ignored: a newer Immich may send more."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    min_score: float | None = Field(None, alias="minScore", ge=0.0, le=1.0)
    max_resolution: int | None = Field(None, alias="maxResolution", ge=1)
    language: str | None = None

    @field_validator("min_score", "max_resolution", mode="before")
    @classmethod
    def _json_number(cls, value: Any) -> Any:
        # Pydantic would read true as 1.0 and "0.5" as 0.5; Immich sends JSON numbers, and anything else
        # is a client bug that must not silently become a threshold.
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"must be a JSON number, not {type(value).__name__}")
        return value


class PipelineEntry(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model_name: str = Field(alias="modelName", min_length=1, max_length=256)
    options: PredictOptions = Field(default_factory=PredictOptions)


class Entries(RootModel[dict[ModelTask, dict[ModelType, PipelineEntry]]]):
    """The parsed ``entries`` form field."""


class EntriesError(ValueError):
    """``entries`` is not what Immich sends; the message says what is wrong."""


def load_entries_json(raw: str | bytes) -> Any:
    """The ``entries`` form field as JSON data (not yet checked)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EntriesError(f"'entries' is not valid JSON: {exc}") from None


def parse_entries(raw: str | bytes) -> dict[ModelTask, dict[ModelType, PipelineEntry]]:
    """Parse and check ``entries``: known tasks and types, dependencies present, at least one entry."""
    return validate_entries(load_entries_json(raw))


def validate_entries(data: Any) -> dict[ModelTask, dict[ModelType, PipelineEntry]]:
    """Check already-decoded ``entries`` data (see :func:`parse_entries`)."""
    try:
        entries = Entries.model_validate(data).root
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'entries'}: {err['msg']}" for err in exc.errors()
        )
        raise EntriesError(f"'entries' has the wrong shape: {problems}") from None
    if not entries or not any(entries.values()):
        raise EntriesError('\'entries\' names no task; expected e.g. {"clip":{"textual":{"modelName":…}}}')
    for task, types in entries.items():
        invalid = set(types) - VALID_TYPES[task]
        if invalid:
            allowed = ", ".join(sorted(VALID_TYPES[task]))
            raise EntriesError(f"task '{task}' has no type {', '.join(sorted(invalid))}; expected {allowed}")
    return entries


class DependencyError(ValueError):
    """A dependent entry (e.g. recognition) came without the entry it depends on."""


def check_dependencies(entries: dict[ModelTask, dict[ModelType, PipelineEntry]]) -> None:
    for task, types in entries.items():
        for type_ in types:
            needed = DEPENDS_ON.get((task, type_))
            if needed is not None and needed not in types:
                raise DependencyError(f"Task {task}/{type_} depends on output of {task}/{needed}")


def query_text_problem(text: str) -> str | None:
    """Why ``text`` cannot be a CLIP query, or None. Only whitespace, control and format characters
    (NUL, zero-width spaces, BOMs…) is no query: it would still get an embedding, one that matches
    arbitrary photos."""
    if not text.strip():
        return "'text' is empty"
    if all(unicodedata.category(c)[0] in "CZ" for c in text):
        return "'text' has no visible characters (only whitespace or control characters)"
    return None


# ---- responses -------------------------------------------------------------------------------------


def embedding_to_str(vector: np.ndarray) -> str:
    """Serialise an embedding the way Immich ML does: a JSON array inside a string (pgvector literal)."""
    return orjson.dumps(np.asarray(vector, dtype=np.float32), option=orjson.OPT_SERIALIZE_NUMPY).decode()


class BoundingBox(BaseModel):
    """Face box in pixels of the image sent; integer-valued (Immich stores them in integer columns)."""

    x1: float
    y1: float
    x2: float
    y2: float


class DetectedFace(BaseModel):
    bounding_box: BoundingBox = Field(serialization_alias="boundingBox")
    embedding: str | None = None
    score: float

    model_config = ConfigDict(populate_by_name=True)


class OcrOutput(BaseModel):
    """OCR lines: ``box`` holds 8 normalised numbers per line (clockwise quad from top-left)."""

    text: list[str] = Field(default_factory=list)
    box: list[float] = Field(default_factory=list)
    box_score: list[float] = Field(default_factory=list, serialization_alias="boxScore")
    text_score: list[float] = Field(default_factory=list, serialization_alias="textScore")

    model_config = ConfigDict(populate_by_name=True)


IMAGE_HEIGHT = "imageHeight"
IMAGE_WIDTH = "imageWidth"
