"""The library bridge's records in our schema (``python -m library immich …``; migration 002).

The bridge changes Immich only through Immich's API, as the configured user; what it remembers lives here:
the duplicate groups it proposed, the parent tag it created, the assets it tagged, and the cached text
embeddings of the tag vocabulary. Sync, on one connection whose ``search_path`` puts our schema first.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from uuid import UUID

import psycopg

from db.connection import connect, search_path_value
from db.settings import DbSearchSettings


def connect_bridge(settings: DbSearchSettings) -> psycopg.Connection[Any]:
    """An autocommit connection with our search_path for the whole session (the tag cache's unqualified
    ``tag_text`` resolves to our schema). The caller closes it."""
    conn = connect(settings)
    conn.execute("SELECT set_config('search_path', %s, false)", [search_path_value(settings)])
    return conn


def proposed_groups(conn: psycopg.Connection[Any], user_id: UUID) -> dict[UUID, set[UUID]]:
    """asset id -> the duplicate-group ids the bridge ever wrote for it (this user's)."""
    found: dict[UUID, set[UUID]] = {}
    for asset_id, duplicate_id in conn.execute(
        "SELECT asset_id, duplicate_id FROM bridge_duplicate WHERE user_id = %s", [user_id]
    ):
        found.setdefault(asset_id, set()).add(duplicate_id)
    return found


def record_group(conn: psycopg.Connection[Any], user_id: UUID, duplicate_id: UUID, asset_ids: Iterable[UUID]) -> None:
    """Remember that the bridge put ``asset_ids`` into the group ``duplicate_id`` (idempotent)."""
    with conn.transaction():
        conn.cursor().executemany(
            """INSERT INTO bridge_duplicate (user_id, duplicate_id, asset_id) VALUES (%s, %s, %s)
               ON CONFLICT DO NOTHING""",
            [(user_id, duplicate_id, asset_id) for asset_id in asset_ids],
        )


def cached_hashes(conn: psycopg.Connection[Any], checksums: dict[UUID, str]) -> dict[UUID, list[tuple[str, int]]]:
    """The stored PDQ variants (hex, quality) of the assets whose checksum is still the one hashed."""
    found: dict[UUID, list[tuple[str, int]]] = {}
    rows = conn.execute(
        "SELECT asset_id, checksum, hashes, qualities FROM bridge_pdq WHERE asset_id = ANY(%s)", [list(checksums)]
    )
    for asset_id, checksum, hashes, qualities in rows:
        if checksum and checksums.get(asset_id) == checksum:
            found[asset_id] = list(zip(hashes, qualities, strict=True))
    return found


def store_hashes(conn: psycopg.Connection[Any], rows: list[tuple[UUID, str, list[tuple[str, int]]]]) -> None:
    """Remember (asset id, checksum, PDQ variants) for the next run."""
    with conn.transaction():
        conn.cursor().executemany(
            """INSERT INTO bridge_pdq (asset_id, checksum, hashes, qualities) VALUES (%s, %s, %s, %s)
               ON CONFLICT (asset_id) DO UPDATE SET checksum = excluded.checksum, hashes = excluded.hashes,
                 qualities = excluded.qualities, hashed_at = clock_timestamp()""",
            [(a, c, [h for h, _ in v], [q for _, q in v]) for a, c, v in rows],
        )


def tag_parent(conn: psycopg.Connection[Any], user_id: UUID) -> UUID | None:
    row = conn.execute("SELECT tag_id FROM bridge_tag_parent WHERE user_id = %s", [user_id]).fetchone()
    return row[0] if row else None


def set_tag_parent(conn: psycopg.Connection[Any], user_id: UUID, tag_id: UUID) -> None:
    conn.execute(
        """INSERT INTO bridge_tag_parent (user_id, tag_id) VALUES (%s, %s)
           ON CONFLICT (user_id) DO UPDATE SET tag_id = excluded.tag_id, updated_at = clock_timestamp()""",
        [user_id, tag_id],
    )


def tagged_assets(conn: psycopg.Connection[Any], user_id: UUID) -> set[UUID]:
    return {row[0] for row in conn.execute("SELECT asset_id FROM bridge_tagged WHERE user_id = %s", [user_id])}


def record_tagged(conn: psycopg.Connection[Any], user_id: UUID, asset_id: UUID, model: str, tags: list[str]) -> None:
    conn.execute(
        """INSERT INTO bridge_tagged (user_id, asset_id, model, tags) VALUES (%s, %s, %s, %s)
           ON CONFLICT (user_id, asset_id) DO UPDATE
           SET model = excluded.model, tags = excluded.tags, tagged_at = clock_timestamp()""",
        [user_id, asset_id, model, tags],
    )
