"""Helpers both CLIP encoders share: reading the model's JSON files, checking the output size, and
L2 normalisation (every vector the service returns has norm 1, whatever the ONNX graph does)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ai_service.models.base import ModelError, ModelLoadError

CONFIG_FILE = "config.json"


def read_json(path: Path, what: str, error: type[Exception] = ModelLoadError) -> dict[str, Any]:
    """A JSON object file; anything else raises ``error`` (a load error, or a conversion error while
    installing) with a message that names the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{what}: {path.name} is missing") from None
    except (OSError, ValueError) as exc:
        raise error(f"{what}: {path.name} is not readable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"{what}: {path.name} must hold a JSON object")
    return data


def config_embed_dim(config: dict[str, Any]) -> int | None:
    value = config.get("embed_dim")
    return value if isinstance(value, int) and value > 0 else None


def check_embedding_size(
    session: ort.InferenceSession, expected: int | None, probe: Callable[[], np.ndarray], what: str
) -> int:
    """The vector size the graph really produces, checked against ``config.json``'s ``embed_dim``.

    The static output shape answers without running anything; a graph whose last axis is symbolic
    is run once on a dummy input (``probe``), so a mismatch surfaces at load, not on the first
    request, and never as a pgvector dimension error in Immich's database."""
    shape = session.get_outputs()[0].shape
    last = shape[-1] if shape else None
    actual = last if isinstance(last, int) and last > 0 else int(np.asarray(probe()).reshape(1, -1).shape[-1])
    if expected is not None and actual != expected:
        raise ModelLoadError(
            f"{what}: the ONNX model outputs {actual}-d vectors but config.json says embed_dim={expected}; "
            "the files do not belong together, re-install the model"
        )
    return actual


def l2_normalize(rows: np.ndarray, what: str) -> np.ndarray:
    """Row-wise L2 normalisation to float32; refuses NaN/inf or all-zero outputs (a broken model)."""
    rows = np.asarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise ModelError(f"{what}: the model produced a zero or non-finite embedding")
    return rows / norms
