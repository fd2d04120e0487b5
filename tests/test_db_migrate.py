"""Migrations against a real PostgreSQL with Immich 3.1's tables: idempotence, concurrency, segmenter
detection (zhparser is absent here, so the fallback), and that nothing of ours lands in Immich's schema."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import db
from db.migrate import (
    SEGMENTER_NAMES,
    ZHPARSER_TOKEN_TYPES,
    SegmenterChoice,
    SegmenterUnavailableError,
    ZhparserProbe,
    apply_segmenter,
    choose_segmenter,
    discover_migrations,
    migrate,
    probe_zhparser,
    uninstall,
)
from db.settings import DbSearchSettings
from db.testing import fresh_database, insert_asset, insert_ocr_rows, insert_user, load_immich_schema


@pytest.fixture()
def immich_db(postgres_uri: str) -> Iterator[str]:
    """A fresh database with Immich's tables and no objects of ours (one per test: these tests migrate)."""
    with fresh_database(postgres_uri) as uri:
        load_immich_schema(uri)
        yield uri


def _settings(uri: str, **overrides: Any) -> DbSearchSettings:
    return DbSearchSettings(url=uri, **overrides)


def _immich_catalogue(uri: str) -> dict[str, set[str]]:
    """Everything Immich's drift check looks at in its schema (public), plus triggers."""
    with psycopg.connect(uri) as conn:
        functions = {
            r[0]
            for r in conn.execute(
                """SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                   WHERE n.nspname = 'public'"""
            )
        }
        constraints = {
            r[0]
            for r in conn.execute(
                """SELECT c.conname FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
                   WHERE n.nspname = 'public'"""
            )
        }
        relations = {
            r[0]
            for r in conn.execute(
                """SELECT c.relname || ':' || c.relkind::text FROM pg_class c
                   JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'"""
            )
        }
        columns = {
            r[0]
            for r in conn.execute(
                """SELECT a.attrelid::regclass::text || '.' || a.attname FROM pg_attribute a
                   JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE n.nspname = 'public' AND a.attnum > 0 AND NOT a.attisdropped"""
            )
        }
        triggers = {
            r[0]
            for r in conn.execute(
                """SELECT t.tgrelid::regclass::text || ':' || t.tgname FROM pg_trigger t
                   JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                   WHERE n.nspname = 'public' AND NOT t.tgisinternal"""
            )
        }
    return {
        "functions": functions,
        "constraints": constraints,
        "relations": relations,
        "columns": columns,
        "triggers": triggers,
    }


def _versions(uri: str) -> list[tuple[int, str]]:
    with psycopg.connect(uri) as conn:
        return [(int(v), str(n)) for v, n in conn.execute("SELECT version, name FROM zh_search.schema_migrations")]


def test_migrate_touches_only_our_schema_and_asset_ocr_triggers(immich_db: str) -> None:
    before = _immich_catalogue(immich_db)
    report = migrate(_settings(immich_db))
    after = _immich_catalogue(immich_db)

    assert report.applied == [m.version for m in discover_migrations()]
    assert report.segmenter == SEGMENTER_NAMES["bigram"]
    assert report.triggers_created == 4
    for kind in ("functions", "constraints", "relations", "columns"):
        assert after[kind] == before[kind], kind  # no function/constraint/table/index/column in Immich's schema
    assert after["triggers"] - before["triggers"] == {
        "asset_ocr:zh_search_ocr_insert",
        "asset_ocr:zh_search_ocr_update",
        "asset_ocr:zh_search_ocr_delete",
        "asset_ocr:zh_search_ocr_truncate",
    }
    with psycopg.connect(immich_db) as conn:
        ours = {
            r[0]
            for r in conn.execute(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'zh_search'"
            )
        }
    assert {"ocr_document", "ocr_document_doc_idx", "stale_document", "config", "schema_migrations"} <= ours


def test_migrate_twice_is_a_no_op(immich_db: str) -> None:
    settings = _settings(immich_db)
    first = migrate(settings)
    versions = _versions(immich_db)
    catalogue = _immich_catalogue(immich_db)

    second = migrate(settings)
    assert second.applied == []
    assert second.triggers_created == 0
    assert second.segmenter_changed is False
    assert _versions(immich_db) == versions
    assert _immich_catalogue(immich_db) == catalogue
    assert first.applied and len(versions) == len(first.applied)


def test_concurrent_runners_migrate_once(immich_db: str) -> None:
    with psycopg.connect(immich_db, autocommit=True) as conn:
        owner = insert_user(conn)
        for i in range(20):
            insert_ocr_rows(conn, insert_asset(conn, owner), [f"发票 {i}"])

    settings = _settings(immich_db, backfill_batch_size=3)
    barrier = threading.Barrier(5)
    errors: list[BaseException] = []
    reports: list[Any] = []

    def run() -> None:
        try:
            barrier.wait()
            reports.append(migrate(settings))
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(reports) == 5
    assert sorted(v for r in reports for v in r.applied) == [m.version for m in discover_migrations()]
    assert sum(r.triggers_created for r in reports) == 4
    assert len(_versions(immich_db)) == len(discover_migrations())
    with psycopg.connect(immich_db) as conn:
        assert conn.execute("SELECT count(*) FROM zh_search.ocr_document").fetchone() == (20,)


def test_triggers_come_back_when_immich_drops_them(immich_db: str) -> None:
    settings = _settings(immich_db)
    migrate(settings)
    with psycopg.connect(immich_db, autocommit=True) as conn:
        conn.execute("DROP TRIGGER zh_search_ocr_insert ON asset_ocr")
    assert migrate(settings).triggers_created == 1


def test_probe_reports_no_zhparser_here(immich_db: str) -> None:
    with psycopg.connect(immich_db) as conn:
        probe = probe_zhparser(conn)
    assert probe == ZhparserProbe(parser_schema=None, extension_available=False)


@pytest.mark.parametrize(
    ("requested", "probe", "can_create", "expected"),
    [
        ("auto", ZhparserProbe(None, False), False, SegmenterChoice.BIGRAM),  # plain PostgreSQL
        ("auto", ZhparserProbe(None, True), False, SegmenterChoice.BIGRAM),  # available, no privilege
        ("auto", ZhparserProbe(None, True), True, SegmenterChoice.ZHPARSER),  # created by us
        ("auto", ZhparserProbe("zh_search", True), False, SegmenterChoice.ZHPARSER),  # image's init script
        ("bigram", ZhparserProbe("zh_search", True), True, SegmenterChoice.BIGRAM),  # forced fallback
        ("zhparser", ZhparserProbe("public", True), False, SegmenterChoice.ZHPARSER),
        ("auto", ZhparserProbe("zh_search", False), False, SegmenterChoice.BIGRAM),  # image switched back
    ],
)
def test_choose_segmenter(requested: str, probe: ZhparserProbe, can_create: bool, expected: SegmenterChoice) -> None:
    assert choose_segmenter(requested, probe, can_create_extension=can_create) is expected


@pytest.mark.parametrize(
    ("probe", "can_create"), [(ZhparserProbe(None, False), False), (ZhparserProbe(None, True), False)]
)
def test_required_zhparser_missing_raises(probe: ZhparserProbe, can_create: bool) -> None:
    with pytest.raises(SegmenterUnavailableError):
        choose_segmenter("zhparser", probe, can_create_extension=can_create)


def test_required_zhparser_on_plain_postgres_fails_cleanly(immich_db: str) -> None:
    with pytest.raises(SegmenterUnavailableError, match="not installed"):
        migrate(_settings(immich_db, segmenter="zhparser"))
    # the failure happened after the migrations: a later auto run still works
    assert migrate(_settings(immich_db)).segmenter == SEGMENTER_NAMES["bigram"]


def test_outdated_documents_are_rebuilt(immich_db: str) -> None:
    settings = _settings(immich_db)
    with psycopg.connect(immich_db, autocommit=True) as conn:
        asset = insert_asset(conn, insert_user(conn))
        insert_ocr_rows(conn, asset, ["北京"])
    migrate(settings)
    with psycopg.connect(immich_db, autocommit=True) as conn:
        # what a switch of segmenter leaves behind: documents built by another one
        conn.execute("UPDATE zh_search.ocr_document SET segmenter = 'zhparser-1', doc = ''")
    report = migrate(settings)
    assert report.sync.refreshed == 1
    with psycopg.connect(immich_db) as conn:
        row = conn.execute("SELECT segmenter, doc::text FROM zh_search.ocr_document").fetchone()
    assert row == ("bigram-1", "'京':1 '北京':1")


def test_segmenter_switch_rebuilds_documents(immich_db: str) -> None:
    """The zhparser path without zhparser: segmenter_zhparser.sql is installed over a stand-in text-search
    configuration of the same name (a copy of 'simple', which splits at spaces and punctuation only), so
    the mode switch, the generic document / query builders and the rebuild are exercised for real."""
    from db.connection import connect_async
    from db.search import SearchContext, build_queries, search_ocr

    settings = _settings(immich_db)
    with psycopg.connect(immich_db, autocommit=True) as conn:
        owner = insert_user(conn)
        asset = insert_asset(conn, owner)
        insert_ocr_rows(conn, asset, ["Starbucks Coffee 北京", "No.12345"])
    migrate(settings)
    with psycopg.connect(immich_db, autocommit=True) as conn:
        conn.execute("CREATE TEXT SEARCH CONFIGURATION zh_search.zh_cn_ocr (COPY = simple)")
        name, changed = apply_segmenter(conn, settings, SegmenterChoice.ZHPARSER)
        assert (name, changed) == (SEGMENTER_NAMES["zhparser"], True)

    report = migrate(_settings(immich_db, segmenter="bigram"), sync=False)  # back to the fallback...
    assert report.segmenter_changed
    with psycopg.connect(immich_db, autocommit=True) as conn:
        apply_segmenter(conn, settings, SegmenterChoice.ZHPARSER)  # ...and to the stand-in again
        from db.sync import sync_documents

        assert sync_documents(conn, settings).refreshed == 1  # built by another segmenter: rebuilt
        row = conn.execute("SELECT segmenter, doc::text FROM zh_search.ocr_document").fetchone()
        assert row is not None and row[0] == "zhparser-1"
        assert "'starbucks'" in row[1] and "'北京'" in row[1]

    async def search_with_stand_in() -> None:
        async with await connect_async(settings) as aconn:
            ctx = await SearchContext.load(aconn, settings)
            assert ctx.segmenter == "zhparser-1"
            # zhparser mode joins the words of a term with & (segmentation of a short query may differ)
            assert (await build_queries(aconn, ctx, "coffee starbucks"))[0] == "'coffee':* & 'starbucks':*"
            hits = await search_ocr(aconn, context=ctx, user_ids=[owner], query_text="Starbucks 北京")
            assert [h.asset_id for h in hits.items] == [asset]

    asyncio.run(search_with_stand_in())

    # auto on a server without zhparser goes back to the fallback and rebuilds
    report = migrate(settings)
    assert report.segmenter == SEGMENTER_NAMES["bigram"] and report.segmenter_changed
    assert report.sync.refreshed == 1


def test_init_script_matches_migration_token_types() -> None:
    init = (Path(__file__).resolve().parents[1] / "postgres-zhparser" / "initdb" / "10-zhparser.sql").read_text()
    match = re.search(r"ADD MAPPING FOR ([a-z, ]+) WITH simple", init)
    assert match is not None
    assert tuple(t.strip() for t in match.group(1).split(",")) == ZHPARSER_TOKEN_TYPES
    assert "zh_search.zh_cn_ocr" in init  # the default schema_name / text_search_config
    assert DbSearchSettings.model_fields["schema_name"].default == "zh_search"
    assert DbSearchSettings.model_fields["text_search_config"].default == "zh_cn_ocr"


def test_uninstall_leaves_immich_intact(immich_db: str) -> None:
    before = _immich_catalogue(immich_db)
    settings = _settings(immich_db)
    migrate(settings)
    uninstall(settings)
    assert _immich_catalogue(immich_db) == before
    with psycopg.connect(immich_db) as conn:
        assert conn.execute("SELECT to_regnamespace('zh_search')").fetchone() == (None,)
    assert migrate(settings).applied  # and it can be installed again


def test_custom_schema_name(immich_db: str) -> None:
    settings = _settings(immich_db, schema_name="zh_other")
    report = migrate(settings)
    assert report.triggers_created == 4
    with psycopg.connect(immich_db) as conn:
        names = {r[0] for r in conn.execute("SELECT tgname FROM pg_trigger WHERE tgrelid = 'asset_ocr'::regclass")}
        assert "zh_other_ocr_insert" in names
        # Every migration file is recorded once, in the custom schema.
        migrations = len(list((Path(db.__file__).parent / "migrations").glob("*.sql")))
        assert conn.execute("SELECT count(*) FROM zh_other.schema_migrations").fetchone() == (migrations,)


def test_settings_from_environment_and_redaction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_SEARCH_URL", "postgresql://immich:s3cret@db:5432/immich")
    monkeypatch.setenv("DB_SEARCH_CLIP_CANDIDATES", "123")
    monkeypatch.setenv("DB_SEARCH_FUSION", "weighted")
    settings = DbSearchSettings()
    assert settings.clip_candidates == 123
    assert settings.fusion == "weighted"
    assert "s3cret" in settings.conninfo()
    assert "s3cret" not in settings.redacted_conninfo()
    assert "s3cret" not in repr(settings)
    with pytest.raises(ValueError):
        DbSearchSettings(schema_name='bad"name')
    with pytest.raises(ValueError):
        DbSearchSettings(clip_weight=0, ocr_weight=0)


def test_settings_fall_back_to_immich_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DB_SEARCH_URL", raising=False)
    for key, value in {
        "DB_HOSTNAME": "database",
        "DB_PORT": "5433",
        "DB_USERNAME": "immich",
        "DB_PASSWORD": "pw'with space",
        "DB_DATABASE_NAME": "photos",
    }.items():
        monkeypatch.setenv(key, value)
    info = psycopg.conninfo.conninfo_to_dict(DbSearchSettings().conninfo())
    assert info["host"] == "database" and info["port"] == "5433" and info["dbname"] == "photos"
    assert info["password"] == "pw'with space"
