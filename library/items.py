"""Items and their pipeline steps in PostgreSQL (SQL with parameters only; the schema is on search_path)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from library.pdq import PdqHashes
from library.settings import LibrarySettings

STEP_STATES = ("pending", "running", "done", "failed")


def enabled_steps(settings: LibrarySettings, media: str = "image") -> list[str]:
    """Pipeline steps every new item gets: PDQ always, CLIP, OCR, faces, NSFW and tags when a model
    is configured.
    A video gets one step, 'video': keyframes with their PDQ (and CLIP when configured)."""
    if media == "video":
        return ["video"]
    steps = ["pdq"]
    if settings.clip_model:
        steps.append("clip")
    if settings.ocr_model:
        steps.append("ocr")
    if settings.face_model:
        steps.append("faces")
    if settings.nsfw_model:
        steps.append("nsfw")
    if settings.tag_model:
        steps.append("tags")
    return steps


@dataclass(frozen=True)
class Item:
    id: int
    sha256: str
    md5: str
    byte_size: int
    width: int
    height: int
    format: str
    source: str
    location: str
    blob: str | None
    data_id: str | None
    remark: str | None
    meta: Any
    media: str  # 'image' or 'video'
    duration_s: float | None

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Item:
        return cls(row[0], bytes(row[1]).hex(), *row[2:])


ITEM_COLUMNS = (
    "id, sha256, md5, byte_size, width, height, format, source, location, blob, data_id, remark, meta, "
    "media, duration_s"
)


@dataclass(frozen=True)
class NewItem:
    sha256: bytes
    md5: str
    byte_size: int
    width: int
    height: int
    format: str
    source: str
    location: str
    blob: str | None = None
    data_id: str | None = None
    remark: str | None = None
    meta: Any = None
    media: str = "image"
    duration_s: float | None = None


def insert_item(conn: psycopg.Connection[Any], new: NewItem, steps: list[str]) -> tuple[int, bool]:
    """Insert ``new`` with its pending steps; returns (id, created). The same bytes again return the
    existing id with created=False (one statement, so two concurrent adds of one file cannot both win)."""
    with conn.transaction():
        row = conn.execute(
            """INSERT INTO item (sha256, md5, byte_size, width, height, format, source, location, blob,
                                 data_id, remark, meta, media, duration_s)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
               ON CONFLICT (sha256) DO NOTHING RETURNING id""",
            [
                new.sha256,
                new.md5,
                new.byte_size,
                new.width,
                new.height,
                new.format,
                new.source,
                new.location,
                new.blob,
                new.data_id,
                new.remark,
                Jsonb(new.meta) if new.meta is not None else None,
                new.media,
                new.duration_s,
            ],
        ).fetchone()
        if row is None:
            existing = conn.execute("SELECT id FROM item WHERE sha256 = %s", [new.sha256]).fetchone()
            assert existing is not None
            return int(existing[0]), False
        item_id = int(row[0])
        for step in steps:
            conn.execute("INSERT INTO step (item_id, name) VALUES (%s, %s)", [item_id, step])
    return item_id, True


def get_item(conn: psycopg.Connection[Any], item_id: int) -> Item | None:
    row = conn.execute(f"SELECT {ITEM_COLUMNS} FROM item WHERE id = %s", [item_id]).fetchone()
    return Item.from_row(row) if row else None


def get_items(conn: psycopg.Connection[Any], ids: list[int]) -> dict[int, Item]:
    rows = conn.execute(f"SELECT {ITEM_COLUMNS} FROM item WHERE id = ANY(%s)", [ids]).fetchall()
    return {int(r[0]): Item.from_row(r) for r in rows}


def step_states(conn: psycopg.Connection[Any], item_id: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        "SELECT name, state, attempts, reason, next_attempt_at FROM step WHERE item_id = %s ORDER BY name", [item_id]
    ).fetchall()
    return [
        {"name": r[0], "state": r[1], "attempts": r[2], "reason": r[3], "next_attempt_at": r[4].isoformat()}
        for r in rows
    ]


def step_counts(conn: psycopg.Connection[Any]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for name, state, n in conn.execute("SELECT name, state, count(*) FROM step GROUP BY name, state"):
        counts.setdefault(name, dict.fromkeys(STEP_STATES, 0))[state] = int(n)
    return counts


def store_pdq(conn: psycopg.Connection[Any], item_id: int, hashes: PdqHashes) -> None:
    """Store the item's hashes. Call inside a transaction: hash writers are serialised until commit, so the
    pair lookup that follows (search.record_pairs) sees every hash committed before it -- two copies hashed
    at the same moment by two workers still find each other."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext('immich_zh_ai.library.pdq'))")
    conn.execute("DELETE FROM pdq WHERE item_id = %s", [item_id])
    for kind, result in hashes.variants:
        conn.execute(
            "INSERT INTO pdq (item_id, kind, hash, quality) VALUES (%s, %s, %s::bit(256), %s)",
            [item_id, kind, result.bits, result.quality],
        )
        conn.execute(
            "INSERT INTO pdq_variant (item_id, kind, dihedral) VALUES (%s, %s, %s::bit(256)[])",
            [item_id, kind, result.dihedral_bits],
        )


def mark_step_done(conn: psycopg.Connection[Any], item_id: int, step: str) -> None:
    conn.execute(
        """UPDATE step SET state = 'done', reason = NULL, lease_until = NULL, updated_at = now()
           WHERE item_id = %s AND name = %s""",
        [item_id, step],
    )
