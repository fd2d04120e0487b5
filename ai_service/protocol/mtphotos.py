"""MT Photos AI API shapes (``/check``, ``/ocr``, ``/clip/img``, ``/clip/txt``, ``/represent``).

MT Photos clients read numbers as strings in some places (OCR scores and boxes, CLIP vectors);
these models reproduce that exactly. The gateway's MT Photos backend parses the same classes.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

API_KEY_HEADER = "api-key"

# What MT Photos' own AI services run: the official image's Chinese-CLIP ViT-B-16, and InsightFace buffalo_l
# in its face service. MT Photos ignores the model name it is sent.
MTPHOTOS_CLIP_MODEL = "ViT-B-16__cn-clip"
MTPHOTOS_FACE_MODEL = "buffalo_l"


class CheckResponse(BaseModel):
    result: str = "pass"
    title: str = "immich-zh-ai (MT Photos AI API)"
    help: str = "https://mtmt.tech/docs/advanced/ocr_api"
    device: str = "cpu"


class OcrBox(BaseModel):
    """Axis-aligned box in pixels, numbers as strings (MT Photos' format)."""

    x: str
    y: str
    width: str
    height: str


class OcrResult(BaseModel):
    texts: list[str] = Field(default_factory=list)
    scores: list[str] = Field(default_factory=list)
    boxes: list[OcrBox] = Field(default_factory=list)


class OcrResponse(BaseModel):
    result: OcrResult


class ClipResponse(BaseModel):
    """One embedding as decimal strings."""

    result: list[str]


class ClipTextRequest(BaseModel):
    text: str = Field(min_length=1)


class FacialArea(BaseModel):
    x: int
    y: int
    w: int
    h: int


class RepresentFace(BaseModel):
    embedding: list[float]
    facial_area: FacialArea
    face_confidence: float


class RepresentResponse(BaseModel):
    detector_backend: str
    recognition_model: str
    result: list[RepresentFace]


class ErrorResponse(BaseModel):
    """Error body: ``detail`` for HTTP clients, ``result``/``msg`` for MT Photos' own error check."""

    detail: str
    msg: str
    result: list[object] = Field(default_factory=list)


def format_number(value: float, digits: int | None = None) -> str:
    return repr(float(value)) if digits is None else f"{value:.{digits}f}"
