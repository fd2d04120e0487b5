"""The search front's edges: switched off without GATEWAY_IMMICH__URL, and a database that is down or not
migrated yet. In every case the ML endpoints keep answering, hybrid searches fall back to Immich, and nothing
secret (the database password) reaches a log line or a reply."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import httpx
import orjson
import psycopg
import pytest

from db.migrate import migrate
from db.settings import DbSearchSettings
from db.testing import fresh_database, insert_asset, insert_ocr_rows, insert_user, load_immich_schema
from tests.gateway_support import gateway_process, immich_predict
from tests.immich_stub import CANNED_SMART_SEARCH, ImmichStub, StubUser, search_gateway_env, wait_search_ready
from tests.servers import free_port

SMART = "/api/search/smart"
MODE = "x-immich-zh-ai-search"
PASSWORD = "pw-must-never-show-0123"


@pytest.fixture(scope="module")
def immich(postgres_uri: str) -> Iterator[tuple[ImmichStub, StubUser, str, UUID]]:
    """The stub over an Immich database that is NOT migrated for search yet."""
    with fresh_database(postgres_uri) as uri:
        load_immich_schema(uri)
        stub = ImmichStub(uri)
        with psycopg.connect(uri, autocommit=True) as conn:
            user = stub.add_user(StubUser(insert_user(conn, name="a")))
            asset = insert_asset(conn, user.id, exif={})
            insert_ocr_rows(conn, asset, ["我爱北京天安门"])
        with stub.running():
            yield stub, user, uri, asset


def test_feature_off_without_immich_url(
    immich: tuple[ImmichStub, StubUser, str, UUID], clip_model_dir: Path, tmp_path: Path
) -> None:
    stub, user, uri, _ = immich
    env = search_gateway_env(None, uri, clip_model_dir)
    with gateway_process(env, tmp_path / "gw.log") as gw, httpx.Client(timeout=30) as client:
        assert client.post(gw.base + SMART, json={"query": "ocr:北京"}, headers=user.cookie).status_code == 404
        assert client.post(gw.base + "/ai/assets/x/ocr", headers=user.cookie).status_code == 404
        assert client.get(gw.base + "/status").json()["search"] == {"enabled": False}
        assert client.get(gw.base + "/ping").text == "pong"
    assert not stub.recorded(SMART)


def test_database_down_keeps_ml_working_and_hands_search_to_immich(
    immich: tuple[ImmichStub, StubUser, str, UUID], clip_model_dir: Path, tmp_path: Path
) -> None:
    stub, user, _, asset = immich
    dead = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{free_port()}/immich"
    env = search_gateway_env(stub.url, dead, clip_model_dir)
    with gateway_process(env, tmp_path / "gw.log") as gw, httpx.Client(timeout=60) as client:
        # /predict does not wait for the database
        reply = immich_predict(
            client, gw.base, {"clip": {"textual": {"modelName": "ViT-B-32__openai", "options": {}}}}, text="发票"
        )
        assert reply.status_code == 200
        status = client.get(gw.base + "/status").json()["search"]
        assert status["enabled"] is True and status["database_ready"] is False and status["database_error"]
        # ocr: cannot be answered by Immich: a clear 503 in Immich's error shape
        ocr = client.post(gw.base + SMART, json={"query": "ocr:北京"}, headers=user.cookie)
        assert ocr.status_code == 503 and ocr.json()["statusCode"] == 503
        # a plain query is Immich's own smart search meanwhile
        body = b'{"query":"dog","page":1}'
        hybrid = client.post(gw.base + SMART, content=body, headers=user.cookie)
        assert hybrid.status_code == 200 and hybrid.json() == CANNED_SMART_SEARCH and hybrid.headers[MODE] == "immich"
        assert stub.recorded(SMART)[-1].body == body
        # regenerate needs the database to read Immich's settings and write: 503, with a reason
        regen = client.post(f"{gw.base}/ai/assets/{asset}/ocr", headers=user.cookie)
        assert regen.status_code == 503 and regen.json()["detail"]
        for text in (status["database_error"], ocr.text, regen.text):
            assert PASSWORD not in text
    log = gw.log_text()
    assert "search database unavailable" in log
    assert PASSWORD not in log and user.session_token not in log


def test_search_comes_up_once_the_schema_is_migrated(
    immich: tuple[ImmichStub, StubUser, str, UUID], clip_model_dir: Path, tmp_path: Path
) -> None:
    stub, user, uri, _ = immich
    env = search_gateway_env(stub.url, uri, clip_model_dir, DB_SEARCH_MIGRATE="false")
    with gateway_process(env, tmp_path / "gw.log") as gw, httpx.Client(timeout=60) as client:
        assert client.get(gw.base + "/status").json()["search"]["database_ready"] is False
        before = client.post(gw.base + SMART, json={"query": "ocr:北京"}, headers=user.cookie)
        assert before.status_code == 503
        migrate(DbSearchSettings(url=uri))  # another process (or an operator) migrates
        wait_search_ready(gw.base, timeout_s=30)
        after = client.post(gw.base + SMART, json={"query": "ocr:北京"}, headers=user.cookie)
        assert after.status_code == 200 and after.headers[MODE] == "ocr"
        assert len(orjson.loads(after.content)["assets"]["items"]) == 1
