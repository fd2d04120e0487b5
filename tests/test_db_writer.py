"""db.immich_writer: regenerate writes into Immich's tables, exactly one asset's rows, as Immich writes them."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime
from uuid import UUID, uuid4

import psycopg
import pytest

from db.immich_writer import (
    AssetNotFoundError,
    OcrLine,
    embedding_dimension,
    write_clip_embedding,
    write_ocr_result,
)
from db.migrate import migrate
from db.settings import DbSearchSettings
from db.testing import fresh_database, insert_asset, insert_embedding, insert_ocr_rows, insert_user, load_immich_schema

BOX = (0.1, 0.2, 0.5, 0.2, 0.5, 0.3, 0.1, 0.3)


@pytest.fixture(scope="module")
def db(postgres_uri: str) -> Iterator[str]:
    with fresh_database(postgres_uri) as uri:
        load_immich_schema(uri)
        migrate(DbSearchSettings(url=uri))
        yield uri


@pytest.fixture()
def settings(db: str) -> DbSearchSettings:
    return DbSearchSettings(url=db)


@pytest.fixture()
def conn(db: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(db, autocommit=True) as c:
        yield c


def _snapshot(conn: psycopg.Connection, asset: UUID) -> dict[str, object]:
    """Every row of an asset in the tables a regenerate may touch (incl. ids and updateIds)."""
    return {
        "ocr": conn.execute(
            'SELECT id, x1, y1, x2, y2, x3, y3, x4, y4, "boxScore", "textScore", text, "isVisible", "updateId" '
            'FROM asset_ocr WHERE "assetId" = %s ORDER BY id',
            [asset],
        ).fetchall(),
        "search": conn.execute('SELECT text FROM ocr_search WHERE "assetId" = %s', [asset]).fetchall(),
        "status": conn.execute('SELECT * FROM asset_job_status WHERE "assetId" = %s', [asset]).fetchall(),
        "clip": conn.execute('SELECT embedding::text FROM smart_search WHERE "assetId" = %s', [asset]).fetchall(),
        "doc": conn.execute("SELECT content FROM zh_search.ocr_document WHERE asset_id = %s", [asset]).fetchall(),
    }


@pytest.fixture()
def two_assets(conn: psycopg.Connection) -> tuple[UUID, UUID]:
    owner = insert_user(conn)
    target, other = insert_asset(conn, owner), insert_asset(conn, owner)
    # the neighbour has everything Immich would have written for it
    insert_ocr_rows(conn, other, ["邻居的文字"])
    conn.execute("""INSERT INTO ocr_search ("assetId", text) VALUES (%s, '邻居 居的 的文 文字')""", [other])
    conn.execute("""INSERT INTO asset_job_status ("assetId", "ocrAt") VALUES (%s, '2024-01-01T00:00:00Z')""", [other])
    insert_embedding(conn, other, [1.0] + [0.0] * 511)
    return target, other


def test_write_ocr_like_immich(
    conn: psycopg.Connection, settings: DbSearchSettings, two_assets: tuple[UUID, UUID]
) -> None:
    target, other = two_assets
    neighbour = _snapshot(conn, other)
    when = datetime(2026, 8, 1, 12, 0, tzinfo=UTC)
    lines = [
        OcrLine("增值税专用发票", BOX, 0.91, 0.97),
        OcrLine("No.12345 金额：100元", (0.1, 0.4, 0.6, 0.4, 0.6, 0.5, 0.1, 0.5), 0.88, 0.93),
    ]
    write_ocr_result(conn, target, lines, settings=settings, now=when)

    rows = conn.execute(
        'SELECT x1, y1, x2, y2, x3, y3, x4, y4, "boxScore", "textScore", text, "isVisible" '
        'FROM asset_ocr WHERE "assetId" = %s ORDER BY y1',
        [target],
    ).fetchall()
    assert [r[10] for r in rows] == ["增值税专用发票", "No.12345 金额：100元"]
    assert rows[0][:8] == pytest.approx(BOX)
    assert rows[0][8:10] == pytest.approx((0.91, 0.97))
    assert all(r[11] is True for r in rows)  # isVisible left to its default
    search = conn.execute('SELECT text FROM ocr_search WHERE "assetId" = %s', [target]).fetchone()
    assert search == ("增值 值税 税专 专用 用发 发票 No.12345 金额 ：100 元",)
    assert conn.execute('SELECT "ocrAt" FROM asset_job_status WHERE "assetId" = %s', [target]).fetchone() == (when,)
    # Immich's own OCR search predicate finds it through the text we wrote
    hit = conn.execute(
        """SELECT f_unaccent(text) %%>> f_unaccent('发票') FROM ocr_search WHERE "assetId" = %s""", [target]
    ).fetchone()
    assert hit == (True,)
    # our document followed through the trigger, inside the same transaction
    assert _snapshot(conn, target)["doc"] == [("增值税专用发票\nNo.12345 金额：100元",)]
    assert _snapshot(conn, other) == neighbour


def test_rewrite_replaces_and_empty_result_deletes(
    conn: psycopg.Connection, settings: DbSearchSettings, two_assets: tuple[UUID, UUID]
) -> None:
    target, other = two_assets
    neighbour = _snapshot(conn, other)
    write_ocr_result(conn, target, [OcrLine("旧", BOX, 0.9, 0.9), OcrLine("old", BOX, 0.9, 0.9)], settings=settings)
    first_ids = {r[0] for r in conn.execute('SELECT id FROM asset_ocr WHERE "assetId" = %s', [target])}

    write_ocr_result(conn, target, [OcrLine("新的", BOX, 0.9, 0.9)], settings=settings)
    rows = conn.execute('SELECT id, text FROM asset_ocr WHERE "assetId" = %s', [target]).fetchall()
    assert [r[1] for r in rows] == ["新的"] and not first_ids & {r[0] for r in rows}  # deleted + inserted
    assert conn.execute('SELECT text FROM ocr_search WHERE "assetId" = %s', [target]).fetchone() == ("新的",)
    # Immich's audit of deleted OCR rows (mobile sync) saw the two old rows go
    audited = conn.execute('SELECT count(*) FROM asset_ocr_audit WHERE "assetId" = %s', [target]).fetchone()
    assert audited == (2,)

    before = conn.execute('SELECT "ocrAt" FROM asset_job_status WHERE "assetId" = %s', [target]).fetchone()
    write_ocr_result(conn, target, [], settings=settings)
    assert conn.execute('SELECT count(*) FROM asset_ocr WHERE "assetId" = %s', [target]).fetchone() == (0,)
    assert conn.execute('SELECT count(*) FROM ocr_search WHERE "assetId" = %s', [target]).fetchone() == (0,)
    after = conn.execute('SELECT "ocrAt" FROM asset_job_status WHERE "assetId" = %s', [target]).fetchone()
    assert before and after and after[0] >= before[0]  # ocrAt is set even when nothing was found
    assert _snapshot(conn, target)["doc"] == []
    assert _snapshot(conn, other) == neighbour


def test_write_is_atomic(conn: psycopg.Connection, settings: DbSearchSettings, two_assets: tuple[UUID, UUID]) -> None:
    target, _ = two_assets
    write_ocr_result(conn, target, [OcrLine("保留", BOX, 0.9, 0.9)], settings=settings)
    before = _snapshot(conn, target)
    with pytest.raises(ValueError):
        write_ocr_result(conn, target, [OcrLine("ok", BOX, 0.9, 0.9), OcrLine("bad", BOX, math.nan, 0.9)])
    assert _snapshot(conn, target) == before


def test_write_clip(conn: psycopg.Connection, settings: DbSearchSettings, two_assets: tuple[UUID, UUID]) -> None:
    target, other = two_assets
    neighbour = _snapshot(conn, other)
    assert embedding_dimension(conn, settings) == 512
    vector = [0.0] * 512
    vector[3] = 1.0
    write_clip_embedding(conn, target, vector, settings=settings)
    write_clip_embedding(conn, target, [v * 0.5 for v in vector], settings=settings)  # upsert
    rows = conn.execute('SELECT embedding::real[] FROM smart_search WHERE "assetId" = %s', [target]).fetchall()
    assert len(rows) == 1 and rows[0][0][3] == pytest.approx(0.5)
    # no job-status column exists for CLIP: nothing else is written
    assert conn.execute('SELECT count(*) FROM asset_job_status WHERE "assetId" = %s', [target]).fetchone() == (0,)
    assert _snapshot(conn, other) == neighbour

    with pytest.raises(ValueError, match="dimensions"):
        write_clip_embedding(conn, target, [1.0] * 768, settings=settings)
    with pytest.raises(ValueError, match="finite"):
        write_clip_embedding(conn, target, [math.inf] * 512, settings=settings)
    assert conn.execute('SELECT embedding::real[] FROM smart_search WHERE "assetId" = %s', [target]).fetchall() == rows


def test_unknown_asset(conn: psycopg.Connection, settings: DbSearchSettings) -> None:
    missing = uuid4()
    with pytest.raises(AssetNotFoundError):
        write_ocr_result(conn, missing, [OcrLine("x", BOX, 0.9, 0.9)], settings=settings)
    with pytest.raises(AssetNotFoundError):
        write_clip_embedding(conn, missing, [0.1] * 512, settings=settings)
    assert conn.execute('SELECT count(*) FROM asset_job_status WHERE "assetId" = %s', [missing]).fetchone() == (0,)


def test_nul_and_lone_surrogates_in_ocr_text(
    conn: psycopg.Connection, settings: DbSearchSettings, two_assets: tuple[UUID, UUID]
) -> None:
    target, _ = two_assets
    write_ocr_result(conn, target, [OcrLine("发\x00票\ud800", BOX, 0.9, 0.9)], settings=settings)
    assert conn.execute('SELECT text FROM asset_ocr WHERE "assetId" = %s', [target]).fetchone() == ("发票",)
    assert conn.execute('SELECT text FROM ocr_search WHERE "assetId" = %s', [target]).fetchone() == ("发票",)
