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


def _vector_to_hex(vector: np.ndarray) -> str:
    return f"{int(''.join('1' if b else '0' for b in vector), 2):064x}"


def hash_rgb(rgb: np.ndarray) -> PdqResult:
    """PDQ of an RGB array; one pass computes all 8 dihedral variants (same cost as one hash)."""
    hashes, quality = pdqhash.compute_dihedral(np.ascontiguousarray(rgb))
    hexes = tuple(_vector_to_hex(h) for h in hashes)
    return PdqResult(hash_hex=hexes[0], quality=int(quality), dihedral_hex=hexes)


def hash_image(data: bytes, *, max_pixels: int) -> PdqResult:
    """PDQ of encoded image bytes. EXIF orientation is applied (the upright picture is what people see);
    the RGB conversion is Pillow's, as in python-threatexchange, so published hashes reproduce bit for bit.
    Raises ``ImageError`` / ``ImageTooLargeError`` for bytes that are not a usable image."""
    return hash_rgb(decode_image(data, max_pixels=max_pixels, pillow_rgb=True).rgb)


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
