"""Settings of search: the database layer (OCR documents, hybrid search, regenerate writes) and the gateway's
search front that serves it (``POST /api/search/smart``, its connection pool and start-up).

Every field is read from the environment with the prefix ``DB_SEARCH_`` (e.g. ``DB_SEARCH_URL``,
``DB_SEARCH_CLIP_CANDIDATES``, ``DB_SEARCH_HYBRID``). The search front's fields were ``GATEWAY_SEARCH__*`` before
(``GATEWAY_SEARCH__DB_POOL_SIZE`` is now ``DB_SEARCH_POOL_SIZE``); those old names are still read. Every limit has
a default that is safe on a small (2-core) server.
"""

from __future__ import annotations

from typing import Literal

import psycopg.conninfo
from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "DB_SEARCH_"

Segmenter = Literal["auto", "zhparser", "bigram"]
Fusion = Literal["rrf", "weighted"]
IterativeScan = Literal["relaxed_order", "strict_order", "off"]


def _renamed(name: str, old: str) -> AliasChoices:
    """``DB_SEARCH_<NAME>``, and the name the setting had under the gateway (still read)."""
    return AliasChoices(ENV_PREFIX + name.upper(), old)


class DbSearchSettings(BaseSettings):
    """The one configuration of search (the ``db`` package and the gateway's search front). Credentials live
    only in ``url`` (a secret)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True, populate_by_name=True)

    # --- connection --------------------------------------------------------------------------------
    url: SecretStr | None = Field(
        default=None,
        description=(
            "libpq URL or key=value DSN of Immich's PostgreSQL database. When unset, it is assembled from "
            "Immich's own variables (DB_HOSTNAME, DB_PORT, DB_USERNAME, DB_PASSWORD, DB_DATABASE_NAME) so the "
            "service can share Immich's .env file."
        ),
    )
    connect_timeout_s: int = Field(default=10, ge=1, le=300, description="libpq connect_timeout in seconds.")
    application_name: str = Field(
        default="immich-zh-ai", description="application_name reported to PostgreSQL (pg_stat_activity)."
    )

    # --- where things live -------------------------------------------------------------------------
    schema_name: str = Field(
        default="zh_search",
        description=(
            "Our own schema. Every table, function, index and text-search configuration of this project is "
            "created here, never in Immich's schema (Immich's start-up drift check reports foreign functions "
            "and constraints in its schema)."
        ),
    )
    immich_schema: str = Field(default="public", description="Schema holding Immich's tables (Immich uses public).")

    # --- segmentation ------------------------------------------------------------------------------
    segmenter: Segmenter = Field(
        default="auto",
        description=(
            "'auto': zhparser when the database can load it, else the bigram fallback; 'zhparser': require it "
            "(start-up fails without it); 'bigram': always the fallback (plain PostgreSQL, no extension)."
        ),
    )
    text_search_config: str = Field(
        default="zh_cn_ocr",
        description="Name of the zhparser text-search configuration created in schema_name (zhparser mode only).",
    )
    max_document_chars: int = Field(
        default=20_000,
        ge=100,
        le=1_000_000,
        description="OCR text indexed per asset (characters, after joining its lines); the rest is not indexed.",
    )

    # --- query limits ------------------------------------------------------------------------------
    max_query_chars: int = Field(
        default=256, ge=1, le=10_000, description="User query text is truncated to this many characters."
    )
    max_query_tokens: int = Field(
        default=32, ge=1, le=256, description="At most this many lexemes of a query go into the tsquery."
    )
    prefix_min_chars: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Latin/number query words at least this long also match as prefixes ('inv' finds 'invoice').",
    )
    fuzzy_min_tokens: int = Field(
        default=3,
        ge=0,
        le=64,
        description=(
            "A query term of at least this many lexemes also matches a text holding all but one of them "
            "(ranked below exact matches): 增值税发票 then finds 增值税专用发票. 0 disables."
        ),
    )
    fuzzy_max_tokens: int = Field(
        default=12,
        ge=2,
        le=64,
        description="Longer terms get no fuzzy branch (its tsquery grows with the square of the term length).",
    )
    max_page_size: int = Field(default=1000, ge=1, le=10_000, description="Largest accepted page size (Immich: 1000).")
    max_page: int = Field(default=1000, ge=1, description="Largest accepted page number (bounds OFFSET).")
    statement_timeout_ms: int = Field(
        default=5_000, ge=100, le=600_000, description="statement_timeout applied to every search transaction."
    )

    # --- candidates --------------------------------------------------------------------------------
    clip_candidates: int = Field(
        default=200,
        ge=1,
        le=10_000,
        description="Hybrid search: nearest CLIP neighbours (after filters) taken from the vector index.",
    )
    ocr_candidates: int = Field(
        default=200,
        ge=1,
        le=10_000,
        description="Hybrid search: best OCR matches (after filters) taken from the GIN index.",
    )
    ocr_max_matches: int = Field(
        default=20_000,
        ge=1,
        le=1_000_000,
        description=(
            "Upper bound on OCR matches that are ranked per query (ranking cost is linear in matches); matches "
            "beyond it are dropped before ranking."
        ),
    )
    hnsw_ef_search: int = Field(
        default=200,
        ge=1,
        le=1000,
        description=(
            "pgvector hnsw.ef_search for the CLIP candidate scan; about clip_candidates is fastest (an iterative "
            "scan continues past it when filters reject rows, so it never limits the result count)."
        ),
    )
    hnsw_iterative_scan: IterativeScan = Field(
        default="relaxed_order",
        description="pgvector 0.8 hnsw.iterative_scan: keeps scanning the graph until filters let enough rows through.",
    )
    hnsw_max_scan_tuples: int = Field(
        default=40_000,
        ge=100,
        le=10_000_000,
        description="pgvector hnsw.max_scan_tuples: bound on graph tuples an iterative scan may visit.",
    )
    vchordrq_probes: str | None = Field(
        default=None,
        description=(
            "VectorChord vchordrq.probes for Immich's default image; unset = Immich's own rule derived from the "
            "index's lists option (1 for lists <= 1, ceil(lists/8) otherwise, empty for a list-less index)."
        ),
    )

    # --- fusion ------------------------------------------------------------------------------------
    fusion: Fusion = Field(
        default="rrf",
        description=(
            "'rrf': reciprocal rank fusion weight/(rrf_k + rank) per signal; 'weighted': min-max normalised "
            "CLIP similarity and OCR rank over the candidate pools, summed with the weights."
        ),
    )
    rrf_k: int = Field(default=60, ge=1, le=10_000, description="RRF damping constant (60 is the usual choice).")
    clip_weight: float = Field(default=1.0, ge=0.0, le=100.0, description="Weight of the CLIP signal.")
    ocr_weight: float = Field(default=1.0, ge=0.0, le=100.0, description="Weight of the OCR signal.")
    ocr_rank_normalization: int = Field(
        default=1,
        ge=0,
        le=63,
        description="ts_rank normalization bitmask (1 = divide by 1 + log(document length)).",
    )

    # --- maintenance -------------------------------------------------------------------------------
    backfill_batch_size: int = Field(
        default=500, ge=1, le=100_000, description="Assets per transaction when (re)building OCR documents."
    )
    migration_lock_timeout_s: int = Field(
        default=600,
        ge=1,
        le=86_400,
        description="How long a migration runner waits for another runner's advisory lock before giving up.",
    )
    ddl_lock_timeout_ms: int = Field(
        default=30_000,
        ge=100,
        le=3_600_000,
        description="lock_timeout while attaching triggers to Immich's asset_ocr (never block Immich for long).",
    )

    # --- the gateway's search front (were GATEWAY_SEARCH__*) ----------------------------------------------
    hybrid: bool = Field(
        default=True,
        validation_alias=_renamed("hybrid", "GATEWAY_SEARCH__HYBRID"),
        description=(
            "Queries without the 'ocr:' prefix are ranked by CLIP and OCR together. false: they go to Immich "
            "unchanged (only 'ocr:' queries are answered by the gateway)."
        ),
    )
    hydrate_concurrency: int = Field(
        default=16,
        ge=1,
        le=256,
        validation_alias=_renamed("hydrate_concurrency", "GATEWAY_SEARCH__HYDRATE_CONCURRENCY"),
        description="Most concurrent GET /api/assets/{id} calls to Immich while building one page of results.",
    )
    max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        validation_alias=_renamed("max_body_bytes", "GATEWAY_SEARCH__MAX_BODY_BYTES"),
        description="Largest accepted search request body, in bytes.",
    )
    max_filter_ids: int = Field(
        default=100,
        ge=1,
        le=10_000,
        validation_alias=_renamed("max_filter_ids", "GATEWAY_SEARCH__MAX_FILTER_IDS"),
        description="Most ids accepted in one personIds / albumIds filter.",
    )
    clip_query_max_chars: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        validation_alias=_renamed("clip_query_max_chars", "GATEWAY_SEARCH__CLIP_QUERY_MAX_CHARS"),
        description="Characters of a query sent to the CLIP text model (CLIP reads only the first ~77 tokens anyway).",
    )
    text_embedding_cache_size: int = Field(
        default=100,
        ge=0,
        le=100_000,
        validation_alias=_renamed("text_embedding_cache_size", "GATEWAY_SEARCH__TEXT_EMBEDDING_CACHE_SIZE"),
        description="CLIP text embeddings kept (by model, query and language), as Immich's own 100-entry cache.",
    )
    migrate: bool = Field(
        default=True,
        validation_alias=_renamed("migrate", "GATEWAY_SEARCH__MIGRATE"),
        description=(
            "The gateway runs the search schema's migrations (db.migrate) at start-up. false: another process "
            "migrates; the gateway only waits for the schema."
        ),
    )
    pool_size: int = Field(
        default=8,
        ge=1,
        le=200,
        validation_alias=_renamed("pool_size", "GATEWAY_SEARCH__DB_POOL_SIZE"),
        description="Most database connections the gateway's search front holds (psycopg_pool).",
    )
    pool_acquire_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        validation_alias=_renamed("pool_acquire_timeout_s", "GATEWAY_SEARCH__DB_ACQUIRE_TIMEOUT_S"),
        description=(
            "Seconds a search waits for a database connection (a free one, or a new one while the database is "
            "down) before it is handed to Immich ('ocr:' searches: 503)."
        ),
    )
    pool_idle_s: float = Field(
        default=60.0,
        ge=0,
        le=3600,
        validation_alias=_renamed("pool_idle_s", "GATEWAY_SEARCH__DB_IDLE_S"),
        description="Seconds an idle pooled database connection is kept before it is closed (at least 1).",
    )
    retry_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        validation_alias=_renamed("retry_s", "GATEWAY_SEARCH__DB_RETRY_S"),
        description=(
            "Seconds between the gateway's attempts to reach and migrate the database while it is down (the ML "
            "endpoints work meanwhile; searches fall back to Immich, 'ocr:' searches get a 503)."
        ),
    )
    context_ttl_s: float = Field(
        default=300.0,
        gt=0,
        le=86_400,
        validation_alias=_renamed("context_ttl_s", "GATEWAY_SEARCH__CONTEXT_TTL_S"),
        description="Seconds before the detected search context (vector index, CLIP dimension) is re-read.",
    )

    @model_validator(mode="after")
    def _some_weight(self) -> DbSearchSettings:
        if self.clip_weight + self.ocr_weight <= 0:
            raise ValueError("clip_weight + ocr_weight must be > 0")
        return self

    @field_validator("schema_name", "immich_schema", "text_search_config")
    @classmethod
    def _plain_identifier(cls, value: str) -> str:
        # These names end up in DDL (as quoted identifiers) and in search_path; restricting them to plain
        # lower-case identifiers keeps them portable and rules out quoting surprises entirely.
        if not value or len(value) > 63 or not value.replace("_", "a").isalnum() or not value.isascii():
            raise ValueError("must be a plain identifier: ASCII letters, digits and '_' (max 63)")
        if value != value.lower() or value[0].isdigit():
            raise ValueError("must be lower case and must not start with a digit")
        return value

    def conninfo(self) -> str:
        """The connection string (contains the password: never log it; use :meth:`redacted_conninfo`)."""
        if self.url is not None:
            base = self.url.get_secret_value()
        else:
            import os

            base = psycopg.conninfo.make_conninfo(
                host=os.environ.get("DB_HOSTNAME", "database"),
                port=os.environ.get("DB_PORT", "5432"),
                user=os.environ.get("DB_USERNAME", "postgres"),
                password=os.environ.get("DB_PASSWORD", ""),
                dbname=os.environ.get("DB_DATABASE_NAME", "immich"),
            )
        return psycopg.conninfo.make_conninfo(
            base, connect_timeout=str(self.connect_timeout_s), application_name=self.application_name
        )

    def redacted_conninfo(self) -> str:
        """The connection string with the password removed, for logs and error messages."""
        params = psycopg.conninfo.conninfo_to_dict(self.conninfo())
        if "password" in params:
            params["password"] = "***"
        return psycopg.conninfo.make_conninfo("", **{k: str(v) for k, v in params.items()})
