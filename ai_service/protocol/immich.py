"""Immich machine-learning protocol (Immich 3.1): the one definition of its request and response shapes.

The gateway imports these too, so a field name is spelled in exactly one place. What differs per task
(its types, options' defaults, response shape) lives in ``ai_service/tasks/``, which also checks
``entries`` against the task table (``parse_entries``).
What Immich sends: a multipart form with ``entries`` (JSON, ``task -> type -> {modelName, options}``)
and either an ``image`` file part or a ``text`` field. What it reads back: per task, the shapes in
``ai_service/tasks/<task>.py`` (``PredictResponse`` in ``ai_service/tasks/__init__.py``), with embeddings
serialised as *strings* holding a JSON array (Immich passes them to pgvector as is).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, RootModel, field_validator

from ai_service.errors import InvalidInput, Unprocessable

# ---- Immich's defaults (server/src/config.ts, Immich 3.1): what its server sends unless an admin changed it ----

DEFAULT_CLIP_MODEL = "ViT-B-32__openai"
DEFAULT_FACE_MODEL = "buffalo_l"
DEFAULT_FACE_MIN_SCORE = 0.7  # facial-recognition detection minScore
DEFAULT_FACE_MAX_DISTANCE = 0.5  # cosine distance at which Immich joins two faces into one person
DEFAULT_OCR_MODEL = "PP-OCRv5_mobile"
DEFAULT_OCR_MIN_DETECTION_SCORE = 0.5
DEFAULT_OCR_MIN_RECOGNITION_SCORE = 0.8
DEFAULT_OCR_MAX_RESOLUTION = 736


class ModelTask(StrEnum):
    CLIP = "clip"
    FACIAL_RECOGNITION = "facial-recognition"
    OCR = "ocr"
    NSFW = "nsfw"  # not an Immich task: the library's NSFW score (ai_service/tasks/nsfw.py)
    TAGGING = "tagging"  # this project's own task (Immich has none): see ai_service/tasks/tagging.py


class ModelType(StrEnum):
    VISUAL = "visual"
    TEXTUAL = "textual"
    DETECTION = "detection"
    RECOGNITION = "recognition"
    CLASSIFICATION = "classification"


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


def entries_json(entries: Mapping[ModelTask, Mapping[ModelType, PipelineEntry]]) -> bytes:
    """``entries`` as a client sends it (the inverse of :class:`Entries`), e.g. for a request to ``/predict``."""
    return orjson.dumps(
        {
            task.value: {
                type_.value: entry.model_dump(by_alias=True, exclude_none=True) for type_, entry in types.items()
            }
            for task, types in entries.items()
        }
    )


class EntriesError(Unprocessable, ValueError):
    """``entries`` is not what Immich sends; the message says what is wrong."""


def load_entries_json(raw: str | bytes) -> Any:
    """The ``entries`` form field as JSON data (not yet checked)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise EntriesError(f"'entries' is not valid JSON: {exc}") from None


class DependencyError(InvalidInput, ValueError):
    """A dependent entry (e.g. recognition) came without the entry it depends on."""


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


IMAGE_HEIGHT = "imageHeight"
IMAGE_WIDTH = "imageWidth"
