"""Requests exactly as the Immich 3.1 server builds them (Node FormData), and how it reads replies."""

from __future__ import annotations

import json
from typing import Any

import httpx

CLIP_VISUAL = {"clip": {"visual": {"modelName": "ViT-B-32__openai"}}}
FACES = {
    "facial-recognition": {
        "detection": {"modelName": "buffalo_l", "options": {"minScore": 0.7}},
        "recognition": {"modelName": "buffalo_l"},
    }
}
OCR = {
    "ocr": {
        "detection": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.5, "maxResolution": 736}},
        "recognition": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.8}},
    }
}


def clip_textual(model: str = "ViT-B-32__openai", language: str | None = "zh-CN") -> dict[str, Any]:
    options = {"language": language} if language else {}
    return {"clip": {"textual": {"modelName": model, "options": options}}}


def clip_visual(model: str = "ViT-B-32__openai") -> dict[str, Any]:
    return {"clip": {"visual": {"modelName": model}}}


def faces(model: str = "buffalo_l", min_score: float = 0.7) -> dict[str, Any]:
    return {
        "facial-recognition": {
            "detection": {"modelName": model, "options": {"minScore": min_score}},
            "recognition": {"modelName": model},
        }
    }


def predict(
    client: httpx.Client,
    base: str,
    entries: dict[str, Any] | str,
    *,
    image: bytes | None = None,
    text: str | None = None,
) -> httpx.Response:
    """POST /predict as multipart: ``entries`` JSON, ``image`` as filename "blob" octet-stream, or ``text``."""
    data = {"entries": entries if isinstance(entries, str) else json.dumps(entries)}
    if text is not None:
        data["text"] = text
    files = {"image": ("blob", image, "application/octet-stream")} if image is not None else None
    return client.post(f"{base}/predict", data=data, files=files)


def parse_embedding(value: str) -> list[float]:
    """Immich passes the string straight to pgvector; here we check it parses as a JSON float array."""
    assert isinstance(value, str), f"embedding must be a JSON string, got {type(value).__name__}"
    vector = json.loads(value)
    assert isinstance(vector, list) and vector and all(isinstance(v, float | int) for v in vector)
    return [float(v) for v in vector]
