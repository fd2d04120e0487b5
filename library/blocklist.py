"""Known-image blocklist: reference PDQ hashes; every ingested item is checked, matches are flagged.

An item matches when any of its 8 dihedral hashes (of the image, and of the image without a uniform frame)
is within ``blocklist_threshold`` bits of an entry, so a mirrored, rotated or framed copy of a listed image
is caught. Importing new entries also checks the items already in the library (against their stored
upright hashes). Flagged items are excluded from every search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from library import pdq, search
from library.settings import LibrarySettings


@dataclass(frozen=True)
class BlockMatch:
    entry_id: int
    distance: int
    label: str | None


def match_hashes(conn: psycopg.Connection[Any], settings: LibrarySettings, query_bits: list[str]) -> BlockMatch | None:
    """The nearest blocklist entry within the threshold of any of ``query_bits``, or None (indexed like
    library.search: chunk probes, then exact distances)."""
    where, params = search.candidate_filter("e", query_bits, settings.blocklist_threshold)
    row = conn.execute(
        sql.SQL(
            """SELECT e.id, min(e.hash <~> q.h) AS d, e.label
               FROM blocklist_entry AS e CROSS JOIN unnest(%s::bit(256)[]) AS q(h)
               WHERE {where}
               GROUP BY e.id, e.label
               HAVING min(e.hash <~> q.h) <= %s
               ORDER BY d, e.id LIMIT 1"""
        ).format(where=where),
        [query_bits, *params, settings.blocklist_threshold],
    ).fetchone()
    return BlockMatch(int(row[0]), int(row[1]), row[2]) if row else None


def check_item(conn: psycopg.Connection[Any], settings: LibrarySettings, item_id: int, hashes: pdq.PdqHashes) -> None:
    found = match_hashes(conn, settings, hashes.query_bits)
    if found is not None:
        conn.execute(
            """INSERT INTO block_hit (item_id, entry_id, distance) VALUES (%s, %s, %s)
               ON CONFLICT (item_id) DO UPDATE SET entry_id = excluded.entry_id, distance = excluded.distance
               WHERE excluded.distance < block_hit.distance""",
            [item_id, found.entry_id, found.distance],
        )


@dataclass
class ImportReport:
    added: int
    already_listed: int
    items_flagged: int
    errors: list[str]


def import_hashes(
    conn: psycopg.Connection[Any], settings: LibrarySettings, hashes: list[pdq.ReferenceHash], source: str
) -> ImportReport:
    """Add reference hashes (duplicates ignored), then flag library items that match a new entry."""
    added_ids: list[int] = []
    with conn.transaction():
        for ref in hashes:
            row = conn.execute(
                """INSERT INTO blocklist_entry (hash, label, source) VALUES (%s::bit(256), %s, %s)
                   ON CONFLICT (hash) DO NOTHING RETURNING id""",
                [pdq.hex_to_bits(ref.hash_hex), ref.label, source[:500]],
            ).fetchone()
            if row:
                added_ids.append(int(row[0]))
    flagged = _flag_existing(conn, settings, added_ids)
    return ImportReport(len(added_ids), len(hashes) - len(added_ids), flagged, [])


def _flag_existing(conn: psycopg.Connection[Any], settings: LibrarySettings, entry_ids: list[int]) -> int:
    """Flag the items already in the library that match one of the new entries (their stored hashes)."""
    flagged = 0
    rows = conn.execute("SELECT id, hash::text FROM blocklist_entry WHERE id = ANY(%s)", [entry_ids]).fetchall()
    for entry_id, bits in rows:
        matches = search.pdq_matches(
            conn, settings, [bits], threshold=settings.blocklist_threshold, limit=100000, include_blocked=True
        )
        # Videos: any keyframe within the threshold flags the video.
        frames = search.video_frame_matches(conn, settings, [[bits]], threshold=settings.blocklist_threshold)
        for item_id, distance in [(m.item_id, m.distance) for m in matches] + [(f.item_id, f.distance) for f in frames]:
            flagged += conn.execute(
                """INSERT INTO block_hit (item_id, entry_id, distance) VALUES (%s, %s, %s)
                   ON CONFLICT (item_id) DO NOTHING""",
                [item_id, entry_id, int(distance)],
            ).rowcount
    return flagged


def check_nsfw(conn: psycopg.Connection[Any], settings: LibrarySettings, item_id: int, score: float) -> None:
    """The NSFW rule: an item scoring at least LIBRARY_NSFW_BLOCK_SCORE is flagged like a blocklist match
    (a hash match already recorded for it is kept)."""
    if settings.nsfw_block_score is not None and score >= settings.nsfw_block_score:
        conn.execute(
            """INSERT INTO block_hit (item_id, entry_id, distance, rule, nsfw_score) VALUES (%s, NULL, 0, 'nsfw', %s)
               ON CONFLICT (item_id) DO NOTHING""",
            [item_id, score],
        )


def list_hits(conn: psycopg.Connection[Any], limit: int, offset: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        """SELECT h.item_id, h.entry_id, h.distance, e.label, e.source, h.found_at, h.rule, h.nsfw_score
           FROM block_hit AS h LEFT JOIN blocklist_entry AS e ON e.id = h.entry_id
           ORDER BY h.found_at DESC, h.item_id LIMIT %s OFFSET %s""",
        [limit, offset],
    ).fetchall()
    return [
        {
            "item_id": r[0],
            "entry_id": r[1],
            "distance": r[2],
            "label": r[3],
            "source": r[4],
            "found_at": r[5].isoformat(),
            "rule": r[6],  # 'pdq': matched a reference hash; 'nsfw': scored at least LIBRARY_NSFW_BLOCK_SCORE
            "nsfw_score": r[7],
        }
        for r in rows
    ]


def counts(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    row = conn.execute("SELECT (SELECT count(*) FROM blocklist_entry), (SELECT count(*) FROM block_hit)").fetchone()
    assert row is not None
    return int(row[0]), int(row[1])
