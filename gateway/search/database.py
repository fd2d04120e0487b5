"""Immich's PostgreSQL for the search front: the connection pool (``psycopg_pool``), start-up migration that
never blocks the ML endpoints, and the database errors translated into :class:`DatabaseUnavailable`. The SQL
itself lives in ``db/`` (``db.search``, ``db.immich_reader``, ``db.immich_writer``).

Start-up: :meth:`SearchDatabase.start` launches a background task that runs ``db.migrate`` (when
``DB_SEARCH_MIGRATE``) and loads the :class:`~db.search.SearchContext`, retrying every ``DB_SEARCH_RETRY_S``
while the database is down. Until it succeeds, :attr:`ready` is False and searches are not answered from the
database; ``/predict`` never waits for any of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar
from uuid import UUID

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from db import immich_reader
from db.connection import connect, connect_async
from db.connection import first_line as _message
from db.immich_writer import OcrLine, write_clip_embedding, write_ocr_result
from db.migrate import migrate
from db.search import SearchContext
from db.settings import DbSearchSettings

log = logging.getLogger("gateway.search")

T = TypeVar("T")

# psycopg_pool re-checks idle connections every max_idle seconds; 0 would make that a busy loop.
_MIN_IDLE_S = 1.0


class DatabaseUnavailable(Exception):
    """The database cannot serve this request now (down, not migrated yet, or every connection busy)."""


def first_line(exc: BaseException) -> str:
    """A short, credential-free description of a database error for logs and replies (psycopg's messages name
    host and port, never the password)."""
    return f"{type(exc).__name__}: {_message(exc)}" if str(exc).strip() else type(exc).__name__


def _pool(db_settings: DbSearchSettings) -> AsyncConnectionPool[psycopg.AsyncConnection[Any]]:
    """At most ``pool_size`` autocommit connections (each search runs its own transaction), none opened
    before they are needed, idle ones closed after ``pool_idle_s``. psycopg_pool drops a broken connection and
    rolls back one returned inside a transaction."""
    return AsyncConnectionPool(
        db_settings.conninfo(),
        kwargs={"autocommit": True},
        min_size=0,
        max_size=db_settings.pool_size,
        timeout=db_settings.pool_acquire_timeout_s,
        max_idle=max(db_settings.pool_idle_s, _MIN_IDLE_S),
        open=False,
        name="search",
    )


class SearchDatabase:
    def __init__(self, db_settings: DbSearchSettings) -> None:
        self.db_settings = db_settings
        self.pool = _pool(db_settings)
        self._closed = False
        self._context: SearchContext | None = None
        self._context_loaded = 0.0
        self._context_lock = asyncio.Lock()
        self._bootstrap: asyncio.Task[None] | None = None
        self.last_error: str | None = None

    # ---- connections ---------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection. Raises DatabaseUnavailable when the gateway is closing, the database cannot be
        reached or every connection stays busy for ``pool_acquire_timeout_s``. (The pool opens on first use: the
        regenerate CLI never runs :meth:`start`.)"""
        if self._closed:
            raise DatabaseUnavailable("the gateway is shutting down")
        if self.pool.closed:
            await self.pool.open(wait=False)
        try:
            async with self.pool.connection() as conn:
                yield conn
        except PoolTimeout:
            raise DatabaseUnavailable(
                f"no database connection within {self.db_settings.pool_acquire_timeout_s:g}s "
                "(database down, or every one of DB_SEARCH_POOL_SIZE busy)"
            ) from None
        except PoolClosed:
            raise DatabaseUnavailable("the gateway is shutting down") from None

    async def _read(self, query: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        """Run one of ``db.immich_reader``'s reads on a pooled connection; any database error is unavailability."""
        try:
            async with self.connection() as conn:
                return await query(conn)
        except psycopg.Error as exc:
            raise DatabaseUnavailable(first_line(exc)) from None

    # ---- start-up ----------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Migrated and the search context loaded: searches can be answered from the database."""
        return self._context is not None

    def start(self, *, migrate_schema: bool) -> None:
        self._bootstrap = asyncio.get_running_loop().create_task(
            self._bootstrap_loop(migrate_schema), name="search-db-bootstrap"
        )

    async def _bootstrap_loop(self, migrate_schema: bool) -> None:
        where = self.db_settings.redacted_conninfo()
        attempt = 0
        while True:
            attempt += 1
            try:
                if migrate_schema:
                    await asyncio.to_thread(migrate, self.db_settings)
                context = await self._load_context()
            except Exception as exc:
                self.last_error = first_line(exc)
                # Loud on the first failure, quieter on the retries: the ML endpoints are unaffected either way.
                log.log(
                    logging.ERROR if attempt == 1 else logging.WARNING,
                    "search database unavailable; /predict keeps working, searches fall back to Immich "
                    "('ocr:' searches and regenerate get 503) until it is reachable",
                    extra={
                        "fields": {
                            "database": where,
                            "error": self.last_error,
                            "attempt": attempt,
                            "retry_in_s": self.db_settings.retry_s,
                        }
                    },
                )
                await asyncio.sleep(self.db_settings.retry_s)
                continue
            self._set_context(context)
            self.last_error = None
            log.info(
                "search database ready",
                extra={
                    "fields": {
                        "database": where,
                        "segmenter": context.segmenter,
                        "vector_index": context.vector_index,
                        "embedding_dim": context.embedding_dim,
                        "migrated": migrate_schema,
                    }
                },
            )
            return

    async def _load_context(self) -> SearchContext:
        # Its own connection, not the pool's: a failure then names its cause (refused, bad password, not
        # migrated) instead of a pool timeout.
        async with await connect_async(self.db_settings) as conn:
            return await SearchContext.load(conn, self.db_settings)

    def _set_context(self, context: SearchContext) -> None:
        self._context = context
        self._context_loaded = time.monotonic()

    async def close(self) -> None:
        self._closed = True
        if self._bootstrap is not None:
            self._bootstrap.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._bootstrap
        await self.pool.close()

    # ---- search --------------------------------------------------------------------------------------------

    async def context(self) -> SearchContext:
        """The search context, re-read every ``context_ttl_s`` (Immich may rebuild its vector index or change
        the CLIP dimension while we run). Raises DatabaseUnavailable before start-up succeeded."""
        context = self._context
        if context is None:
            raise DatabaseUnavailable(self.last_error or "the search database is not ready yet")
        if time.monotonic() - self._context_loaded <= self.db_settings.context_ttl_s:
            return context
        async with self._context_lock:
            if time.monotonic() - self._context_loaded > self.db_settings.context_ttl_s:
                try:
                    self._set_context(await self._load_context())
                except Exception as exc:
                    # Keep serving with the previous context; a transient error must not stop search.
                    log.warning("search context reload failed", extra={"fields": {"error": first_line(exc)}})
                    self._context_loaded = time.monotonic()
        return self._context or context

    async def partners_in_timeline(self, user_id: UUID) -> list[UUID]:
        """Immich's ``getUserIdsToSearch`` partners of ``user_id`` (see :mod:`db.immich_reader`)."""
        return await self._read(lambda conn: immich_reader.partners_in_timeline(conn, self.db_settings, user_id))

    async def api_key_owner(self, key_digest: bytes) -> tuple[UUID, bool] | None:
        """(user id, isAdmin) of an API key by its stored SHA-256, None when revoked. Only asked after Immich
        accepted the key, so this names the caller and decides nothing: Immich checks keys and permissions."""
        return await self._read(lambda conn: immich_reader.api_key_owner(conn, self.db_settings, key_digest))

    async def stored_config(self) -> Any | None:
        """Immich's stored system config (only the values an admin changed), or None when there is none."""
        return await self._read(lambda conn: immich_reader.stored_config(conn, self.db_settings))

    # ---- regenerate writes ---------------------------------------------------------------------------------

    async def write_ocr(self, asset_id: UUID, lines: Sequence[OcrLine]) -> None:
        """Immich's OCR write for one asset, one transaction (db.immich_writer runs on a sync connection, so it
        runs on a worker thread; regenerates are rare)."""
        await asyncio.to_thread(self._write_sync, write_ocr_result, asset_id, lines)

    async def write_clip(self, asset_id: UUID, embedding: Sequence[float]) -> None:
        await asyncio.to_thread(self._write_sync, write_clip_embedding, asset_id, embedding)

    def _write_sync(self, writer: Any, asset_id: UUID, payload: Any) -> None:
        try:
            conn = connect(self.db_settings)
        except Exception as exc:
            raise DatabaseUnavailable(first_line(exc)) from None
        with conn:
            try:
                writer(conn, asset_id, payload, settings=self.db_settings)
            except psycopg.Error as exc:
                # Lost connection, lock or statement timeout, a concurrent schema change: the write did not
                # happen (one transaction) and the caller may retry.
                raise DatabaseUnavailable(first_line(exc)) from None
