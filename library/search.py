"""PDQ and CLIP matching against the library, and duplicate groups.

PDQ lookups use the HNSW index on ``pdq.hash`` (``bit_hamming_ops``): for each of the query's 8 dihedral
hashes one index scan ordered by Hamming distance (pgvector iterative scans keep filtering from starving
it), then the best distance per item. Low-quality hashes (flat images) never match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from library.settings import LibrarySettings


@dataclass(frozen=True)
class Match:
    item_id: int
    distance: float


def _hnsw_session(conn: psycopg.Connection[Any], settings: LibrarySettings) -> None:
    conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", [str(settings.pdq_ef_search)])
    conn.execute("SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true)")


def pdq_matches(
    conn: psycopg.Connection[Any],
    settings: LibrarySettings,
    query_bits: list[str],
    *,
    threshold: int,
    limit: int,
    exclude_item: int | None = None,
    include_blocked: bool = False,
) -> list[Match]:
    """Items within ``threshold`` bits of any of ``query_bits`` (best distance per item), nearest first."""
    with conn.transaction():
        _hnsw_session(conn, settings)
        rows = conn.execute(
            """SELECT c.item_id, min(c.d) AS distance
               FROM unnest(%s::bit(256)[]) AS q(h)
               CROSS JOIN LATERAL (
                 SELECT p.item_id, p.hash <~> q.h AS d FROM pdq AS p
                 WHERE p.quality >= %s
                 ORDER BY p.hash <~> q.h
                 LIMIT %s) AS c
               WHERE c.d <= %s
                 AND c.item_id IS DISTINCT FROM %s
                 AND (%s OR NOT EXISTS (SELECT 1 FROM block_hit AS b WHERE b.item_id = c.item_id))
               GROUP BY c.item_id
               ORDER BY distance, c.item_id
               LIMIT %s""",
            # Each item may hold two indexed hashes (plain, trimmed) and one may be excluded: fetch enough.
            [query_bits, settings.pdq_min_quality, 2 * limit + 2, threshold, exclude_item, include_blocked, limit],
        ).fetchall()
    return [Match(int(r[0]), float(r[1])) for r in rows]


def item_dihedral(conn: psycopg.Connection[Any], item_id: int) -> list[str] | None:
    rows = conn.execute("SELECT dihedral::text[] FROM pdq WHERE item_id = %s ORDER BY kind", [item_id]).fetchall()
    return [bits for row in rows for bits in row[0]] or None


def clip_matches(
    conn: psycopg.Connection[Any],
    vector: list[float],
    model: str,
    *,
    threshold: float,
    limit: int,
    exclude_item: int | None = None,
) -> list[Match]:
    """Items whose CLIP vector (same model) is within ``threshold`` cosine distance, nearest first."""
    rows = conn.execute(
        """SELECT item_id, d FROM (
             SELECT c.item_id, c.embedding <=> %s::vector AS d FROM clip AS c
             WHERE c.model = %s AND vector_dims(c.embedding) = %s
               AND c.item_id IS DISTINCT FROM %s
               AND NOT EXISTS (SELECT 1 FROM block_hit AS b WHERE b.item_id = c.item_id)
             ORDER BY d LIMIT %s) AS n
           WHERE d <= %s ORDER BY d, item_id""",
        [str(vector), model, len(vector), exclude_item, limit, threshold],
    ).fetchall()
    return [Match(int(r[0]), float(r[1])) for r in rows]


def item_clip(conn: psycopg.Connection[Any], item_id: int, model: str) -> list[float] | None:
    row = conn.execute(
        "SELECT embedding::text FROM clip WHERE item_id = %s AND model = %s", [item_id, model]
    ).fetchone()
    return [float(v) for v in row[0].strip("[]").split(",")] if row else None


def duplicate_groups(
    conn: psycopg.Connection[Any], settings: LibrarySettings, *, threshold: int, neighbours: int = 32
) -> list[list[tuple[int, int]]]:
    """Groups of items connected by PDQ matches (any of an item's 8 variants within ``threshold`` of
    another item's hash; transitive). Each group: [(item_id, distance to the group's first item)…],
    groups ordered by size, then first id. Blocked items are left out."""
    with conn.transaction():
        _hnsw_session(conn, settings)
        pairs = conn.execute(
            """SELECT a.item_id, c.item_id, min(c.d)
               FROM pdq AS a
               CROSS JOIN LATERAL unnest(a.dihedral) AS q(h)
               CROSS JOIN LATERAL (
                 SELECT p.item_id, p.hash <~> q.h AS d FROM pdq AS p
                 WHERE p.quality >= %s ORDER BY p.hash <~> q.h LIMIT %s) AS c
               WHERE a.quality >= %s AND c.item_id <> a.item_id AND c.d <= %s
                 AND NOT EXISTS (SELECT 1 FROM block_hit AS b WHERE b.item_id IN (a.item_id, c.item_id))
               GROUP BY a.item_id, c.item_id""",
            [settings.pdq_min_quality, neighbours, settings.pdq_min_quality, threshold],
        ).fetchall()
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    distance: dict[tuple[int, int], int] = {}
    for a, b, d in pairs:
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
        key = (min(int(a), int(b)), max(int(a), int(b)))
        distance[key] = min(distance.get(key, 256), int(d))
    members: dict[int, list[int]] = {}
    for x in list(parent):
        members.setdefault(find(x), []).append(x)
    groups: list[list[tuple[int, int]]] = []
    for root, ids in members.items():
        ids.sort()
        groups.append([(i, 0 if i == root else distance.get((root, i), -1)) for i in ids])
    groups.sort(key=lambda g: (-len(g), g[0][0]))
    return groups
