"""Connecting to Immich's database, shared by migrate, sync, search and the immich writer.

One place for the connection string (from :class:`~db.settings.DbSearchSettings`), the ``search_path`` our
sessions use, and credential-free error text. Nothing here imports another ``db`` module but the settings,
so every module can import it at the top (no import cycles).
"""

from __future__ import annotations

from typing import Any

import psycopg

from db.settings import DbSearchSettings


class ConnectError(RuntimeError):
    """The database cannot be reached; the message names the redacted connection string, never the password."""


def first_line(exc: BaseException) -> str:
    """The first line of an error message (psycopg's messages name host and port, never the password)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def search_path_value(settings: DbSearchSettings) -> str:
    """search_path for our sessions: our schema first (CREATEs land there), then Immich's, then public (where
    Immich installs vector / pg_trgm), pg_temp last so temporary objects can never shadow ours."""
    schemas: list[str] = []
    for name in (settings.schema_name, settings.immich_schema, "public"):
        if name not in schemas:
            schemas.append(name)
    return ", ".join(f'"{name}"' for name in schemas) + ", pg_temp"


def set_local_search_path(conn: psycopg.Connection[Any], settings: DbSearchSettings) -> None:
    """Our search_path for the rest of the current transaction only (``set_config(..., true)``)."""
    conn.execute("SELECT set_config('search_path', %s, true)", [search_path_value(settings)])


def connect(settings: DbSearchSettings, *, autocommit: bool = True) -> psycopg.Connection[Any]:
    """A new (sync) connection to Immich's database, for migrations, document sync and Immich writes."""
    try:
        return psycopg.connect(settings.conninfo(), autocommit=autocommit)
    except psycopg.OperationalError as exc:
        raise ConnectError(f"cannot connect to {settings.redacted_conninfo()}: {first_line(exc)}") from None


async def connect_async(settings: DbSearchSettings, *, autocommit: bool = True) -> psycopg.AsyncConnection[Any]:
    """A new async connection, for search (the gateway uses a pool of these, see ``gateway/search/database.py``)."""
    try:
        return await psycopg.AsyncConnection.connect(settings.conninfo(), autocommit=autocommit)
    except psycopg.OperationalError as exc:
        raise ConnectError(f"cannot connect to {settings.redacted_conninfo()}: {first_line(exc)}") from None
