"""Versioned, idempotent migrations of our schema inside Immich's database, plus start-up housekeeping.

``migrate()`` is what a service calls at start-up (``python -m db.migrate`` does the same from a shell):

1. takes a session advisory lock, so two processes never migrate at once (the second waits, then finds
   nothing to do);
2. creates our schema and its ``schema_migrations`` table, then applies every ``migrations/NNN_*.sql`` not
   yet recorded, each in its own transaction together with its version row;
3. stores the settings that database-side writers need (``config`` table);
4. detects the segmenter (zhparser when the database has it, else the bigram fallback) and installs it;
5. attaches our triggers to Immich's ``asset_ocr`` when they are missing (they vanish if Immich ever
   recreates the table, hence on every start);
6. releases the lock and brings the OCR documents up to date (:func:`db.sync.sync_documents`: rows that
   existed before the triggers, documents built by another segmenter, anything a trigger had to skip).

Nothing here alters an Immich table; only the triggers attach to ``asset_ocr``.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
import sys
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from db.connection import ConnectError, connect, first_line, set_local_search_path
from db.settings import DbSearchSettings
from db.sync import sync_documents

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
SQL_DIR = Path(__file__).with_name("sql")
_MIGRATION_FILE = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.sql$")

# Keys of the advisory locks (two int4 keys; the second one is hashtext(<our schema>) so installations
# in different schemas do not serialise each other).
_MIGRATE_LOCK = "immich_zh_ai.migrate"
_SYNC_LOCK = "immich_zh_ai.sync"

# Value of segmenter_name() for each mode; the db/sql/segmenter_*.sql files return exactly these.
SEGMENTER_NAMES = {"bigram": "bigram-1", "zhparser": "zhparser-1"}

# zhparser token types (SCWS part-of-speech initials) kept in the text-search configuration. Dropped:
# c conjunctions (和 与 或), p prepositions (在 从 对), u auxiliaries (的 了 着), y modal particles (吗 呢 吧)
# and w punctuation: near-stop-words that only add noise to an OCR index. Queries go through the same
# configuration, so dropping them is symmetric. Everything else (nouns, verbs, adjectives, idioms, numerals,
# names, abbreviations, unknown tokens such as Latin words and codes, ...) is kept with the simple
# dictionary (lower-casing only, no stop words).
ZHPARSER_TOKEN_TYPES = (
    "a",
    "b",
    "d",
    "e",
    "f",
    "g",
    "h",
    "i",
    "j",
    "k",
    "l",
    "m",
    "n",
    "o",
    "q",
    "r",
    "s",
    "t",
    "v",
    "x",
    "z",
)


class MigrationError(RuntimeError):
    """The schema could not be brought up to date (message is safe to log: no credentials)."""


class SegmenterUnavailableError(MigrationError):
    """``segmenter='zhparser'`` was required but the database cannot provide it."""


class SegmenterChoice(StrEnum):
    ZHPARSER = "zhparser"
    BIGRAM = "bigram"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    @property
    def text(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class ZhparserProbe:
    """What the database says about zhparser."""

    parser_schema: str | None  # schema of an installed 'zhparser' text-search parser
    extension_available: bool  # the extension's control file is present on the server


@dataclass
class MigrationReport:
    applied: list[int] = field(default_factory=list)
    segmenter: str = ""
    segmenter_changed: bool = False
    triggers_created: int = 0
    sync: Any = None  # db.sync.SyncStats when documents were synchronised


def discover_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_FILE.match(path.name)
        if not match:
            raise MigrationError(f"unexpected file in migrations directory: {path.name}")
        found.append(Migration(int(match.group(1)), match.group(2), path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration versions in {directory}")
    return found


# --- segmenter detection ---------------------------------------------------------------------------------


def probe_zhparser(conn: psycopg.Connection[Any]) -> ZhparserProbe:
    row = conn.execute(
        """
        SELECT (SELECT n.nspname FROM pg_ts_parser AS p JOIN pg_namespace AS n ON n.oid = p.prsnamespace
                 WHERE p.prsname = 'zhparser' ORDER BY n.nspname LIMIT 1),
               EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'zhparser')
        """
    ).fetchone()
    assert row is not None
    return ZhparserProbe(parser_schema=row[0], extension_available=bool(row[1]))


def choose_segmenter(requested: str, probe: ZhparserProbe, *, can_create_extension: bool) -> SegmenterChoice:
    """The decision, separated from the database so it can be tested where zhparser is absent.

    ``auto`` takes zhparser whenever it is installed or installable, else the bigram fallback;
    ``zhparser`` insists (raises when impossible); ``bigram`` always takes the fallback. A parser left in
    the catalogue whose files are gone (the database image was switched back to Immich's stock one) is
    not usable: every call would fail.
    """
    if requested == "bigram":
        return SegmenterChoice.BIGRAM
    usable = probe.extension_available and (probe.parser_schema is not None or can_create_extension)
    if usable:
        return SegmenterChoice.ZHPARSER
    if requested == "zhparser":
        if not probe.extension_available:
            why = "the zhparser extension is not installed on the server (use the postgres-zhparser image)"
        else:
            why = (
                "the zhparser extension is available but this role may not CREATE EXTENSION (run it once as "
                "a superuser, or use the postgres-zhparser image whose init script does)"
            )
        raise SegmenterUnavailableError(f"segmenter 'zhparser' requested, but {why}")
    if probe.parser_schema is not None:
        log.warning("zhparser is in the catalogue but its files are missing on the server; using the bigram segmenter")
    return SegmenterChoice.BIGRAM


def _try_create_zhparser(conn: psycopg.Connection[Any], settings: DbSearchSettings) -> str | None:
    """CREATE EXTENSION zhparser in our schema (relocatable, so its parser and functions stay out of
    Immich's schema). Returns the parser's schema, or None when this role may not create it."""
    try:
        with conn.transaction():
            conn.execute(
                sql.SQL("CREATE EXTENSION IF NOT EXISTS zhparser SCHEMA {}").format(
                    sql.Identifier(settings.schema_name)
                )
            )
    except psycopg.Error as exc:
        log.warning("zhparser is available but could not be created (%s); using the bigram segmenter", first_line(exc))
        return None
    return probe_zhparser(conn).parser_schema


def _ensure_zhparser_config(conn: psycopg.Connection[Any], settings: DbSearchSettings, parser_schema: str) -> None:
    exists = conn.execute(
        """SELECT 1 FROM pg_ts_config AS c JOIN pg_namespace AS n ON n.oid = c.cfgnamespace
           WHERE n.nspname = %s AND c.cfgname = %s""",
        [settings.schema_name, settings.text_search_config],
    ).fetchone()
    if exists:
        return
    config = sql.Identifier(settings.schema_name, settings.text_search_config)
    conn.execute(
        sql.SQL("CREATE TEXT SEARCH CONFIGURATION {} (PARSER = {})").format(
            config, sql.Identifier(parser_schema, "zhparser")
        )
    )
    conn.execute(
        sql.SQL("ALTER TEXT SEARCH CONFIGURATION {} ADD MAPPING FOR {} WITH simple").format(
            config, sql.SQL(", ").join(sql.SQL(t) for t in ZHPARSER_TOKEN_TYPES)
        )
    )


def install_segmenter(conn: psycopg.Connection[Any], settings: DbSearchSettings) -> tuple[str, bool]:
    """Detect and install the segmenter; returns (segmenter_name(), changed)."""
    probe = probe_zhparser(conn)
    can_create = False
    if settings.segmenter != "bigram" and probe.parser_schema is None and probe.extension_available:
        parser_schema = _try_create_zhparser(conn, settings)
        if parser_schema is not None:
            probe = ZhparserProbe(parser_schema=parser_schema, extension_available=True)
            can_create = True
    choice = choose_segmenter(settings.segmenter, probe, can_create_extension=can_create)
    return apply_segmenter(conn, settings, choice, parser_schema=probe.parser_schema)


def apply_segmenter(
    conn: psycopg.Connection[Any],
    settings: DbSearchSettings,
    choice: SegmenterChoice,
    *,
    parser_schema: str | None = None,
) -> tuple[str, bool]:
    """Make ``choice`` the active segmenter (replacing segment() / segmenter_name()); returns
    (segmenter_name(), changed). Documents built by the previous one are rebuilt by the next sync."""
    target = SEGMENTER_NAMES[choice.value]
    with conn.transaction():
        set_local_search_path(conn, settings)
        current = conn.execute("SELECT segmenter_name()").fetchone()
        if current is not None and current[0] == target:
            return target, False
        if choice is SegmenterChoice.ZHPARSER:
            if parser_schema is not None:
                _ensure_zhparser_config(conn, settings, parser_schema)
            text = (SQL_DIR / "segmenter_zhparser.sql").read_text(encoding="utf-8")
            conn.execute(
                sql.SQL(text).format(  # type: ignore[arg-type]  # file content, not user data
                    config=sql.Literal(f"{settings.schema_name}.{settings.text_search_config}")
                )
            )
        else:
            conn.execute((SQL_DIR / "segmenter_bigram.sql").read_text(encoding="utf-8"))
        name = conn.execute("SELECT segmenter_name()").fetchone()
        assert name is not None
    log.info("segmenter switched from %s to %s; documents will be rebuilt", current[0] if current else None, name[0])
    return str(name[0]), True


# --- the runner --------------------------------------------------------------------------------------------


def _lock_keys(conn: psycopg.Connection[Any], name: str, settings: DbSearchSettings) -> tuple[int, int]:
    row = conn.execute("SELECT hashtext(%s), hashtext(%s)", [name, settings.schema_name]).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def applied_versions(conn: psycopg.Connection[Any], settings: DbSearchSettings) -> dict[int, str]:
    table = f"{settings.schema_name}.schema_migrations"
    if conn.execute("SELECT to_regclass(%s)", [table]).fetchone() == (None,):
        return {}
    rows = conn.execute(
        sql.SQL("SELECT version, checksum FROM {} ORDER BY version").format(
            sql.Identifier(settings.schema_name, "schema_migrations")
        )
    ).fetchall()
    return {int(v): str(c) for v, c in rows}


def _apply_migrations(conn: psycopg.Connection[Any], settings: DbSearchSettings) -> list[int]:
    schema = sql.Identifier(settings.schema_name)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
    conn.execute(
        sql.SQL(
            """CREATE TABLE IF NOT EXISTS {} (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 checksum   text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())"""
        ).format(sql.Identifier(settings.schema_name, "schema_migrations"))
    )
    done = applied_versions(conn, settings)
    applied: list[int] = []
    for migration in discover_migrations():
        if migration.version in done:
            if done[migration.version] != migration.checksum:
                # Never re-run an applied migration; an edited file is a packaging mistake worth a warning.
                log.warning("migration %03d_%s changed after it was applied", migration.version, migration.name)
            continue
        log.info("applying migration %03d_%s", migration.version, migration.name)
        try:
            with conn.transaction():
                set_local_search_path(conn, settings)
                conn.execute("SET LOCAL standard_conforming_strings = on")
                conn.execute(migration.text)
                conn.execute(
                    sql.SQL("INSERT INTO {} (version, name, checksum) VALUES (%s, %s, %s)").format(
                        sql.Identifier(settings.schema_name, "schema_migrations")
                    ),
                    [migration.version, migration.name, migration.checksum],
                )
        except psycopg.Error as exc:
            raise MigrationError(
                f"migration {migration.version:03d}_{migration.name} failed: {first_line(exc)}"
            ) from exc
        applied.append(migration.version)
    return applied


def _store_config(conn: psycopg.Connection[Any], settings: DbSearchSettings) -> None:
    values = {"max_document_chars": str(settings.max_document_chars)}
    with conn.transaction():
        set_local_search_path(conn, settings)
        for key, value in values.items():
            conn.execute(
                """INSERT INTO config (key, value) VALUES (%s, %s)
                   ON CONFLICT (key) DO UPDATE SET value = excluded.value WHERE config.value <> excluded.value""",
                [key, value],
            )


def _install_triggers(conn: psycopg.Connection[Any], settings: DbSearchSettings) -> int:
    with conn.transaction():
        set_local_search_path(conn, settings)
        conn.execute("SELECT set_config('lock_timeout', %s, true)", [f"{settings.ddl_lock_timeout_ms}ms"])
        row = conn.execute("SELECT install_triggers(%s)", [settings.immich_schema]).fetchone()
    assert row is not None
    return int(row[0])


def migrate(
    settings: DbSearchSettings | None = None,
    conn: psycopg.Connection[Any] | None = None,
    *,
    sync: bool = True,
    attach_to_immich: bool = True,
) -> MigrationReport:
    """Bring our schema up to date; safe to call from several processes at once and repeatedly.

    ``conn`` must be in autocommit mode (each migration runs in its own transaction); when omitted a
    connection is opened from ``settings``. ``sync=False`` skips the document synchronisation step.
    ``attach_to_immich=False`` installs only the schema and the segmenter (no triggers on Immich's
    ``asset_ocr``, no document sync): library mode uses the segmentation in a database without Immich.
    """
    settings = settings or DbSearchSettings()
    own = conn is None
    if conn is None:
        conn = connect(settings)
    if not conn.autocommit:
        raise ValueError("migrate() needs a connection in autocommit mode")
    report = MigrationReport()
    try:
        _apply_under_lock(conn, settings, report, attach_to_immich=attach_to_immich)
        if sync and attach_to_immich:
            _sync_unless_busy(conn, settings, report)
    finally:
        if own:
            conn.close()
    log.info(
        "zh_search schema %s ready: applied=%s segmenter=%s triggers_created=%d",
        settings.schema_name,
        report.applied,
        report.segmenter,
        report.triggers_created,
    )
    return report


def _apply_under_lock(
    conn: psycopg.Connection[Any], settings: DbSearchSettings, report: MigrationReport, *, attach_to_immich: bool
) -> None:
    """Migrations, stored config, segmenter and (attached to Immich) triggers, under the migration lock."""
    keys = _lock_keys(conn, _MIGRATE_LOCK, settings)
    conn.execute("SELECT set_config('lock_timeout', %s, false)", [f"{settings.migration_lock_timeout_s}s"])
    try:
        conn.execute("SELECT pg_advisory_lock(%s, %s)", keys)
    except psycopg.errors.LockNotAvailable:
        raise MigrationError("another migration runner holds the lock; timed out waiting for it") from None
    finally:
        conn.execute("RESET lock_timeout")
    try:
        report.applied = _apply_migrations(conn, settings)
        _store_config(conn, settings)
        report.segmenter, report.segmenter_changed = install_segmenter(conn, settings)
        if attach_to_immich:
            report.triggers_created = _install_triggers(conn, settings)
    except psycopg.errors.LockNotAvailable:
        raise MigrationError(
            f"could not attach triggers to {settings.immich_schema}.asset_ocr within "
            f"{settings.ddl_lock_timeout_ms} ms (a long transaction holds it); retry later"
        ) from None
    except psycopg.Error as exc:
        raise MigrationError(f"migrating schema {settings.schema_name} failed: {first_line(exc)}") from exc
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s, %s)", keys)


def _sync_unless_busy(conn: psycopg.Connection[Any], settings: DbSearchSettings, report: MigrationReport) -> None:
    """Synchronise OCR documents, unless another process is already doing it."""
    sync_keys = _lock_keys(conn, _SYNC_LOCK, settings)
    got = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", sync_keys).fetchone()
    if got and got[0]:
        try:
            report.sync = sync_documents(conn, settings)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", sync_keys)
    else:
        log.info("another process is synchronising OCR documents; skipping")


def uninstall(settings: DbSearchSettings | None = None, conn: psycopg.Connection[Any] | None = None) -> None:
    """Remove everything this project created: the triggers on asset_ocr, then our schema (CASCADE).
    Immich's tables and data are untouched. (A zhparser extension created in our schema goes with it.)"""
    settings = settings or DbSearchSettings()
    own = conn is None
    if conn is None:
        conn = connect(settings)
    try:
        keys = _lock_keys(conn, _MIGRATE_LOCK, settings)
        conn.execute("SELECT pg_advisory_lock(%s, %s)", keys)
        try:
            with conn.transaction():
                exists = conn.execute(
                    "SELECT to_regprocedure(%s)", [f"{settings.schema_name}.uninstall_triggers(text)"]
                ).fetchone()
                if exists and exists[0] is not None:
                    conn.execute(
                        sql.SQL("SELECT {}.uninstall_triggers(%s)").format(sql.Identifier(settings.schema_name)),
                        [settings.immich_schema],
                    )
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(settings.schema_name)))
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", keys)
    finally:
        if own:
            conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m db.migrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-sync", action="store_true", help="do not synchronise OCR documents afterwards")
    parser.add_argument("--rebuild", action="store_true", help="rebuild every OCR document (after migrating)")
    parser.add_argument("--uninstall", action="store_true", help="drop our triggers and schema, then exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = DbSearchSettings()
    log.info("database: %s", settings.redacted_conninfo())
    try:
        if args.uninstall:
            uninstall(settings)
            return 0
        report = migrate(settings, sync=not (args.no_sync or args.rebuild))
        if args.rebuild:
            with connect(settings) as conn:
                report.sync = sync_documents(conn, settings, rebuild_all=True)
        if report.sync is not None:
            log.info("documents: %s", report.sync)
    except (MigrationError, ConnectError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
