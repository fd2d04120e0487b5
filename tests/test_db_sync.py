"""Our OCR documents follow Immich's asset_ocr rows: triggers on every kind of write Immich does, the
backfill of rows that predate us, the failure path, and the per-asset serialisation."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from uuid import UUID

import psycopg
import pytest

from db.migrate import migrate
from db.settings import DbSearchSettings
from db.sync import sync_documents
from db.testing import fresh_database, insert_asset, insert_ocr_rows, insert_user, load_immich_schema


@pytest.fixture(scope="module")
def db(postgres_uri: str) -> Iterator[str]:
    with fresh_database(postgres_uri) as uri:
        load_immich_schema(uri)
        migrate(DbSearchSettings(url=uri))
        yield uri


@pytest.fixture()
def conn(db: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db, autocommit=True) as c:
        yield c


@pytest.fixture()
def owner(conn: psycopg.Connection) -> UUID:
    return insert_user(conn)


def _doc(conn: psycopg.Connection, asset: UUID) -> tuple[str, str, int] | None:
    row = conn.execute(
        "SELECT doc::text, content, line_count FROM zh_search.ocr_document WHERE asset_id = %s", [asset]
    ).fetchone()
    return None if row is None else (row[0], row[1], row[2])


def _matches(conn: psycopg.Connection, asset: UUID, query: str) -> bool:
    conn.execute("SET search_path = zh_search, public")
    row = conn.execute(
        """SELECT d.doc @@ q.strict_query FROM zh_search.ocr_document d,
                  zh_search.build_queries(%s, 32, 3, 3, 12) q WHERE d.asset_id = %s""",
        [query, asset],
    ).fetchone()
    return bool(row and row[0])


def test_insert_update_hide_delete(conn: psycopg.Connection, owner: UUID) -> None:
    asset = insert_asset(conn, owner)
    insert_ocr_rows(conn, asset, ["增值税专用发票", "No.12345"])
    doc = _doc(conn, asset)
    assert doc is not None and doc[1] == "增值税专用发票\nNo.12345" and doc[2] == 2
    assert _matches(conn, asset, "发票") and _matches(conn, asset, "12345")

    conn.execute("""UPDATE asset_ocr SET text = '我爱北京天安门' WHERE "assetId" = %s AND text = 'No.12345'""", [asset])
    assert _matches(conn, asset, "北京") and not _matches(conn, asset, "12345")

    # an edit crop hides a line (Immich flips isVisible): its text leaves the document
    conn.execute("""UPDATE asset_ocr SET "isVisible" = false WHERE "assetId" = %s AND text LIKE '增%%'""", [asset])
    assert not _matches(conn, asset, "发票") and _matches(conn, asset, "北京")

    conn.execute("""DELETE FROM asset_ocr WHERE "assetId" = %s AND "isVisible" """, [asset])
    assert _doc(conn, asset) is None  # only a hidden line is left


def test_immich_style_rewrite_in_one_statement(conn: psycopg.Connection, owner: UUID) -> None:
    asset = insert_asset(conn, owner)
    insert_ocr_rows(conn, asset, ["旧的文字 old text"])
    # OcrRepository.upsert: delete + insert (+ ocr_search) as data-modifying CTEs of ONE statement
    conn.execute(
        """
        WITH deleted_ocr AS (DELETE FROM asset_ocr WHERE "assetId" = %(id)s),
             inserted_ocr AS (INSERT INTO asset_ocr ("assetId", x1, y1, x2, y2, x3, y3, x4, y4, text,
                                                     "boxScore", "textScore")
                              VALUES (%(id)s, 0, 0, 1, 0, 1, 1, 0, 1, '新的文字 new words', 0.9, 0.9)),
             inserted_search AS (INSERT INTO ocr_search ("assetId", text) VALUES (%(id)s, '新的 的文 文字 new words')
                                 ON CONFLICT ("assetId") DO UPDATE SET text = excluded.text)
        SELECT 1 AS dummy
        """,
        {"id": asset},
    )
    doc = _doc(conn, asset)
    assert doc is not None and doc[1] == "新的文字 new words"
    assert _matches(conn, asset, "文字") and not _matches(conn, asset, "old")
    # Immich's own delete audit still works next to our triggers
    assert conn.execute('SELECT count(*) FROM asset_ocr_audit WHERE "assetId" = %s', [asset]).fetchone() == (1,)


def test_asset_delete_cascades(conn: psycopg.Connection, owner: UUID) -> None:
    asset = insert_asset(conn, owner)
    insert_ocr_rows(conn, asset, ["停车场"])
    assert _doc(conn, asset) is not None
    conn.execute("DELETE FROM asset WHERE id = %s", [asset])
    assert _doc(conn, asset) is None


def test_lines_never_form_a_phrase_across_lines(conn: psycopg.Connection, owner: UUID) -> None:
    split = insert_asset(conn, owner)
    insert_ocr_rows(conn, split, ["北京", "天安门"])
    joined = insert_asset(conn, owner)
    insert_ocr_rows(conn, joined, ["北京天安门"])
    assert not _matches(conn, split, "京天")
    assert _matches(conn, joined, "京天")
    assert _matches(conn, split, "北京 天安门")  # two terms: each on its own line is fine


def test_document_size_is_bounded(conn: psycopg.Connection, owner: UUID) -> None:
    conn.execute("UPDATE zh_search.config SET value = '150' WHERE key = 'max_document_chars'")
    try:
        asset = insert_asset(conn, owner)
        insert_ocr_rows(conn, asset, ["前" * 100, "后" * 100, "never"])
        doc = _doc(conn, asset)
        assert doc is not None
        assert len(doc[1].replace("\n", "")) == 150
        assert not _matches(conn, asset, "never")
    finally:
        conn.execute("UPDATE zh_search.config SET value = '20000' WHERE key = 'max_document_chars'")


def test_backfill_of_rows_that_predate_the_triggers(postgres_uri: str) -> None:
    with fresh_database(postgres_uri) as uri:
        load_immich_schema(uri)
        with psycopg.connect(uri, autocommit=True) as conn:
            owner = insert_user(conn)
            assets = [insert_asset(conn, owner) for _ in range(7)]
            for i, asset in enumerate(assets):
                insert_ocr_rows(conn, asset, [f"第{i}页", f"page {i}"])
            hidden_only = insert_asset(conn, owner)
            insert_ocr_rows(conn, hidden_only, ["隐藏"], visible=False)
        report = migrate(DbSearchSettings(url=uri, backfill_batch_size=2))
        assert report.sync.refreshed == 7
        assert report.sync.batches == 4
        with psycopg.connect(uri, autocommit=True) as conn:
            for i, asset in enumerate(assets):
                doc = _doc(conn, asset)
                assert doc is not None and doc[1] == f"第{i}页\npage {i}"
            assert _doc(conn, hidden_only) is None
            # an orphan (a delete we never saw) is removed by the next sync
            conn.execute(
                "INSERT INTO zh_search.ocr_document (asset_id, doc, content, line_count, segmenter) "
                "VALUES (gen_random_uuid(), '', '', 0, 'bigram-1')"
            )
            stats = sync_documents(conn, DbSearchSettings(url=uri))
            assert stats.orphans_deleted == 1 and stats.refreshed == 0


def test_trigger_failure_never_fails_immich(conn: psycopg.Connection, owner: UUID, db: str) -> None:
    # Break document building on purpose (a config value that is not a number makes refresh_documents raise).
    conn.execute("UPDATE zh_search.config SET value = 'broken' WHERE key = 'max_document_chars'")
    asset = insert_asset(conn, owner)
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
    insert_ocr_rows(conn, asset, ["故障 recovery"])  # Immich's write succeeds
    assert conn.execute('SELECT count(*) FROM asset_ocr WHERE "assetId" = %s', [asset]).fetchone() == (1,)
    assert any("OCR document refresh failed" in n for n in notices)
    assert _doc(conn, asset) is None
    assert conn.execute("SELECT count(*) FROM zh_search.stale_document WHERE asset_id = %s", [asset]).fetchone() == (1,)

    # start-up housekeeping repairs the configuration and rebuilds what was queued
    report = migrate(DbSearchSettings(url=db))
    assert report.sync.stale_fixed >= 1
    assert _matches(conn, asset, "故障")
    assert conn.execute("SELECT count(*) FROM zh_search.stale_document").fetchone() == (0,)


def test_truncate_clears_documents(postgres_uri: str) -> None:
    with fresh_database(postgres_uri) as uri:
        load_immich_schema(uri)
        migrate(DbSearchSettings(url=uri))
        with psycopg.connect(uri, autocommit=True) as conn:
            owner = insert_user(conn)
            insert_ocr_rows(conn, insert_asset(conn, owner), ["一"])
            insert_ocr_rows(conn, insert_asset(conn, owner), ["二"])
            assert conn.execute("SELECT count(*) FROM zh_search.ocr_document").fetchone() == (2,)
            conn.execute("TRUNCATE asset_ocr")  # Immich's "OCR: queue all (force)"
            assert conn.execute("SELECT count(*) FROM zh_search.ocr_document").fetchone() == (0,)


def test_refresh_serialises_with_immich_writes(db: str, owner: UUID) -> None:
    """A document rebuild holding an asset's lock makes Immich's write of that asset wait, and the
    document then reflects Immich's rows, not the rebuild's older snapshot."""
    with psycopg.connect(db, autocommit=True) as setup:
        asset = insert_asset(setup, owner)
        insert_ocr_rows(setup, asset, ["旧版本"])

    with psycopg.connect(db) as rebuild:  # a backfill batch, left open
        rebuild.execute("SELECT zh_search.refresh_documents(%s::uuid[])", [[asset]])

        done = threading.Event()

        def immich_write() -> None:
            with psycopg.connect(db, autocommit=True) as immich:
                immich.execute(
                    """
                    WITH d AS (DELETE FROM asset_ocr WHERE "assetId" = %(id)s)
                    INSERT INTO asset_ocr ("assetId", x1, y1, x2, y2, x3, y3, x4, y4, text, "boxScore", "textScore")
                    VALUES (%(id)s, 0, 0, 1, 0, 1, 1, 0, 1, '新版本', 0.9, 0.9)
                    """,
                    {"id": asset},
                )
            done.set()

        writer = threading.Thread(target=immich_write)
        writer.start()
        time.sleep(0.5)
        assert not done.is_set()  # blocked behind the rebuild's advisory lock
        rebuild.commit()
        writer.join(10)
        assert done.is_set()

    with psycopg.connect(db) as check:
        row = check.execute("SELECT content FROM zh_search.ocr_document WHERE asset_id = %s", [asset]).fetchone()
    assert row == ("新版本",)
