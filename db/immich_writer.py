"""Write OCR and CLIP results into Immich's own tables exactly as Immich's jobs do (for the per-asset
"regenerate" actions that Immich 3.1 does not offer). Each write is one transaction touching one asset's
rows only; our triggers then refresh that asset's OCR document inside the same transaction.

Reference: Immich 3.1 ``OcrService`` / ``OcrRepository.upsert`` and ``SmartInfoService`` /
``SearchRepository.upsert`` (see docs: shared/reference/immich-db-and-api.md §2.1-2.3, §7).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import psycopg

from db.connection import set_local_search_path
from db.settings import DbSearchSettings


class AssetNotFoundError(LookupError):
    """The asset does not exist (or was deleted while we were writing)."""


# --- Immich's tokenizeForSearch, ported -----------------------------------------------------------------------


def _is_cjk(unit: int) -> bool:
    # The exact ranges of server/src/utils/database.ts, tested per UTF-16 code unit.
    return (
        0x4E00 <= unit <= 0x9FFF
        or 0x3400 <= unit <= 0x4DBF
        or 0x3040 <= unit <= 0x309F
        or 0x30A0 <= unit <= 0x30FF
        or 0xAC00 <= unit <= 0xD7AF
    )


def _decode(units: Sequence[int]) -> str:
    return struct.pack(f"<{len(units)}H", *units).decode("utf-16-le", "surrogatepass")


def tokenize_for_search(text: str) -> list[str]:
    """Immich's ``tokenizeForSearch``: walks UTF-16 code units (as JavaScript's charCodeAt does); units
    <= 0x20 separate; a CJK run gives its overlapping bigrams (a lone CJK character itself); any other run
    of units > 0x20 is one verbatim token (no case folding, punctuation kept)."""
    data = text.encode("utf-16-le", "surrogatepass")
    units = struct.unpack(f"<{len(data) // 2}H", data)
    tokens: list[str] = []
    i, n = 0, len(units)
    while i < n:
        unit = units[i]
        if unit <= 0x20:
            i += 1
            continue
        start = i
        if _is_cjk(unit):
            while i < n and _is_cjk(units[i]):
                i += 1
            run = units[start:i]
            if len(run) == 1:
                tokens.append(_decode(run))
            else:
                tokens.extend(_decode(run[k : k + 2]) for k in range(len(run) - 1))
        else:
            while i < n and units[i] > 0x20 and not _is_cjk(units[i]):
                i += 1
            tokens.append(_decode(units[start:i]))
    return tokens


# --- OCR ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OcrLine:
    """One recognised line as Immich stores it: the four corners normalised to 0..1 against the unedited
    preview, in the order top-left, top-right, bottom-right, bottom-left."""

    text: str
    box: tuple[float, float, float, float, float, float, float, float]  # x1, y1, x2, y2, x3, y3, x4, y4
    box_score: float
    text_score: float


def ocr_search_text(lines: Sequence[OcrLine]) -> str:
    """``ocr_search.text`` as Immich writes it: tokenizeForSearch per line (bigrams never cross lines), all
    tokens joined by single spaces, in ML order."""
    return " ".join(token for line in lines for token in tokenize_for_search(line.text))


def _check_line(line: OcrLine) -> OcrLine:
    numbers = [*line.box, line.box_score, line.text_score]
    if len(line.box) != 8 or not all(math.isfinite(float(v)) for v in numbers):
        raise ValueError("an OCR line needs 8 finite box coordinates and finite scores")
    # PostgreSQL text cannot hold NUL; lone surrogates cannot be encoded: neither is meaningful OCR output.
    text = line.text.replace("\x00", "").encode("utf-8", "ignore").decode("utf-8")
    return OcrLine(text, tuple(float(v) for v in line.box), float(line.box_score), float(line.text_score))  # type: ignore[arg-type]


def _lock_asset(conn: psycopg.Connection[Any], asset_id: UUID) -> None:
    # FOR KEY SHARE: the asset cannot be deleted under us, Immich's own updates of it are not blocked.
    if conn.execute("SELECT 1 FROM asset WHERE id = %s FOR KEY SHARE", [asset_id]).fetchone() is None:
        raise AssetNotFoundError(f"asset {asset_id} not found")


def write_ocr_result(
    conn: psycopg.Connection[Any],
    asset_id: UUID,
    lines: Sequence[OcrLine],
    *,
    settings: DbSearchSettings | None = None,
    now: datetime | None = None,
) -> None:
    """Replace one asset's OCR as Immich's OCR job does, in one transaction: delete + insert its
    ``asset_ocr`` rows and upsert ``ocr_search`` (or delete it when nothing was found) in one statement,
    then upsert ``asset_job_status."ocrAt"`` (set even when nothing was found). Rows of other assets are
    never touched. ``id``, ``isVisible`` and ``updateId`` are left to their defaults, as Immich does.
    The caller decides whether the asset should be OCR'd at all (Immich skips ``visibility='hidden'``)."""
    settings = settings or DbSearchSettings()
    clean = [_check_line(line) for line in lines]
    with conn.transaction():
        set_local_search_path(conn, settings)
        _lock_asset(conn, asset_id)
        _replace_ocr_rows(conn, asset_id, clean)
        conn.execute(
            """INSERT INTO asset_job_status ("assetId", "ocrAt") VALUES (%s, coalesce(%s, now()))
               ON CONFLICT ("assetId") DO UPDATE SET "ocrAt" = excluded."ocrAt" """,
            [asset_id, now],
        )


def _replace_ocr_rows(conn: psycopg.Connection[Any], asset_id: UUID, clean: Sequence[OcrLine]) -> None:
    """One statement: the asset's asset_ocr rows replaced and its ocr_search row upserted (both deleted when
    nothing was found)."""
    if clean:
        columns = list(zip(*[(*line.box, line.box_score, line.text_score, line.text) for line in clean], strict=True))
        conn.execute(
            """
            WITH deleted_ocr AS (
              DELETE FROM asset_ocr WHERE "assetId" = %(id)s
            ), inserted_ocr AS (
              INSERT INTO asset_ocr ("assetId", "x1", "y1", "x2", "y2", "x3", "y3", "x4", "y4",
                                     "text", "boxScore", "textScore")
              SELECT %(id)s, u.x1, u.y1, u.x2, u.y2, u.x3, u.y3, u.x4, u.y4, u.text, u.box_score, u.text_score
              FROM unnest(%(x1)s::real[], %(y1)s::real[], %(x2)s::real[], %(y2)s::real[],
                          %(x3)s::real[], %(y3)s::real[], %(x4)s::real[], %(y4)s::real[],
                          %(box_score)s::real[], %(text_score)s::real[], %(text)s::text[])
                   WITH ORDINALITY AS u(x1, y1, x2, y2, x3, y3, x4, y4, box_score, text_score, text, ord)
              ORDER BY u.ord
            ), inserted_search AS (
              INSERT INTO ocr_search ("assetId", "text") VALUES (%(id)s, %(search_text)s)
              ON CONFLICT ("assetId") DO UPDATE SET "text" = excluded."text"
            )
            SELECT 1 AS dummy
            """,
            {
                "id": asset_id,
                **{
                    key: list(values)
                    for key, values in zip(
                        ("x1", "y1", "x2", "y2", "x3", "y3", "x4", "y4", "box_score", "text_score", "text"),
                        columns,
                        strict=True,
                    )
                },
                "search_text": ocr_search_text(clean),
            },
        )
    else:
        conn.execute(
            """
            WITH deleted_ocr AS (DELETE FROM asset_ocr WHERE "assetId" = %(id)s),
                 deleted_search AS (DELETE FROM ocr_search WHERE "assetId" = %(id)s)
            SELECT 1 AS dummy
            """,
            {"id": asset_id},
        )


# --- CLIP -----------------------------------------------------------------------------------------------------


def embedding_dimension(conn: psycopg.Connection[Any], settings: DbSearchSettings | None = None) -> int | None:
    """The declared dimension of ``smart_search.embedding`` (Immich's getDimensionSize)."""
    settings = settings or DbSearchSettings()
    row = conn.execute(
        """SELECT atttypmod FROM pg_attribute
           WHERE attrelid = to_regclass(%s) AND attname = 'embedding' AND NOT attisdropped""",
        [f"{settings.immich_schema}.smart_search"],
    ).fetchone()
    return int(row[0]) if row and row[0] and int(row[0]) > 0 else None


def write_clip_embedding(
    conn: psycopg.Connection[Any],
    asset_id: UUID,
    embedding: Sequence[float] | Any,
    *,
    settings: DbSearchSettings | None = None,
) -> None:
    """Upsert one asset's ``smart_search`` row as Immich's SmartSearch job does. Immich has no job-status
    column for CLIP (a smart_search row is the "done" marker), so nothing else is written. The vector is
    stored as given (Immich stores the ML service's output unchanged; normalise upstream if needed)."""
    settings = settings or DbSearchSettings()
    values = [float(x) for x in embedding]
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError("embedding must be a non-empty vector of finite numbers")
    with conn.transaction():
        set_local_search_path(conn, settings)
        dim = embedding_dimension(conn, settings)
        if dim is not None and dim != len(values):
            raise ValueError(f"embedding has {len(values)} dimensions, smart_search.embedding has {dim}")
        _lock_asset(conn, asset_id)
        conn.execute(
            """INSERT INTO smart_search ("assetId", "embedding") VALUES (%s, %s::real[]::vector)
               ON CONFLICT ("assetId") DO UPDATE SET "embedding" = excluded."embedding" """,
            [asset_id, values],
        )
