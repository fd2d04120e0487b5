"""Helpers for tests and benchmarks against a real PostgreSQL: a throw-away database with Immich's tables,
and inserts that write rows the way Immich does. Not used by the service itself."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

IMMICH_SCHEMA_SQL = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "immich_schema.sql"


@contextmanager
def fresh_database(admin_uri: str, *, prefix: str = "zh_test") -> Iterator[str]:
    """CREATE DATABASE with a random name on the server of ``admin_uri``; dropped (FORCE) afterwards."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    with psycopg.connect(admin_uri, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} ENCODING 'UTF8' TEMPLATE template0").format(sql.Identifier(name)))
    try:
        yield make_conninfo(admin_uri, dbname=name)
    finally:
        with psycopg.connect(admin_uri, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def load_immich_schema(uri: str, path: Path = IMMICH_SCHEMA_SQL) -> None:
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute(path.read_text(encoding="utf-8"))


def insert_user(conn: psycopg.Connection[Any], *, email: str | None = None, name: str = "") -> UUID:
    email = email or f"{secrets.token_hex(6)}@example.test"
    row = conn.execute('INSERT INTO "user" (email, name) VALUES (%s, %s) RETURNING id', [email, name]).fetchone()
    assert row is not None
    return UUID(str(row[0]))


def add_partner(conn: psycopg.Connection[Any], shared_by: UUID, shared_with: UUID, *, in_timeline: bool = True) -> None:
    conn.execute(
        'INSERT INTO partner ("sharedById", "sharedWithId", "inTimeline") VALUES (%s, %s, %s)',
        [shared_by, shared_with, in_timeline],
    )


def insert_asset(
    conn: psycopg.Connection[Any],
    owner_id: UUID,
    *,
    asset_type: str = "IMAGE",
    taken_at: datetime | None = None,
    visibility: str = "timeline",
    deleted_at: datetime | None = None,
    is_favorite: bool = False,
    is_offline: bool = False,
    live_photo_video_id: UUID | None = None,
    library_id: UUID | None = None,
    file_name: str | None = None,
    exif: dict[str, Any] | None = None,
    asset_id: UUID | None = None,
) -> UUID:
    """An asset row as Immich's upload creates it (+ optional asset_exif row with the given columns)."""
    taken_at = taken_at or datetime(2024, 1, 1, tzinfo=UTC)
    file_name = file_name or f"IMG_{secrets.token_hex(4)}.jpg"
    checksum = hashlib.sha1(secrets.token_bytes(16)).digest()
    row = conn.execute(
        """
        INSERT INTO asset (id, "ownerId", type, "originalPath", "fileCreatedAt", "fileModifiedAt", "isFavorite",
                           checksum, "checksumAlgorithm", "originalFileName", "localDateTime", visibility,
                           "deletedAt", status, "isOffline", "livePhotoVideoId", "libraryId", "isExternal")
        VALUES (coalesce(%(id)s, uuid_generate_v4()), %(owner)s, %(type)s, %(path)s, %(taken)s, %(taken)s, %(fav)s,
                %(checksum)s, 'sha1', %(name)s, %(taken)s, %(vis)s, %(deleted)s,
                CASE WHEN %(deleted)s::timestamptz IS NULL THEN 'active' ELSE 'trashed' END::assets_status_enum,
                %(offline)s, %(live)s, %(library)s, %(library)s::uuid IS NOT NULL)
        RETURNING id
        """,
        {
            "id": asset_id,
            "owner": owner_id,
            "type": asset_type,
            "path": f"/data/upload/{owner_id}/{file_name}",
            "taken": taken_at,
            "fav": is_favorite,
            "checksum": checksum,
            "name": file_name,
            "vis": visibility,
            "deleted": deleted_at,
            "offline": is_offline,
            "live": live_photo_video_id,
            "library": library_id,
        },
    ).fetchone()
    assert row is not None
    new_id = UUID(str(row[0]))
    if exif is not None:
        columns = ["assetId", *exif.keys()]
        conn.execute(
            sql.SQL("INSERT INTO asset_exif ({}) VALUES ({})").format(
                sql.SQL(", ").join(sql.Identifier(c) for c in columns),
                sql.SQL(", ").join(sql.Placeholder() for _ in columns),
            ),
            [new_id, *exif.values()],
        )
    return new_id


def insert_ocr_rows(
    conn: psycopg.Connection[Any], asset_id: UUID, lines: Sequence[str], *, visible: bool = True
) -> None:
    """asset_ocr rows laid out top to bottom, one per line (no ocr_search row: use db.immich_writer for that)."""
    for i, text in enumerate(lines):
        y = 0.05 + 0.9 * i / max(len(lines), 1)
        conn.execute(
            """INSERT INTO asset_ocr ("assetId", x1, y1, x2, y2, x3, y3, x4, y4, "boxScore", "textScore", text,
                                      "isVisible")
               VALUES (%s, 0.1, %s, 0.9, %s, 0.9, %s, 0.1, %s, 0.9, 0.95, %s, %s)""",
            [asset_id, y, y, y + 0.04, y + 0.04, text, visible],
        )


def insert_embedding(conn: psycopg.Connection[Any], asset_id: UUID, embedding: Sequence[float]) -> None:
    conn.execute(
        """INSERT INTO smart_search ("assetId", embedding) VALUES (%s, %s::real[]::vector)
           ON CONFLICT ("assetId") DO UPDATE SET embedding = excluded.embedding""",
        [asset_id, [float(x) for x in embedding]],
    )
