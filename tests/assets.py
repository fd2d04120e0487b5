"""Real test photos, as encoded bytes (what Immich would upload).

* :func:`astronaut_jpeg`: scikit-image's ``astronaut`` (Eileen Collins, NASA, public domain), one face.
* :func:`insightface_t1_jpeg`: InsightFace's sample ``t1.jpg`` (1280x886, six faces). It ships in the
  InsightFace sdist on PyPI; the first call downloads that sdist with pip (~0.5 MB, no install),
  extracts the one image into the asset cache (``~/.cache/immich-zh-ai/test-assets``, or
  ``$IMMICH_ZH_AI_TEST_ASSETS``) and later calls read the cached copy.
* :func:`preview_jpeg`: an image resized to Immich's preview size (shorter side 1440 px).
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

ASSETS_ENV = "IMMICH_ZH_AI_TEST_ASSETS"
INSIGHTFACE_SDIST = "insightface==0.7.3"
T1_MEMBER = "insightface/data/images/t1.jpg"
T1_SHA256 = "47f682e945b659f93a9e490b9c9c4a2a864abe64dace9e1a2893845ddfd69489"
PREVIEW_SIDE = 1440


class AssetUnavailableError(RuntimeError):
    """A test photo could not be fetched (no network to PyPI, pip failure)."""


def assets_dir() -> Path:
    override = os.environ.get(ASSETS_ENV)
    folder = Path(override) if override else Path.home() / ".cache" / "immich-zh-ai" / "test-assets"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


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
    """InsightFace's ``t1.jpg``; raises :class:`AssetUnavailableError` if it cannot be fetched."""
    target = assets_dir() / "insightface_t1.jpg"
    if target.is_file():
        data = target.read_bytes()
        if hashlib.sha256(data).hexdigest() == T1_SHA256:
            return data
    data = _fetch_t1()
    tmp = target.with_name(f".{target.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, target)  # atomic: concurrent test runs never see half a file
    return data


def _fetch_t1() -> bytes:
    with tempfile.TemporaryDirectory(prefix="insightface-sdist-") as tmp:
        # --no-binary for this package only: its build dependencies (numpy, Cython) still come as
        # wheels, because pip prepares an sdist's metadata even for `download`.
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            "insightface",
            "--disable-pip-version-check",
            "-q",
            "-d",
            tmp,
            INSIGHTFACE_SDIST,
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise AssetUnavailableError(f"could not run pip to fetch {INSIGHTFACE_SDIST}: {exc}") from exc
        sdists = sorted(Path(tmp).glob("insightface-*.tar.gz"))
        if proc.returncode != 0 and not sdists:
            raise AssetUnavailableError(
                f"could not download the {INSIGHTFACE_SDIST} sdist from PyPI, which holds the test photo "
                f"{T1_MEMBER} (is PyPI reachable?). Alternatively put t1.jpg at "
                f"{assets_dir() / 'insightface_t1.jpg'}.\n$ {' '.join(cmd)}\n{proc.stderr[-2000:]}"
            )
        if not sdists:
            raise AssetUnavailableError(f"pip succeeded but left no insightface sdist in {tmp}")
        with tarfile.open(sdists[0], "r:gz") as tar:
            member = next((m for m in tar.getmembers() if m.name.endswith("/" + T1_MEMBER)), None)
            if member is None or not member.isfile():
                raise AssetUnavailableError(f"{sdists[0].name} does not contain {T1_MEMBER}")
            extracted = tar.extractfile(member)
            assert extracted is not None
            data = extracted.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != T1_SHA256:
        raise AssetUnavailableError(f"{T1_MEMBER} has SHA-256 {digest}, expected {T1_SHA256}")
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
