"""Hybrid (CLIP + OCR) and OCR-only search over Immich's assets, scoped exactly as the caller says.

One interface for both segmenters: the query text is turned into tsqueries by the database function
``build_queries`` of the active segmenter (zhparser or the bigram fallback, chosen at migration time), so
nothing here depends on which one is installed. :class:`SearchContext` records what was detected.

Candidates come from indexes only: the CLIP side is an ``ORDER BY embedding <=> q LIMIT k`` that the
vector index answers (HNSW with pgvector 0.8 iterative scans, or VectorChord's vchordrq, with Immich's
scope and filters applied during the scan), the OCR side a GIN match on our documents. The two ranked
lists are fused on one scale (reciprocal rank fusion by default) and paged Immich-style: ``size + 1`` rows
at offset ``(page - 1) * size``, ``next_page`` when the extra row exists, ties broken by asset id.

Scope: the caller computes ``user_ids`` (the user plus partners with ``inTimeline``, as Immich's
``getUserIdsToSearch`` does; only the user for ``visibility='locked'``); every query here restricts
``asset."ownerId"`` to them, drops trashed assets (unless ``with_deleted``) and applies the visibility.
"""

from __future__ import annotations

import math
import re
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, Literal, get_args
from uuid import UUID

import psycopg
from psycopg import sql

from db.connection import search_path_value
from db.settings import DbSearchSettings

Visibility = Literal["archive", "timeline", "hidden", "locked"]
AssetType = Literal["IMAGE", "VIDEO", "AUDIO", "OTHER"]
VectorIndexKind = Literal["hnsw", "vchordrq", "ivfflat"]


class _Unset(Enum):
    UNSET = "UNSET"


#: "Filter not given" for the tri-state filters where ``None`` means ``IS NULL`` (as in Immich's DTOs).
UNSET = _Unset.UNSET


class SchemaNotReadyError(RuntimeError):
    """Our schema is missing or not migrated: run ``db.migrate.migrate()`` first."""


@dataclass(frozen=True)
class SearchFilters:
    """The filters of Immich's SmartSearchDto / MetadataSearchDto that are supported, with Immich's meaning.

    Supported: visibility, withDeleted, takenAfter/Before (``fileCreatedAt``), createdAfter/Before,
    type, isFavorite, isMotion, isOffline, libraryId, city/state/country/make/model/lensModel and rating
    (``None`` = IS NULL), withExif (inner join semantics: assets without an exif row drop out), albumIds
    (in all of them), isNotInAlbum, personIds (all of them as visible faces).
    Not supported: tagIds, description/originalFileName/originalPath, isEncoded, updated*/trashed*.
    """

    visibility: Visibility | None = "timeline"  # None = Immich's "omitted": everything except 'locked'
    with_deleted: bool = False
    taken_after: datetime | None = None
    taken_before: datetime | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    asset_type: AssetType | None = None
    is_favorite: bool | None = None
    is_motion: bool | None = None
    is_offline: bool | None = None
    library_id: UUID | _Unset | None = UNSET
    city: str | _Unset | None = UNSET
    state: str | _Unset | None = UNSET
    country: str | _Unset | None = UNSET
    make: str | _Unset | None = UNSET
    model: str | _Unset | None = UNSET
    lens_model: str | _Unset | None = UNSET
    rating: int | _Unset | None = UNSET
    with_exif: bool = False
    album_ids: Sequence[UUID] = ()
    is_not_in_album: bool = False
    person_ids: Sequence[UUID] = ()

    def __post_init__(self) -> None:
        if self.visibility is not None and self.visibility not in get_args(Visibility):
            raise ValueError(f"invalid visibility: {self.visibility!r}")
        if self.asset_type is not None and self.asset_type not in get_args(AssetType):
            raise ValueError(f"invalid asset type: {self.asset_type!r}")
        if isinstance(self.rating, int) and not -1 <= self.rating <= 5:
            raise ValueError("rating must be -1..5 or None")


@dataclass(frozen=True)
class SearchHit:
    asset_id: UUID
    score: float  # fused score in [0, 1]; higher is better
    clip_similarity: float | None  # cosine similarity to the query embedding (None: not a CLIP candidate)
    ocr_relevance: float | None  # OCR relevance in [0, 1) (None: no OCR match); >= 0.5 for exact matches
    ocr_exact: bool | None  # the OCR text holds the query exactly (False: fuzzy match, see build_queries)


@dataclass(frozen=True)
class SearchPage:
    items: list[SearchHit]
    next_page: int | None  # Immich's nextPage (as an int; the API sends it as a string)
    tsquery: str | None = None  # what the OCR side matched with (for logs / debugging)


@dataclass(frozen=True)
class SearchContext:
    """What the search layer detected about the database at start-up. Build it once with :meth:`load`
    (a few catalogue queries) and pass it to every search; reload it if Immich rebuilds its vector index
    with another extension or changes the CLIP dimension."""

    settings: DbSearchSettings
    segmenter: str  # segmenter_name(): 'bigram-1' or 'zhparser-1'
    vector_index: VectorIndexKind | None  # index on smart_search.embedding (None: exact scans only)
    vchordrq_probes: str | None
    embedding_dim: int | None  # smart_search.embedding's declared dimension
    search_path: str = field(repr=False, default="")

    @classmethod
    async def load(cls, conn: psycopg.AsyncConnection[Any], settings: DbSearchSettings | None = None) -> SearchContext:
        settings = settings or DbSearchSettings()
        table = f"{settings.immich_schema}.smart_search"
        async with conn.transaction():
            found = await _one(conn, "SELECT to_regprocedure(%s)", [f"{settings.schema_name}.segmenter_name()"])
            if not found or found[0] is None:
                raise SchemaNotReadyError(f"schema {settings.schema_name} is not migrated (run db.migrate)")
            segmenter = await _one(
                conn, sql.SQL("SELECT {}.segmenter_name()").format(sql.Identifier(settings.schema_name))
            )
            cur = await conn.execute(
                """
                SELECT am.amname, array_to_string(c.reloptions, ' ')
                FROM pg_index AS i
                JOIN pg_class AS c ON c.oid = i.indexrelid
                JOIN pg_am AS am ON am.oid = c.relam
                WHERE i.indrelid = to_regclass(%s) AND am.amname IN ('hnsw', 'vchordrq', 'ivfflat') AND i.indisvalid
                """,
                [table],
            )
            indexes = await cur.fetchall()
            dim = await _one(
                conn,
                """SELECT atttypmod FROM pg_attribute
                   WHERE attrelid = to_regclass(%s) AND attname = 'embedding' AND NOT attisdropped""",
                [table],
            )
        kinds = {str(name): str(opts or "") for name, opts in indexes}
        kind: VectorIndexKind | None = next((k for k in ("hnsw", "vchordrq", "ivfflat") if k in kinds), None)
        probes = settings.vchordrq_probes
        if kind == "vchordrq" and probes is None:
            probes = _immich_probes(kinds["vchordrq"])
        return cls(
            settings=settings,
            segmenter=str(segmenter[0]) if segmenter else "",
            vector_index=kind,
            vchordrq_probes=probes,
            embedding_dim=int(dim[0]) if dim and dim[0] and int(dim[0]) > 0 else None,
            search_path=search_path_value(settings),
        )


async def _one(conn: psycopg.AsyncConnection[Any], query: Any, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
    cur = await conn.execute(query, params)
    return await cur.fetchone()


def _immich_probes(reloptions: str) -> str:
    """Immich sets ``vchordrq.probes`` to 1 for a small index and ceil(lists / 8) for a partitioned one; a
    list-less index takes an empty probes list."""
    match = re.search(r"lists\s*=\s*\[([^\]]*)\]", reloptions)
    if not match or not match.group(1).strip():
        return ""
    lists = [int(x) for x in re.findall(r"\d+", match.group(1))]
    return ",".join(str(1 if n <= 1 else math.ceil(n / 8)) for n in lists)


# --- input hygiene ---------------------------------------------------------------------------------------


def sanitize_query_text(text: str | None, max_chars: int) -> str:
    """Make any user text sendable: NUL bytes (PostgreSQL text cannot hold them) become spaces, lone
    surrogates (not encodable as UTF-8) are dropped, the rest is truncated to ``max_chars``. The SQL side
    quotes every lexeme, so no character left here can produce a tsquery syntax error."""
    if not text:
        return ""
    text = text.replace("\x00", " ").encode("utf-8", "ignore").decode("utf-8")
    return text.strip()[:max_chars].strip()


def _embedding_list(embedding: Sequence[float] | Any, dim: int | None) -> list[float]:
    values = [float(x) for x in embedding]
    if dim is not None and len(values) != dim:
        raise ValueError(f"query embedding has {len(values)} dimensions, smart_search.embedding has {dim}")
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError("query embedding must be a non-empty vector of finite numbers")
    return values


def _check_paging(page: int, size: int, settings: DbSearchSettings) -> None:
    if not 1 <= size <= settings.max_page_size:
        raise ValueError(f"size must be 1..{settings.max_page_size}")
    if not 1 <= page <= settings.max_page:
        raise ValueError(f"page must be 1..{settings.max_page}")


# --- SQL building --------------------------------------------------------------------------------------------

Params = dict[str, Any]
Statement = tuple[sql.Composable, Params]


def _scope_sql(user_ids: Sequence[UUID], f: SearchFilters) -> tuple[sql.Composable, Params]:
    """WHERE conditions on ``asset AS a``: Immich's search scope plus the filters. Static SQL only; every
    value is a parameter."""
    conds: list[sql.Composable] = [sql.SQL('a."ownerId" = ANY(%(f_user_ids)s::uuid[])')]
    params: Params = {"f_user_ids": list(user_ids)}
    _asset_conditions(f, conds, params)
    _exif_condition(f, conds, params)
    _album_and_people_conditions(f, conds, params)
    return sql.SQL(" AND ").join(conds), params


def _asset_conditions(f: SearchFilters, conds: list[sql.Composable], params: Params) -> None:
    """The filters on the asset row itself."""
    if not f.with_deleted:
        conds.append(sql.SQL('a."deletedAt" IS NULL'))
    # Compared as the column's own enum (the literal / untyped parameter takes asset.visibility's type):
    # a ::text cast would hide the column statistics and wreck the planner's row estimates.
    if f.visibility is None:
        conds.append(sql.SQL("a.visibility <> 'locked'"))
    else:
        conds.append(sql.SQL("a.visibility = %(f_visibility)s"))
        params["f_visibility"] = f.visibility
    for column, key, value, op in (
        ("fileCreatedAt", "f_taken_after", f.taken_after, ">="),
        ("fileCreatedAt", "f_taken_before", f.taken_before, "<="),
        ("createdAt", "f_created_after", f.created_after, ">="),
        ("createdAt", "f_created_before", f.created_before, "<="),
    ):
        if value is not None:
            conds.append(sql.SQL("a.{} {} %({})s").format(sql.Identifier(column), sql.SQL(op), sql.SQL(key)))
            params[key] = value
    if f.asset_type is not None:
        conds.append(sql.SQL("a.type = %(f_type)s"))
        params["f_type"] = f.asset_type
    if f.is_favorite is not None:
        conds.append(sql.SQL('a."isFavorite" = %(f_favorite)s'))
        params["f_favorite"] = f.is_favorite
    if f.is_motion is not None:
        conds.append(sql.SQL('a."livePhotoVideoId" IS NOT NULL' if f.is_motion else 'a."livePhotoVideoId" IS NULL'))
    if f.is_offline is not None:
        conds.append(sql.SQL('a."isOffline" = %(f_offline)s'))
        params["f_offline"] = f.is_offline
    if f.library_id is not UNSET:
        if f.library_id is None:
            conds.append(sql.SQL('a."libraryId" IS NULL'))
        else:
            conds.append(sql.SQL('a."libraryId" = %(f_library)s'))
            params["f_library"] = f.library_id


def _exif_condition(f: SearchFilters, conds: list[sql.Composable], params: Params) -> None:
    """The EXIF filters, as one EXISTS on asset_exif (also required alone by ``withExif``)."""
    exif: list[sql.Composable] = []
    for column, key, value in (
        ("city", "f_city", f.city),
        ("state", "f_state", f.state),
        ("country", "f_country", f.country),
        ("make", "f_make", f.make),
        ("model", "f_model", f.model),
        ("lensModel", "f_lens", f.lens_model),
        ("rating", "f_rating", f.rating),
    ):
        if value is UNSET:
            continue
        if value is None:
            exif.append(sql.SQL("e.{} IS NULL").format(sql.Identifier(column)))
        else:
            exif.append(sql.SQL("e.{} = %({})s").format(sql.Identifier(column), sql.SQL(key)))
            params[key] = value
    if exif or f.with_exif:
        conds.append(
            sql.SQL('EXISTS (SELECT 1 FROM asset_exif AS e WHERE e."assetId" = a.id{})').format(
                sql.SQL("").join(sql.SQL(" AND ") + c for c in exif)
            )
        )


def _album_and_people_conditions(f: SearchFilters, conds: list[sql.Composable], params: Params) -> None:
    """In every album named / showing every person named (Immich's AND semantics), or in no album."""
    if f.album_ids:
        albums = sorted(set(f.album_ids), key=str)
        conds.append(
            sql.SQL(
                '(SELECT count(DISTINCT aa."albumId") FROM album_asset AS aa '
                'WHERE aa."assetId" = a.id AND aa."albumId" = ANY(%(f_albums)s::uuid[])) = %(f_album_count)s'
            )
        )
        params["f_albums"] = albums
        params["f_album_count"] = len(albums)
    if f.is_not_in_album:
        conds.append(sql.SQL('NOT EXISTS (SELECT 1 FROM album_asset AS aa WHERE aa."assetId" = a.id)'))
    if f.person_ids:
        people = sorted(set(f.person_ids), key=str)
        conds.append(
            sql.SQL(
                '(SELECT count(DISTINCT af."personId") FROM asset_face AS af '
                'WHERE af."assetId" = a.id AND af."personId" = ANY(%(f_people)s::uuid[]) '
                'AND af."deletedAt" IS NULL AND af."isVisible") = %(f_people_count)s'
            )
        )
        params["f_people"] = people
        params["f_people_count"] = len(people)


def _config_statement(ctx: SearchContext, query_text: str, *, with_clip: bool) -> Statement:
    s = ctx.settings
    settings_sql = [
        sql.SQL("set_config('search_path', %(c_search_path)s, true)"),
        sql.SQL("set_config('statement_timeout', %(c_timeout)s, true)"),
        # Plans must see the actual tsquery / filters (a generic plan would guess selectivities).
        sql.SQL("set_config('plan_cache_mode', 'force_custom_plan', true)"),
    ]
    params: Params = {
        "c_search_path": ctx.search_path,
        "c_timeout": f"{s.statement_timeout_ms}ms",
        "c_query": query_text,
        "c_max_tokens": s.max_query_tokens,
        "c_prefix_min": s.prefix_min_chars,
        "c_fuzzy_min": s.fuzzy_min_tokens,
        "c_fuzzy_max": s.fuzzy_max_tokens,
    }
    if with_clip and ctx.vector_index == "hnsw":
        settings_sql += [
            sql.SQL("set_config('hnsw.ef_search', %(c_ef)s, true)"),
            sql.SQL("set_config('hnsw.iterative_scan', %(c_iterative)s, true)"),
            sql.SQL("set_config('hnsw.max_scan_tuples', %(c_max_scan)s, true)"),
        ]
        params.update(
            c_ef=str(s.hnsw_ef_search), c_iterative=s.hnsw_iterative_scan, c_max_scan=str(s.hnsw_max_scan_tuples)
        )
    elif with_clip and ctx.vector_index == "vchordrq" and ctx.vchordrq_probes is not None:
        settings_sql.append(sql.SQL("set_config('vchordrq.probes', %(c_probes)s, true)"))
        params["c_probes"] = ctx.vchordrq_probes
    query = sql.SQL(
        "SELECT {settings}, q.strict_query::text, q.match_query::text "
        "FROM {schema}.build_queries(%(c_query)s, %(c_max_tokens)s, %(c_prefix_min)s, "
        "%(c_fuzzy_min)s, %(c_fuzzy_max)s) AS q"
    ).format(settings=sql.SQL(", ").join(settings_sql), schema=sql.Identifier(s.schema_name))
    return query, params


_CLIP_CTE = sql.SQL(
    """
clip AS MATERIALIZED (
  SELECT s."assetId" AS asset_id, s.embedding <=> %(embedding)s::vector AS distance
  FROM smart_search AS s
  JOIN asset AS a ON a.id = s."assetId"
  WHERE {scope}
  ORDER BY distance
  LIMIT %(clip_limit)s
), clip_ranked AS (
  -- re-sorted: an iterative scan with relaxed_order may return neighbours slightly out of order
  SELECT asset_id, 1 - distance AS similarity, row_number() OVER (ORDER BY distance, asset_id) AS position
  FROM clip
)"""
)

_OCR_CTE = sql.SQL(
    """
ocr AS MATERIALIZED (
  -- relevance in [0, 1): exact matches in [0.5, 1), fuzzy ones in [0, 0.5), ts_rank ordering inside
  SELECT asset_id, strict_match, (strict_match::int + r / (r + 1)) / 2 AS relevance
  FROM (
    -- the LIMIT keeps this a separate subquery: ts_rank runs once per match, and at most max_matches
    -- matches (GIN bitmap order) are ranked
    SELECT d.asset_id, {strict_match} AS strict_match, ts_rank(d.doc, %(match_q)s::tsquery, %(rank_norm)s)::float8 AS r
    FROM ocr_document AS d
    JOIN asset AS a ON a.id = d.asset_id
    WHERE d.doc @@ %(match_q)s::tsquery AND {scope}
    LIMIT %(max_matches)s
  ) AS m
  ORDER BY relevance DESC, asset_id
  {ocr_limit}
), ocr_ranked AS (
  SELECT asset_id, relevance, strict_match, row_number() OVER (ORDER BY relevance DESC, asset_id) AS position
  FROM ocr
)"""
)


def _ocr_cte(scope: sql.Composable, strict_q: str | None, match_q: str, *, limited: bool) -> sql.Composable:
    # Without a fuzzy branch the strict query is the match query: every match is exact, skip the recheck.
    strict = sql.SQL("true") if strict_q in (None, match_q) else sql.SQL("d.doc @@ %(strict_q)s::tsquery")
    return _OCR_CTE.format(
        scope=scope, strict_match=strict, ocr_limit=sql.SQL("LIMIT %(ocr_limit)s") if limited else sql.SQL("")
    )


def _fused_select(ctx: SearchContext, *, clip: bool, ocr: bool) -> tuple[sql.Composable, Params]:
    s = ctx.settings
    wc = s.clip_weight if clip else 0.0
    wo = s.ocr_weight if ocr else 0.0
    total = (wc + wo) or 1.0
    params: Params = {"w_clip": wc, "w_ocr": wo}
    if s.fusion == "rrf":
        # Each signal contributes weight / (k + rank); divided by the best possible sum so that an asset
        # ranked first by every signal of this request scores exactly 1.
        params.update(rrf_k=float(s.rrf_k), rrf_scale=(s.rrf_k + 1) / total)
        clip_part = sql.SQL("coalesce(%(w_clip)s / (%(rrf_k)s + c.position), 0)")
        ocr_part = sql.SQL("coalesce(%(w_ocr)s / (%(rrf_k)s + o.position), 0)")
        scale = sql.SQL(" * %(rrf_scale)s")
    else:
        # Min-max normalised similarity over the CLIP pool; OCR relevance is already in [0, 1).
        params["w_scale"] = 1.0 / total
        clip_part = sql.SQL("coalesce(%(w_clip)s * c.norm_similarity, 0)")
        ocr_part = sql.SQL("coalesce(%(w_ocr)s * o.relevance, 0)")
        scale = sql.SQL(" * %(w_scale)s")
    if clip and ocr:
        source = sql.SQL("clip_stats AS c FULL JOIN ocr_ranked AS o ON o.asset_id = c.asset_id")
        score = sql.SQL("({} + {}){}").format(clip_part, ocr_part, scale)
        columns = sql.SQL("coalesce(c.asset_id, o.asset_id) AS asset_id, c.similarity, o.relevance, o.strict_match")
    elif clip:
        source = sql.SQL("clip_stats AS c")
        score = sql.SQL("({}){}").format(clip_part, scale)
        columns = sql.SQL("c.asset_id, c.similarity, NULL::float8 AS relevance, NULL::boolean AS strict_match")
    else:
        source = sql.SQL("ocr_ranked AS o")
        score = sql.SQL("({}){}").format(ocr_part, scale)
        columns = sql.SQL("o.asset_id, NULL::float8 AS similarity, o.relevance, o.strict_match")
    query = sql.SQL(
        """
SELECT asset_id, score, similarity, relevance, strict_match
FROM (SELECT {columns}, {score} AS score FROM {source}) AS fused
ORDER BY score DESC, asset_id
LIMIT %(limit)s OFFSET %(offset)s"""
    ).format(columns=columns, score=score, source=source)
    return query, params


def _hybrid_main(
    ctx: SearchContext,
    scope: sql.Composable,
    scope_params: Params,
    *,
    embedding: list[float] | None,
    strict_q: str | None,
    match_q: str | None,
    page: int,
    size: int,
) -> Statement:
    s = ctx.settings
    ctes: list[sql.Composable] = []
    params: Params = dict(scope_params)
    clip = embedding is not None
    ocr = match_q is not None
    if clip:
        ctes.append(_CLIP_CTE.format(scope=scope))
        ctes.append(
            sql.SQL(
                """
clip_stats AS (
  -- similarity min-max normalised over the pool (used by fusion='weighted')
  SELECT c.asset_id, c.similarity, c.position,
         CASE WHEN max(c.similarity) OVER () > min(c.similarity) OVER ()
              THEN (c.similarity - min(c.similarity) OVER ()) / (max(c.similarity) OVER () - min(c.similarity) OVER ())
              ELSE 1 END AS norm_similarity
  FROM clip_ranked AS c
)"""
            )
        )
        params.update(embedding=embedding, clip_limit=s.clip_candidates)
    if ocr:
        assert match_q is not None
        ctes.append(_ocr_cte(scope, strict_q, match_q, limited=True))
        params.update(
            match_q=match_q,
            strict_q=strict_q or match_q,
            max_matches=s.ocr_max_matches,
            rank_norm=s.ocr_rank_normalization,
            ocr_limit=s.ocr_candidates,
        )
    fused, fused_params = _fused_select(ctx, clip=clip, ocr=ocr)
    params.update(fused_params, limit=size + 1, offset=(page - 1) * size)
    query = sql.SQL("WITH {}{}").format(sql.SQL(",").join(ctes), fused)
    return query, params


def _page(rows: list[tuple[Any, ...]], page: int, size: int, tsquery: str | None) -> SearchPage:
    items = [
        SearchHit(
            asset_id=row[0],
            score=float(row[1]),
            clip_similarity=None if row[2] is None else float(row[2]),
            ocr_relevance=None if row[3] is None else float(row[3]),
            ocr_exact=None if row[4] is None else bool(row[4]),
        )
        for row in rows[:size]
    ]
    return SearchPage(items=items, next_page=page + 1 if len(rows) > size else None, tsquery=tsquery)


# --- the two searches as step generators (the statements; _drive runs them) ------------------------------

Steps = Generator[Statement, list[tuple[Any, ...]], SearchPage]


def _hybrid_steps(
    ctx: SearchContext,
    user_ids: Sequence[UUID],
    query_text: str | None,
    query_embedding: Sequence[float] | Any | None,
    filters: SearchFilters | None,
    page: int,
    size: int,
) -> Steps:
    s = ctx.settings
    _check_paging(page, size, s)
    embedding = None if query_embedding is None else _embedding_list(query_embedding, ctx.embedding_dim)
    if embedding is not None and s.clip_weight <= 0 and query_text:
        embedding = None  # CLIP switched off by configuration: do not pay for the vector scan
    text = sanitize_query_text(query_text, s.max_query_chars)
    if not user_ids or (embedding is None and not text):
        return SearchPage(items=[], next_page=None)
    rows = yield _config_statement(ctx, text, with_clip=embedding is not None)
    strict_q, match_q = rows[0][-2], rows[0][-1]
    if s.ocr_weight <= 0 and embedding is not None:
        strict_q = match_q = None
    if embedding is None and match_q is None:
        return SearchPage(items=[], next_page=None)
    scope, scope_params = _scope_sql(user_ids, filters or SearchFilters())
    rows = yield _hybrid_main(
        ctx, scope, scope_params, embedding=embedding, strict_q=strict_q, match_q=match_q, page=page, size=size
    )
    return _page(rows, page, size, match_q)


def _ocr_steps(
    ctx: SearchContext,
    user_ids: Sequence[UUID],
    query_text: str | None,
    filters: SearchFilters | None,
    page: int,
    size: int,
) -> Steps:
    s = ctx.settings
    _check_paging(page, size, s)
    text = sanitize_query_text(query_text, s.max_query_chars)
    if not user_ids or not text:
        return SearchPage(items=[], next_page=None)
    rows = yield _config_statement(ctx, text, with_clip=False)
    strict_q, match_q = rows[0][-2], rows[0][-1]
    if match_q is None:
        return SearchPage(items=[], next_page=None)
    scope, params = _scope_sql(user_ids, filters or SearchFilters())
    params.update(
        match_q=match_q,
        strict_q=strict_q or match_q,
        max_matches=s.ocr_max_matches,
        rank_norm=s.ocr_rank_normalization,
        limit=size + 1,
        offset=(page - 1) * size,
    )
    query = sql.SQL(
        """WITH {}
SELECT asset_id, relevance, NULL::float8, relevance, strict_match
FROM ocr_ranked
ORDER BY relevance DESC, asset_id
LIMIT %(limit)s OFFSET %(offset)s"""
    ).format(_ocr_cte(scope, strict_q, match_q, limited=False))
    rows = yield (query, params)
    return _page(rows, page, size, match_q)


async def _drive(conn: psycopg.AsyncConnection[Any], steps: Steps) -> SearchPage:
    # One transaction: the set_config(..., true) settings of the first statement apply to the second.
    async with conn.transaction():
        try:
            statement = next(steps)
            while True:
                cur = await conn.execute(statement[0], statement[1])
                rows = await cur.fetchall()
                statement = steps.send(rows)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


# --- public interface -------------------------------------------------------------------------------------------


async def search_hybrid(
    conn: psycopg.AsyncConnection[Any],
    *,
    context: SearchContext,
    user_ids: Sequence[UUID],
    query_text: str | None,
    query_embedding: Sequence[float] | Any | None,
    filters: SearchFilters | None = None,
    page: int = 1,
    size: int = 100,
) -> SearchPage:
    """CLIP similarity fused with OCR relevance.

    ``query_embedding`` is the CLIP text embedding of the query (same model/dimension as
    ``smart_search``); ``query_text`` is the text matched against OCR. Either may be None: the search
    then uses the other signal alone. Assets found by only one signal still rank. Results are bounded by
    the candidate pools (``clip_candidates`` + ``ocr_candidates``); ``next_page`` is None past them.
    Raises ValueError for invalid paging or a wrong-sized embedding, never for any query text.
    """
    return await _drive(conn, _hybrid_steps(context, user_ids, query_text, query_embedding, filters, page, size))


async def search_ocr(
    conn: psycopg.AsyncConnection[Any],
    *,
    context: SearchContext,
    user_ids: Sequence[UUID],
    query_text: str | None,
    filters: SearchFilters | None = None,
    page: int = 1,
    size: int = 100,
) -> SearchPage:
    """OCR text search (the ``ocr:`` search): every matching asset, most relevant first (exact matches,
    then fuzzy ones; ts_rank within each), paged through all matches (at most ``ocr_max_matches``)."""
    return await _drive(conn, _ocr_steps(context, user_ids, query_text, filters, page, size))


async def explain_search(
    conn: psycopg.AsyncConnection[Any],
    *,
    context: SearchContext,
    user_ids: Sequence[UUID],
    query_text: str | None,
    query_embedding: Sequence[float] | Any | None = None,
    filters: SearchFilters | None = None,
    page: int = 1,
    size: int = 100,
    analyze: bool = False,
) -> str:
    """EXPLAIN (optionally ANALYZE) of the main statement :func:`search_hybrid` (with an embedding) or
    :func:`search_ocr` (without) would run, under the same transaction settings. For operators and the
    benchmark: shows that candidates come from clip_index / ocr_document_doc_idx."""
    steps = (
        _hybrid_steps(context, user_ids, query_text, query_embedding, filters, page, size)
        if query_embedding is not None
        else _ocr_steps(context, user_ids, query_text, filters, page, size)
    )
    prefix = sql.SQL("EXPLAIN (ANALYZE, BUFFERS) " if analyze else "EXPLAIN ")
    async with conn.transaction():
        try:
            statement = next(steps)
            cur = await conn.execute(statement[0], statement[1])
            statement = steps.send(await cur.fetchall())
            cur = await conn.execute(prefix + statement[0], statement[1])
            plan = await cur.fetchall()
        except StopIteration:
            return ""  # nothing to search for: no statement would run
        finally:
            steps.close()
    return "\n".join(str(r[0]) for r in plan)


async def build_queries(
    conn: psycopg.AsyncConnection[Any], context: SearchContext, query_text: str
) -> tuple[str | None, str | None]:
    """(strict, match) tsqueries for a query text, as the searches build them (diagnostics and tests)."""
    statement = _config_statement(
        context, sanitize_query_text(query_text, context.settings.max_query_chars), with_clip=False
    )
    async with conn.transaction():
        row = await _one(conn, statement[0], statement[1])
    assert row is not None
    return row[-2], row[-1]


__all__ = [
    "UNSET",
    "SchemaNotReadyError",
    "SearchContext",
    "SearchFilters",
    "SearchHit",
    "SearchPage",
    "build_queries",
    "explain_search",
    "sanitize_query_text",
    "search_hybrid",
    "search_ocr",
]
