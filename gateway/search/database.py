"""Immich's PostgreSQL for the search front: a small async connection pool, start-up migration that never
blocks the ML endpoints, the caller's partner scope, Immich's stored config, and the regenerate writes.

The pool is our own (a few dozen lines) rather than ``psycopg_pool``: the gateway needs only "at most N
connections, reuse idle ones for a while", and one dependency fewer in the image.

Start-up: :meth:`SearchDatabase.start` launches a background task that runs ``db.migrate`` (when
``GATEWAY_SEARCH__MIGRATE``) and loads the :class:`~db.search.SearchContext`, retrying every
``GATEWAY_SEARCH__DB_RETRY_S`` while the database is down. Until it succeeds, :attr:`ready` is False and
searches are not answered from the database; ``/predict`` never waits for any of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from db.immich_writer import OcrLine, write_clip_embedding, write_ocr_result
from db.migrate import connect, migrate
from db.search import SearchContext
from db.settings import DbSearchSettings
from gateway.search.immich_config import SYSTEM_CONFIG_KEY
from gateway.settings import SearchSettings

log = logging.getLogger("gateway.search")


class DatabaseUnavailable(Exception):
    """The database cannot serve this request now (down, not migrated yet, or every connection busy)."""


def first_line(exc: BaseException) -> str:
    """A short, credential-free description of a database error for logs and replies (psycopg's messages name
    host and port, never the password)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class ConnectionPool:
    """At most ``max_size`` async connections (autocommit; each search runs its own transaction), idle ones
    reused for ``max_idle_s``. A connection that is broken or left inside a transaction is closed, never reused."""

    def __init__(self, conninfo: str, *, max_size: int, acquire_timeout_s: float, max_idle_s: float) -> None:
        self._conninfo = conninfo
        self._slots = asyncio.Semaphore(max_size)
        self._idle: list[tuple[float, psycopg.AsyncConnection[Any]]] = []
        self._acquire_timeout_s = acquire_timeout_s
        self._max_idle_s = max_idle_s
        self._closed = False
        self._closing: set[asyncio.Task[None]] = set()

    def _take_idle(self) -> psycopg.AsyncConnection[Any] | None:
        now = time.monotonic()
        while self._idle:
            since, conn = self._idle.pop()
            if now - since <= self._max_idle_s and not conn.closed:
                return conn
            self._discard(conn)
        return None

    def _discard(self, conn: psycopg.AsyncConnection[Any]) -> None:
        # Closing is quick and local; do it in the background so the request never waits on it. The set keeps
        # a reference until it is done (the event loop holds tasks only weakly).
        task = asyncio.get_running_loop().create_task(conn.close())
        self._closing.add(task)
        task.add_done_callback(self._closed_one)

    def _closed_one(self, task: asyncio.Task[None]) -> None:
        self._closing.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a failed close of a discarded connection is not worth a warning

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        if self._closed:
            raise DatabaseUnavailable("the gateway is shutting down")
        try:
            async with asyncio.timeout(self._acquire_timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise DatabaseUnavailable(
                f"no database connection free within {self._acquire_timeout_s:g}s (GATEWAY_SEARCH__DB_POOL_SIZE)"
            ) from None
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            conn = self._take_idle()
            if conn is None:
                try:
                    conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
                except psycopg.Error as exc:
                    raise DatabaseUnavailable(first_line(exc)) from None
            yield conn
        finally:
            if conn is not None:
                reusable = (
                    not self._closed
                    and not conn.closed
                    and not conn.broken
                    and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                )
                if reusable:
                    self._idle.append((time.monotonic(), conn))
                else:
                    self._discard(conn)
            self._slots.release()

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for _, conn in idle:
            with contextlib.suppress(Exception):
                await conn.close()


class SearchDatabase:
    def __init__(self, db_settings: DbSearchSettings, settings: SearchSettings) -> None:
        self.db_settings = db_settings
        self.settings = settings
        self.pool = ConnectionPool(
            db_settings.conninfo(),
            max_size=settings.db_pool_size,
            acquire_timeout_s=settings.db_acquire_timeout_s,
            max_idle_s=settings.db_idle_s,
        )
        self._context: SearchContext | None = None
        self._context_loaded = 0.0
        self._context_lock = asyncio.Lock()
        self._bootstrap: asyncio.Task[None] | None = None
        self.last_error: str | None = None

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
                context = await asyncio.to_thread(self._bootstrap_sync, migrate_schema)
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
                            "retry_in_s": self.settings.db_retry_s,
                        }
                    },
                )
                await asyncio.sleep(self.settings.db_retry_s)
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

    def _bootstrap_sync(self, migrate_schema: bool) -> SearchContext:
        if migrate_schema:
            migrate(self.db_settings)
        with connect(self.db_settings) as conn:
            return SearchContext.load(conn, self.db_settings)

    def _set_context(self, context: SearchContext) -> None:
        self._context = context
        self._context_loaded = time.monotonic()

    async def close(self) -> None:
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
        if time.monotonic() - self._context_loaded <= self.settings.context_ttl_s:
            return context
        async with self._context_lock:
            if time.monotonic() - self._context_loaded > self.settings.context_ttl_s:
                try:
                    self._set_context(await asyncio.to_thread(self._load_context_sync))
                except Exception as exc:
                    # Keep serving with the previous context; a transient error must not stop search.
                    log.warning("search context reload failed", extra={"fields": {"error": first_line(exc)}})
                    self._context_loaded = time.monotonic()
        return self._context or context

    def _load_context_sync(self) -> SearchContext:
        with connect(self.db_settings) as conn:
            return SearchContext.load(conn, self.db_settings)

    async def partners_in_timeline(self, user_id: UUID) -> list[UUID]:
        """Users who share their library with ``user_id`` and whom ``user_id`` shows in the timeline (and
        search), both not deleted: Immich's ``getUserIdsToSearch``."""
        table = sql.Identifier(self.db_settings.immich_schema, "partner")
        users = sql.Identifier(self.db_settings.immich_schema, "user")
        query = sql.SQL(
            'SELECT p."sharedById" FROM {partner} AS p '
            'JOIN {users} AS sharer ON sharer.id = p."sharedById" AND sharer."deletedAt" IS NULL '
            'JOIN {users} AS viewer ON viewer.id = p."sharedWithId" AND viewer."deletedAt" IS NULL '
            'WHERE p."sharedWithId" = %s AND p."inTimeline" ORDER BY 1'
        ).format(partner=table, users=users)
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(query, [user_id])
                rows = await cur.fetchall()
        except psycopg.Error as exc:
            raise DatabaseUnavailable(first_line(exc)) from None
        return [UUID(str(row[0])) for row in rows]

    async def api_key_owner(self, key_digest: bytes) -> tuple[UUID, bool] | None:
        """(user id, isAdmin) of the API key whose stored SHA-256 is ``key_digest``, its user not deleted; None when
        there is no such key (revoked). Only asked after Immich accepted the key, so this names the caller and
        decides nothing: Immich checks keys and permissions."""
        query = sql.SQL(
            'SELECT u.id, u."isAdmin" FROM {keys} AS k '
            'JOIN {users} AS u ON u.id = k."userId" AND u."deletedAt" IS NULL '
            'WHERE k."key" = %s'
        ).format(
            keys=sql.Identifier(self.db_settings.immich_schema, "api_key"),
            users=sql.Identifier(self.db_settings.immich_schema, "user"),
        )
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute(query, [key_digest])
                row = await cur.fetchone()
        except psycopg.Error as exc:
            raise DatabaseUnavailable(first_line(exc)) from None
        return None if row is None else (UUID(str(row[0])), bool(row[1]))

    async def stored_config(self) -> Any | None:
        """Immich's stored system config (only the values an admin changed), or None when there is none."""
        table = f"{self.db_settings.immich_schema}.system_metadata"
        try:
            async with self.pool.connection() as conn:
                cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", [table])
                exists = await cur.fetchone()
                if not exists or not exists[0]:
                    return None
                cur = await conn.execute(
                    sql.SQL("SELECT value FROM {} WHERE key = %s").format(
                        sql.Identifier(self.db_settings.immich_schema, "system_metadata")
                    ),
                    [SYSTEM_CONFIG_KEY],
                )
                row = await cur.fetchone()
        except psycopg.Error as exc:
            raise DatabaseUnavailable(first_line(exc)) from None
        return row[0] if row else None

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
