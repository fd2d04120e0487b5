"""PDQ perceptual hashes (Meta's ThreatExchange algorithm, the ``pdqhash`` package).

Hashes travel as 64 hex digits (ThreatExchange's notation) and are stored as PostgreSQL ``bit(256)``
(bit strings, most significant bit first), where pgvector's ``<~>`` is the Hamming distance.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pdqhash

from ai_service.imaging import decode_image

HASH_BITS = 256
_HEX = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True)
class PdqResult:
    hash_hex: str  # the image as given (upright)
    quality: int  # 0..100; below ~50 the hash is unreliable (flat or tiny images)
    dihedral_hex: tuple[str, ...]  # the 8 rotations/mirrors, [0] == hash_hex

    @property
    def bits(self) -> str:
        return hex_to_bits(self.hash_hex)

    @property
    def dihedral_bits(self) -> list[str]:
        return [hex_to_bits(h) for h in self.dihedral_hex]


@dataclass(frozen=True)
class PdqHashes:
    """An image's PDQ: ``plain`` is exactly what ThreatExchange computes (blocklists are made of these);
    ``trimmed`` is the hash after cutting a uniform frame (letterbox bars, a screenshot's margins), present
    only when the image has one. Both are stored and both are queried, so a framed copy matches."""

    plain: PdqResult
    trimmed: PdqResult | None

    @property
    def variants(self) -> list[tuple[str, PdqResult]]:
        found = [("plain", self.plain)]
        if self.trimmed is not None:
            found.append(("trimmed", self.trimmed))
        return found

    @property
    def query_bits(self) -> list[str]:
        """All dihedral hashes of every variant: what a search or blocklist check compares."""
        return [b for _, result in self.variants for b in result.dihedral_bits]


def _vector_to_hex(vector: np.ndarray) -> str:
    return f"{int(''.join('1' if b else '0' for b in vector), 2):064x}"


def hash_rgb(rgb: np.ndarray) -> PdqResult:
    """PDQ of an RGB array; one pass computes all 8 dihedral variants (same cost as one hash)."""
    hashes, quality = pdqhash.compute_dihedral(np.ascontiguousarray(rgb))
    hexes = tuple(_vector_to_hex(h) for h in hashes)
    return PdqResult(hash_hex=hexes[0], quality=int(quality), dihedral_hex=hexes)


# A row/column belongs to a frame when at least this share of its pixels is within _FRAME_TOLERANCE (per
# channel) of the line's median colour: a status bar with a clock or a caption strip still counts (text is
# sparse), a row through a photograph rarely does.
_FRAME_SHARE = 0.75
_FRAME_TOLERANCE = 24
# Keep at least this share of each side; a "frame" that leaves less is the picture itself (a flat image).
_MIN_KEPT = 0.3


def _uniform_lines(lines: np.ndarray) -> np.ndarray:
    """Bool per line of ``lines`` (n x length x 3): the line is (almost) one colour."""
    median = np.median(lines, axis=1, keepdims=True)
    close = np.abs(lines.astype(np.int16) - median.astype(np.int16)).max(axis=2) <= _FRAME_TOLERANCE
    return close.mean(axis=1) >= _FRAME_SHARE


def _frame_depth(lines: np.ndarray, block: int = 32) -> int:
    """How many leading lines are frame; only looks as far as the frame goes (cheap on big photos)."""
    for start in range(0, len(lines), block):
        flags = _uniform_lines(lines[start : start + block])
        if not flags.all():
            return start + int(np.flatnonzero(~flags)[0])
    return len(lines)


def trim_frame(rgb: np.ndarray) -> np.ndarray | None:
    """``rgb`` without its uniform frame (any colour, each side on its own), or None when it has none.
    With black bars this is ThreatExchange's un-letterboxing. Rows and columns are trimmed in turns until
    nothing changes, so a line is judged without the margins already cut on the other axis."""
    height, width = rgb.shape[:2]
    top, bottom, left, right = 0, height, 0, width
    for _ in range(4):
        before = (top, bottom, left, right)
        view = rgb[top:bottom, left:right]
        top, bottom = top + _frame_depth(view), bottom - _frame_depth(view[::-1])
        if bottom - top < height * _MIN_KEPT:
            return None
        columns = rgb[top:bottom, left:right].transpose(1, 0, 2)
        left, right = left + _frame_depth(columns), right - _frame_depth(columns[::-1])
        if right - left < width * _MIN_KEPT:
            return None
        if (top, bottom, left, right) == before:
            break
    if (top, bottom, left, right) == (0, height, 0, width):
        return None
    return np.ascontiguousarray(rgb[top:bottom, left:right])


def hash_pixels(rgb: np.ndarray) -> PdqHashes:
    trimmed = trim_frame(rgb)
    return PdqHashes(plain=hash_rgb(rgb), trimmed=hash_rgb(trimmed) if trimmed is not None else None)


def hash_image(data: bytes, *, max_pixels: int, min_side: int = 0) -> PdqHashes:
    """PDQ of encoded image bytes. EXIF orientation is applied (the upright picture is what people see);
    the RGB conversion is Pillow's, as in python-threatexchange, so published hashes reproduce bit for bit.
    ``min_side`` > 0 lets JPEGs decode at reduced size (faster, hashes a few bits off; see settings).
    Raises ``ImageError`` / ``ImageTooLargeError`` for bytes that are not a usable image."""
    decoded = decode_image(data, max_pixels=max_pixels, pillow_rgb=True, min_side=min_side or None)
    return hash_pixels(decoded.rgb)


def hex_to_bits(value: str) -> str:
    if not _HEX.match(value):
        raise ValueError(f"not a PDQ hash (64 hex digits): {value[:80]!r}")
    return f"{int(value, 16):0256b}"


def bits_to_hex(bits: str) -> str:
    return f"{int(bits, 2):064x}"


def hamming(a_hex: str, b_hex: str) -> int:
    return (int(a_hex, 16) ^ int(b_hex, 16)).bit_count()


@dataclass(frozen=True)
class ReferenceHash:
    hash_hex: str
    quality: int | None
    label: str | None


_LINE = re.compile(r"^(?:pdq[\s,:]+)?([0-9a-fA-F]{64})(?:[\s,;]+(\d{1,3}))?(?:[\s,;]+(.*))?$")


def parse_reference_hashes(text: str, *, max_errors: int = 20) -> tuple[list[ReferenceHash], list[str]]:
    """Parse PDQ hashes in ThreatExchange's text forms, one per line:

    * ``<hex>`` (``threatexchange`` signal files), ``pdq <hex>`` (``threatexchange hash`` output),
    * ``<hex>,<quality>[,<label>]`` (the C++/Java ``pdq-photo-hasher`` output), tab or space separated too.

    Blank lines and ``#`` comments are skipped. Returns the hashes and up to ``max_errors`` messages about
    lines that are not hashes."""
    found: list[ReferenceHash] = []
    errors: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            if len(errors) < max_errors:
                errors.append(f"line {number}: not a PDQ hash: {line[:80]!r}")
            continue
        quality = int(match.group(2)) if match.group(2) is not None else None
        label = (match.group(3) or "").strip() or None
        found.append(ReferenceHash(match.group(1).lower(), quality, label[:500] if label else None))
    return found, errors
