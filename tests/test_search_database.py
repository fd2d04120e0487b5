"""The search front's database access (gateway/search/database.py) on a real PostgreSQL: psycopg_pool's limits
become DatabaseUnavailable (a search then goes to Immich), Immich's tables are read through db.immich_reader."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.types.json import Jsonb

from db.immich_reader import SYSTEM_CONFIG_KEY
from db.settings import DbSearchSettings
from db.testing import fresh_database, insert_user, load_immich_schema
from gateway.search.database import DatabaseUnavailable, SearchDatabase

pytestmark = pytest.mark.anyio


@pytest.fixture()
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture()
def immich_db(postgres_uri: str) -> Iterator[str]:
    with fresh_database(postgres_uri) as uri:
        load_immich_schema(uri)
        yield uri


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once the socket is closed


async def test_every_connection_busy_is_unavailable_not_a_hang(immich_db: str) -> None:
    db = SearchDatabase(DbSearchSettings(url=immich_db, pool_size=1, pool_acquire_timeout_s=0.5))
    try:
        async with db.connection() as held:
            started = time.monotonic()
            with pytest.raises(DatabaseUnavailable, match="DB_SEARCH_POOL_SIZE"):
                async with db.connection():
                    pass
            assert 0.4 < time.monotonic() - started < 5
            await held.execute("SELECT 1")
        async with db.connection() as again:  # given back: usable again
            cur = await again.execute("SELECT 1")
            assert await cur.fetchone() == (1,)
    finally:
        await db.close()
    with pytest.raises(DatabaseUnavailable, match="shutting down"):
        async with db.connection():
            pass


async def test_a_connection_left_in_a_transaction_is_not_lent_as_is(immich_db: str) -> None:
    db = SearchDatabase(DbSearchSettings(url=immich_db, pool_size=1))
    try:
        async with db.connection() as conn:
            await conn.execute("BEGIN")
            await conn.execute("SELECT 1")
        async with db.connection() as conn:
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    finally:
        await db.close()


async def test_database_down_is_unavailable(immich_db: str) -> None:
    settings = DbSearchSettings(
        url=f"postgresql://nobody@127.0.0.1:{_closed_port()}/immich", pool_acquire_timeout_s=0.5, connect_timeout_s=1
    )
    db = SearchDatabase(settings)
    try:
        with pytest.raises(DatabaseUnavailable):
            await db.partners_in_timeline(uuid.uuid4())
        with pytest.raises(DatabaseUnavailable):
            await db.stored_config()
        with pytest.raises(DatabaseUnavailable, match="not ready"):
            await db.context()
    finally:
        await db.close()


async def test_immich_reads(immich_db: str) -> None:
    with psycopg.connect(immich_db, autocommit=True) as conn:
        viewer, sharer, hidden = insert_user(conn), insert_user(conn), insert_user(conn)
        conn.execute(
            'INSERT INTO partner ("sharedById", "sharedWithId", "inTimeline") VALUES (%s, %s, true), (%s, %s, false)',
            [sharer, viewer, hidden, viewer],
        )
    db = SearchDatabase(DbSearchSettings(url=immich_db))
    try:
        assert await db.partners_in_timeline(viewer) == [sharer]
        assert await db.api_key_owner(b"\x00" * 32) is None
        assert await db.stored_config() is None  # no system_metadata table at all
        with psycopg.connect(immich_db, autocommit=True) as conn:  # Immich's table, as its migrations create it
            conn.execute('CREATE TABLE system_metadata ("key" character varying PRIMARY KEY, "value" jsonb NOT NULL)')
            conn.execute(
                "INSERT INTO system_metadata (key, value) VALUES (%s, %s)",
                [SYSTEM_CONFIG_KEY, Jsonb({"machineLearning": {"enabled": False}})],
            )
        assert await db.stored_config() == {"machineLearning": {"enabled": False}}
        results = await asyncio.gather(*(db.partners_in_timeline(viewer) for _ in range(20)))
        assert all(r == [sharer] for r in results)  # more requests than connections: they wait their turn
    finally:
        await db.close()
