"""What every model family provides, and the errors model lookup can raise.

Model objects are synchronous and thread-safe for concurrent calls; the HTTP layer runs them in
its thread pool. Arrays are RGB ``uint8`` H x W x 3 as produced by :mod:`ai_service.imaging`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from ai_service.errors import InvalidInput, NotFound, ServiceError, Unavailable


class ModelError(ServiceError):
    """Base class of model lookup, install and load errors; each also has its kind (ai_service/errors.py)."""


class InvalidModelNameError(ModelError, InvalidInput):
    pass


class UnknownModelError(ModelError, NotFound):
    """Neither installed nor a model this service knows how to install."""


class ModelNotInstalledError(ModelError, Unavailable):
    """A known model whose files are missing; the message says how to install it.

    ``downloadable`` says whether the service can fetch it by itself (download on first use)."""

    def __init__(self, message: str, *, task: str | None = None, name: str | None = None, downloadable: bool = False):
        super().__init__(message)
        self.task = task
        self.name = name
        self.downloadable = downloadable


class ModelLoadError(ModelError, Unavailable):
    """The files are there but could not be loaded (corrupt download, wrong layout)."""


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-+]{0,127}$")


def clean_name(name: str) -> str:
    """Immich's rule (keep what follows the last '/', ':' -> '_', drop '.'), then refuse anything that
    could escape the model folder: the result is a single, plain path component."""
    cleaned = name.split("/")[-1].replace(":", "_").replace(".", "")
    if not _NAME_RE.fullmatch(cleaned):
        raise InvalidModelNameError(f"invalid model name {name!r}: after cleaning it must match {_NAME_RE.pattern}")
    return cleaned


# ---- CLIP ------------------------------------------------------------------------------------------


@runtime_checkable
class ClipVisualModel(Protocol):
    embedding_size: int
    input_size: int  # the model's square input side; lets the decoder use JPEG draft mode

    def encode_image(self, image: np.ndarray) -> np.ndarray:
        """One RGB image -> L2-normalised float32 vector of ``embedding_size``."""
        ...


@runtime_checkable
class ClipTextualModel(Protocol):
    embedding_size: int

    def encode_text(self, text: str, language: str | None = None) -> np.ndarray:
        """One query -> L2-normalised float32 vector of ``embedding_size``."""
        ...


# ---- faces -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FaceDetections:
    boxes: np.ndarray  # N x 4 float32 (x1, y1, x2, y2) in pixels of the image given
    scores: np.ndarray  # N float32
    landmarks: np.ndarray | None = None  # N x 5 x 2 float32 (eyes, nose, mouth corners), if the detector has them

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


@runtime_checkable
class FaceDetectorModel(Protocol):
    def detect(self, image: np.ndarray, min_score: float) -> FaceDetections: ...


@runtime_checkable
class FaceRecognizerModel(Protocol):
    embedding_size: int  # always 512 for Immich's face_search column

    def embed(self, image: np.ndarray, faces: FaceDetections) -> np.ndarray:
        """N x ``embedding_size`` float32 embeddings, one row per detected face."""
        ...


# ---- OCR -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextDetections:
    quads: np.ndarray  # N x 4 x 2 float32 corners in pixels, clockwise from top-left
    scores: np.ndarray  # N float32 detection scores


@dataclass(slots=True)
class TextLines:
    quads: np.ndarray  # N x 4 x 2 float32 pixels, clockwise from top-left, sorted top-to-bottom, left-to-right
    box_scores: np.ndarray  # N float32
    texts: list[str] = field(default_factory=list)
    text_scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


@runtime_checkable
class OcrModel(Protocol):
    def detect(self, image: np.ndarray, min_score: float, max_resolution: int | None) -> TextDetections: ...

    def recognize(self, image: np.ndarray, detections: TextDetections, min_score: float) -> TextLines: ...


# ---- NSFW ------------------------------------------------------------------------------------------


@runtime_checkable
class NsfwModel(Protocol):
    input_size: int  # the side the model resizes to; lets the decoder use JPEG draft mode

    def score(self, image: np.ndarray) -> float:
        """One RGB image -> P(nsfw) in 0-1."""
        ...
