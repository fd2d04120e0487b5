"""PDQ and CLIP matching against the library, and duplicate groups.

PDQ lookups are exact and indexed by multi-index hashing (see migrations/001_library.sql): a hash within
``t`` bits of the query differs in at most ``t // 16`` bits in at least one of its 16 chunks of 16 bits,
so the candidates are found by btree probes of each chunk's column with the query chunk's neighbours
within that radius (17 values per query hash for t <= 31, 137 for t <= 47), and only the candidates get
their Hamming distance computed. Thresholds above 47 bits are answered by a sequential scan.
Low-quality hashes (flat images) never match.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from library.db import ensure_vector_index
from library.filters import NO_FILTERS, ItemFilters
from library.settings import LibrarySettings

CHUNKS = 16
CHUNK_BITS = 16
MAX_INDEXED_THRESHOLD = 3 * CHUNKS - 1  # radius 2 per chunk: 137 probes per chunk and query hash


@dataclass(frozen=True)
class Match:
    item_id: int
    distance: float


def chunk_probes(query_bits: list[str], threshold: int) -> list[list[int]] | None:
    """Per chunk, every value a matching hash may have in it; None when the threshold is too large for
    the index (the caller scans)."""
    if threshold > MAX_INDEXED_THRESHOLD:
        return None
    radius = threshold // CHUNKS
    flips = [0]
    for r in range(1, radius + 1):
        flips += [sum(1 << b for b in combo) for combo in itertools.combinations(range(CHUNK_BITS), r)]
    probes: list[set[int]] = [set() for _ in range(CHUNKS)]
    for bits in query_bits:
        for i in range(CHUNKS):
            value = int(bits[i * CHUNK_BITS : (i + 1) * CHUNK_BITS], 2)
            probes[i].update(value ^ f for f in flips)
    return [sorted(p) for p in probes]


def candidate_filter(alias: str, query_bits: list[str], threshold: int) -> tuple[sql.Composable, list[Any]]:
    """``(c0 = ANY(..) OR ... OR c15 = ANY(..))`` for ``alias``, or TRUE (scan) beyond the index's reach."""
    probes = chunk_probes(query_bits, threshold)
    if probes is None:
        return sql.SQL("TRUE"), []
    parts = [sql.SQL("{} = ANY(%s)").format(sql.Identifier(alias, f"c{i}")) for i in range(CHUNKS)]
    return sql.SQL("(") + sql.SQL(" OR ").join(parts) + sql.SQL(")"), list(probes)


def pdq_matches(
    conn: psycopg.Connection[Any],
    settings: LibrarySettings,
    query_bits: list[str],
    *,
    threshold: int,
    limit: int,
    exclude_item: int | None = None,
    include_blocked: bool = False,
    filters: ItemFilters = NO_FILTERS,
) -> list[Match]:
    """Items within ``threshold`` bits of any of ``query_bits`` (best distance per item), nearest first."""
    where, params = candidate_filter("p", query_bits, threshold)
    item_filter, filter_params = filters.clause(sql.Identifier("p", "item_id"))
    query = sql.SQL(
        """SELECT p.item_id, min(p.hash <~> q.h) AS distance
           FROM pdq AS p CROSS JOIN unnest(%s::bit(256)[]) AS q(h)
           WHERE {where} AND {item_filter} AND p.quality >= %s
             AND p.item_id IS DISTINCT FROM %s
             AND (%s OR NOT EXISTS (SELECT 1 FROM block_hit AS b WHERE b.item_id = p.item_id))
           GROUP BY p.item_id
           HAVING min(p.hash <~> q.h) <= %s
           ORDER BY distance, p.item_id
           LIMIT %s"""
    ).format(where=where, item_filter=item_filter)
    rows = conn.execute(
        query,
        [
            query_bits,
            *params,
            *filter_params,
            settings.pdq_min_quality,
            exclude_item,
            include_blocked,
            threshold,
            limit,
        ],
    ).fetchall()
    return [Match(int(r[0]), float(r[1])) for r in rows]


def item_dihedral(conn: psycopg.Connection[Any], item_id: int) -> list[str] | None:
    rows = conn.execute(
        "SELECT dihedral::text[] FROM pdq_variant WHERE item_id = %s ORDER BY kind", [item_id]
    ).fetchall()
    return [bits for row in rows for bits in row[0]] or None


def record_pairs(conn: psycopg.Connection[Any], settings: LibrarySettings, item_id: int, query_bits: list[str]) -> int:
    """Store the item's near-duplicate pairs (within ``pdq_threshold``, blocked items included so groups
    stay right when a block is lifted); returns how many."""
    matches = pdq_matches(
        conn,
        settings,
        query_bits,
        threshold=settings.pdq_threshold,
        limit=10000,
        exclude_item=item_id,
        include_blocked=True,
    )
    for m in matches:
        conn.execute(
            """INSERT INTO pdq_pair (a, b, distance) VALUES (%s, %s, %s)
               ON CONFLICT (a, b) DO UPDATE SET distance = least(pdq_pair.distance, excluded.distance)""",
            [min(item_id, m.item_id), max(item_id, m.item_id), int(m.distance)],
        )
    return len(matches)


def ensure_clip_index(conn: psycopg.Connection[Any], dims: int) -> None:
    """The HNSW index that clip_matches uses for vectors of ``dims`` dimensions (see ensure_vector_index)."""
    ensure_vector_index(conn, "clip", dims)


def clip_matches(
    conn: psycopg.Connection[Any],
    vector: list[float],
    model: str,
    *,
    threshold: float,
    limit: int,
    exclude_item: int | None = None,
    filters: ItemFilters = NO_FILTERS,
) -> list[Match]:
    """Items whose CLIP vector (same model) is within ``threshold`` cosine distance, nearest first. Uses
    the dimension's HNSW index (approximate, with pgvector's iterative scans so filters do not starve it)."""
    item_filter, filter_params = filters.clause(sql.Identifier("c", "item_id"))
    dims = sql.Literal(len(vector))
    with conn.transaction():
        conn.execute("SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true)")
        rows = conn.execute(
            sql.SQL(
                """SELECT item_id, d FROM (
                     SELECT c.item_id, c.embedding::vector({dims}) <=> %s::vector({dims}) AS d FROM clip AS c
                     WHERE vector_dims(c.embedding) = {dims} AND c.model = %s
                       AND c.item_id IS DISTINCT FROM %s AND {item_filter}
                       AND NOT EXISTS (SELECT 1 FROM block_hit AS b WHERE b.item_id = c.item_id)
                     ORDER BY c.embedding::vector({dims}) <=> %s::vector({dims}) LIMIT %s) AS n
                   WHERE d <= %s ORDER BY d, item_id"""
            ).format(dims=dims, item_filter=item_filter),
            [str(vector), model, exclude_item, *filter_params, str(vector), limit, threshold],
        ).fetchall()
    return [Match(int(r[0]), float(r[1])) for r in rows]


def record_clip_pairs(
    conn: psycopg.Connection[Any], settings: LibrarySettings, item_id: int, vector: list[float]
) -> int:
    matches = clip_matches(
        conn,
        vector,
        str(settings.clip_model),
        threshold=settings.clip_duplicate_threshold,
        limit=1000,
        exclude_item=item_id,
    )
    for m in matches:
        conn.execute(
            """INSERT INTO clip_pair (a, b, distance) VALUES (%s, %s, %s)
               ON CONFLICT (a, b) DO UPDATE SET distance = least(clip_pair.distance, excluded.distance)""",
            [min(item_id, m.item_id), max(item_id, m.item_id), m.distance],
        )
    return len(matches)


def item_clip(conn: psycopg.Connection[Any], item_id: int, model: str) -> list[float] | None:
    row = conn.execute(
        "SELECT embedding::text FROM clip WHERE item_id = %s AND model = %s", [item_id, model]
    ).fetchone()
    return [float(v) for v in row[0].strip("[]").split(",")] if row else None


def duplicate_groups(
    conn: psycopg.Connection[Any], *, threshold: float, kind: str = "pdq"
) -> list[list[tuple[int, float]]]:
    """Groups of items connected by recorded pairs (``kind`` 'pdq' or 'clip') within ``threshold``
    (transitive). Each group: [(item_id, distance to the group's first item, -1 when only connected
    through others)…], groups by size, then first id. Blocked items are left out."""
    table = sql.Identifier("pdq_pair" if kind == "pdq" else "clip_pair")
    pairs = conn.execute(
        sql.SQL(
            """SELECT a, b, distance FROM {table} AS p
               WHERE distance <= %s
                 AND NOT EXISTS (SELECT 1 FROM block_hit AS h WHERE h.item_id IN (p.a, p.b))"""
        ).format(table=table),
        [threshold],
    ).fetchall()
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    distance: dict[tuple[int, int], float] = {}
    for a, b, d in pairs:
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
        distance[(int(a), int(b))] = float(d)
    members: dict[int, list[int]] = {}
    for x in list(parent):
        members.setdefault(find(x), []).append(x)
    groups: list[list[tuple[int, float]]] = []
    for root, ids in members.items():
        ids.sort()
        groups.append([(i, 0 if i == root else distance.get((root, i), -1)) for i in ids])
    groups.sort(key=lambda g: (-len(g), g[0][0]))
    return groups


@dataclass(frozen=True)
class FrameHit:
    item_id: int
    query: int  # index of the query frame (0 for a single image)
    t: float  # time of the video's best keyframe for that query frame
    distance: float


def video_frame_matches(
    conn: psycopg.Connection[Any], settings: LibrarySettings, queries: list[list[str]], *, threshold: int
) -> list[FrameHit]:
    """Per video and query frame, the keyframe nearest to any of that frame's hashes (within ``threshold``
    bits, indexed like ``pdq``); blocked videos and low-quality keyframes are left out."""
    bits = [b for q in queries for b in q]
    index = [i for i, q in enumerate(queries) for _ in q]
    if not bits:
        return []
    where, params = candidate_filter("f", bits, threshold)
    query = sql.SQL(
        """SELECT DISTINCT ON (f.item_id, q.i) f.item_id, q.i, f.t, f.hash <~> q.h AS d
           FROM video_frame AS f CROSS JOIN unnest(%s::bit(256)[], %s::int[]) AS q(h, i)
           WHERE {where} AND f.quality >= %s AND (f.hash <~> q.h) <= %s
             AND NOT EXISTS (SELECT 1 FROM block_hit AS b WHERE b.item_id = f.item_id)
           ORDER BY f.item_id, q.i, d, f.t"""
    ).format(where=where)
    rows = conn.execute(query, [bits, index, *params, settings.pdq_min_quality, threshold]).fetchall()
    return [FrameHit(int(r[0]), int(r[1]), float(r[2]), float(r[3])) for r in rows]


def video_clip_matches(
    conn: psycopg.Connection[Any], vector: list[float], model: str, *, threshold: float, limit: int
) -> list[FrameHit]:
    """Per video, the keyframe whose CLIP vector (same model) is nearest, within ``threshold``."""
    rows = conn.execute(
        """SELECT item_id, t, d FROM (
             SELECT DISTINCT ON (c.item_id) c.item_id, c.t, c.embedding <=> %s::vector AS d
             FROM video_frame_clip AS c
             WHERE c.model = %s AND vector_dims(c.embedding) = %s
               AND NOT EXISTS (SELECT 1 FROM block_hit AS b WHERE b.item_id = c.item_id)
             ORDER BY c.item_id, d) AS best
           WHERE d <= %s ORDER BY d, item_id LIMIT %s""",
        [str(vector), model, len(vector), threshold, limit],
    ).fetchall()
    return [FrameHit(int(r[0]), 0, float(r[1]), float(r[2])) for r in rows]
