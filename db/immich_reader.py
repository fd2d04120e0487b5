"""Reads of Immich's own tables that the search front needs: who the caller is, whose assets they may see,
and Immich's stored system config. Async (the gateway's driver); every value is a parameter and every table
name a quoted identifier in ``settings.immich_schema``.

Reference: Immich 3.1 ``PartnerRepository`` / ``getUserIdsToSearch``, ``ApiKeyRepository.getKey``,
``SystemMetadataRepository`` (shared/reference/immich-db-and-api.md).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from db.settings import DbSearchSettings

#: system_metadata key under which Immich stores the admin's config changes.
SYSTEM_CONFIG_KEY = "system-config"


def _table(settings: DbSearchSettings, name: str) -> sql.Identifier:
    return sql.Identifier(settings.immich_schema, name)


async def partners_in_timeline(
    conn: psycopg.AsyncConnection[Any], settings: DbSearchSettings, user_id: UUID
) -> list[UUID]:
    """Users who share their library with ``user_id`` and whom ``user_id`` shows in the timeline (and
    search), both not deleted: Immich's ``getUserIdsToSearch``."""
    query = sql.SQL(
        'SELECT p."sharedById" FROM {partner} AS p '
        'JOIN {users} AS sharer ON sharer.id = p."sharedById" AND sharer."deletedAt" IS NULL '
        'JOIN {users} AS viewer ON viewer.id = p."sharedWithId" AND viewer."deletedAt" IS NULL '
        'WHERE p."sharedWithId" = %s AND p."inTimeline" ORDER BY 1'
    ).format(partner=_table(settings, "partner"), users=_table(settings, "user"))
    cur = await conn.execute(query, [user_id])
    return [UUID(str(row[0])) for row in await cur.fetchall()]


async def api_key_owner(
    conn: psycopg.AsyncConnection[Any], settings: DbSearchSettings, key_digest: bytes
) -> tuple[UUID, bool] | None:
    """(user id, isAdmin) of the API key whose stored SHA-256 is ``key_digest``, its user not deleted; None
    when there is no such key (revoked)."""
    query = sql.SQL(
        'SELECT u.id, u."isAdmin" FROM {keys} AS k '
        'JOIN {users} AS u ON u.id = k."userId" AND u."deletedAt" IS NULL '
        'WHERE k."key" = %s'
    ).format(keys=_table(settings, "api_key"), users=_table(settings, "user"))
    cur = await conn.execute(query, [key_digest])
    row = await cur.fetchone()
    return None if row is None else (UUID(str(row[0])), bool(row[1]))


async def stored_config(conn: psycopg.AsyncConnection[Any], settings: DbSearchSettings) -> Any | None:
    """Immich's stored system config (only the values an admin changed), or None when there is none (or no
    ``system_metadata`` table at all)."""
    cur = await conn.execute("SELECT to_regclass(%s) IS NOT NULL", [f"{settings.immich_schema}.system_metadata"])
    exists = await cur.fetchone()
    if not exists or not exists[0]:
        return None
    cur = await conn.execute(
        sql.SQL("SELECT value FROM {} WHERE key = %s").format(_table(settings, "system_metadata")),
        [SYSTEM_CONFIG_KEY],
    )
    row = await cur.fetchone()
    return row[0] if row else None
