"""Keep our OCR documents in step with Immich's ``asset_ocr`` rows outside the triggers.

The triggers keep documents current as Immich writes. This module covers the rest, in batches of
``backfill_batch_size`` assets, each batch in its own short transaction (Immich's writers are blocked at
most by one batch on the same assets):

* assets whose rows predate our triggers (first install on an existing library), or whose document was
  built by another segmenter (after a switch to/from zhparser), or everything with ``rebuild_all``;
* assets a trigger had to skip (``stale_document``, filled when a refresh failed inside Immich's
  transaction);
* documents whose asset has no visible OCR line any more (missed deletes).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from db.connection import set_local_search_path
from db.settings import DbSearchSettings

log = logging.getLogger(__name__)

_NIL = uuid.UUID(int=0)


@dataclass
class SyncStats:
    refreshed: int = 0  # assets whose document was (re)built
    stale_fixed: int = 0  # of which queued by a failed trigger
    orphans_deleted: int = 0
    batches: int = 0
    seconds: float = 0.0

    def __str__(self) -> str:
        return (
            f"refreshed={self.refreshed} stale_fixed={self.stale_fixed} orphans_deleted={self.orphans_deleted} "
            f"batches={self.batches} in {self.seconds:.1f}s"
        )


def refresh_assets(conn: psycopg.Connection[Any], settings: DbSearchSettings, asset_ids: list[uuid.UUID]) -> int:
    """Rebuild the documents of these assets now (one transaction)."""
    if not asset_ids:
        return 0
    with conn.transaction():
        set_local_search_path(conn, settings)
        row = conn.execute("SELECT refresh_documents(%s::uuid[])", [asset_ids]).fetchone()
    return int(row[0]) if row else 0


def _next_batch(
    conn: psycopg.Connection[Any], settings: DbSearchSettings, after: uuid.UUID, rebuild_all: bool, size: int
) -> list[uuid.UUID]:
    # Keyset walk over asset_ocr_assetId_idx: never a full sort, never a long-held snapshot.
    with conn.transaction():
        set_local_search_path(conn, settings)
        rows = conn.execute(
            """
            SELECT DISTINCT o."assetId"
            FROM asset_ocr AS o
            WHERE o."assetId" > %(after)s
              AND o."isVisible"
              AND (%(all)s OR NOT EXISTS (SELECT 1 FROM ocr_document AS d
                                          WHERE d.asset_id = o."assetId" AND d.segmenter = segmenter_name()))
            ORDER BY 1
            LIMIT %(size)s
            """,
            {"after": after, "all": rebuild_all, "size": size},
        ).fetchall()
    return [r[0] for r in rows]


def sync_documents(
    conn: psycopg.Connection[Any],
    settings: DbSearchSettings | None = None,
    *,
    rebuild_all: bool = False,
    batch_size: int | None = None,
    progress: Callable[[SyncStats], None] | None = None,
) -> SyncStats:
    """Bring every OCR document up to date (see module doc). ``conn`` must be in autocommit mode."""
    settings = settings or DbSearchSettings()
    size = batch_size or settings.backfill_batch_size
    stats = SyncStats()
    started = time.monotonic()

    # 1. what failed triggers queued
    while True:
        with conn.transaction():
            set_local_search_path(conn, settings)
            stale = [
                r[0]
                for r in conn.execute(
                    "SELECT asset_id FROM stale_document ORDER BY asset_id LIMIT %s", [size]
                ).fetchall()
            ]
        if not stale:
            break
        refresh_assets(conn, settings, stale)  # also removes them from stale_document
        stats.stale_fixed += len(stale)
        stats.batches += 1

    # 2. missing / outdated documents
    after = _NIL
    while True:
        ids = _next_batch(conn, settings, after, rebuild_all, size)
        if not ids:
            break
        stats.refreshed += refresh_assets(conn, settings, ids)
        stats.batches += 1
        after = ids[-1]
        if progress is not None:
            progress(stats)

    # 3. documents left without a visible OCR line
    with conn.transaction():
        set_local_search_path(conn, settings)
        cur = conn.execute(
            """DELETE FROM ocr_document AS d
               WHERE NOT EXISTS (SELECT 1 FROM asset_ocr AS o WHERE o."assetId" = d.asset_id AND o."isVisible")"""
        )
        stats.orphans_deleted = cur.rowcount
    stats.seconds = time.monotonic() - started
    log.info("OCR documents synchronised: %s", stats)
    return stats
