"""Regenerate one photo's OCR or CLIP data: ``POST /ai/assets/{id}/{ocr,clip}`` and ``python -m gateway regenerate``.

Real gateway process (its in-process models: RapidOCR's bundled OCR, the tiny 512-d CLIP test model), the
Immich stub serving rendered CJK text as previews, and a real PostgreSQL with Immich 3.1's tables plus a stored
Immich config. Checked: the rows written are exactly Immich's (asset_ocr, ocr_search tokenised like Immich,
ocrAt; smart_search), only the one asset changes, refusals write nothing, and the CLI does the same.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import httpx
import numpy as np
import orjson
import psycopg
import pytest

from db.immich_writer import tokenize_for_search
from db.migrate import migrate
from db.settings import DbSearchSettings
from db.testing import (
    add_partner,
    fresh_database,
    insert_asset,
    insert_embedding,
    insert_ocr_rows,
    insert_user,
    load_immich_schema,
)
from tests.gateway_support import immich_predict
from tests.immich_stub import (
    FONT,
    ImmichStub,
    StubUser,
    create_system_metadata,
    render_text_jpeg,
    search_gateway,
    search_gateway_env,
)
from tests.servers import REPO

pytestmark = pytest.mark.skipif(not FONT.is_file(), reason=f"CJK font {FONT} not installed (fonts-wqy-zenhei)")

# Immich's stored config: only non-default values, as Immich writes it. The CLIP name takes the gateway's
# 'cn-clip/' route (to the 512-d test model); the OCR recognition threshold is lowered from 0.8.
IMMICH_CONFIG = {
    "machineLearning": {"clip": {"modelName": "cn-clip/ViT-B-16__openai"}, "ocr": {"minRecognitionScore": 0.7}}
}
CLIP_MODEL = "cn-clip/ViT-B-16__openai"


@dataclass
class World:
    uri: str
    stub: ImmichStub
    users: dict[str, StubUser] = field(default_factory=dict)
    ids: dict[str, UUID] = field(default_factory=dict)


@pytest.fixture(scope="module")
def world(postgres_uri: str) -> Iterator[World]:
    with fresh_database(postgres_uri) as uri:
        load_immich_schema(uri)
        migrate(DbSearchSettings(url=uri))
        stub = ImmichStub(uri)
        w = World(uri, stub)
        with psycopg.connect(uri, autocommit=True) as conn:
            create_system_metadata(conn, IMMICH_CONFIG)
            for name in ("a", "b", "c"):
                w.users[name] = stub.add_user(StubUser(insert_user(conn, name=name), email=f"{name}@example.test"))
            a, b, c = (w.users[n].id for n in "abc")
            add_partner(conn, c, a, in_timeline=True)  # a may see c's photos, but they stay c's
            for name, owner, kw in (
                ("invoice", a, {}),
                ("blank", a, {}),
                ("photo", a, {}),
                ("neighbour", a, {}),
                ("no_preview", a, {}),
                ("motion_part", a, {"visibility": "hidden", "asset_type": "VIDEO"}),
                ("strangers", b, {}),
                ("partners", c, {}),
            ):
                w.ids[name] = insert_asset(conn, owner, exif={}, **kw)
            # the neighbour has everything Immich's jobs would have written for it
            insert_ocr_rows(conn, w.ids["neighbour"], ["邻居的文字"])
            conn.execute(
                """INSERT INTO ocr_search ("assetId", text) VALUES (%s, '邻居 居的 的文 文字')""", [w.ids["neighbour"]]
            )
            conn.execute(
                """INSERT INTO asset_job_status ("assetId", "ocrAt") VALUES (%s, '2024-01-01T00:00:00Z')""",
                [w.ids["neighbour"]],
            )
            insert_embedding(conn, w.ids["neighbour"], [1.0] + [0.0] * 511)
            # stale OCR on the blank photo: a regenerate that finds nothing must remove it
            insert_ocr_rows(conn, w.ids["blank"], ["旧的文字"])
            conn.execute("""INSERT INTO ocr_search ("assetId", text) VALUES (%s, '旧的 的文 文字')""", [w.ids["blank"]])
        stub.previews[w.ids["invoice"]] = render_text_jpeg(["增值税专用发票", "No.12345"])
        stub.previews[w.ids["blank"]] = render_text_jpeg([])
        stub.previews[w.ids["photo"]] = render_text_jpeg(["海边的狗"], font_px=96)
        for name in ("neighbour", "motion_part", "strangers", "partners"):
            stub.previews[w.ids[name]] = render_text_jpeg(["不应读取"])
        with stub.running():
            yield w


def gateway_env(world: World, model_dir: Path) -> dict[str, str]:
    return search_gateway_env(world.stub.url, world.uri, model_dir)


@pytest.fixture(scope="module")
def gateway(world: World, clip_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("gw") / "gateway.log"
    # nothing secret ever reaches the log: no API key, session token or cookie of any user
    secrets_ = [s for u in world.users.values() for s in (u.api_key, u.session_token, u.elevated_token)]
    with search_gateway(gateway_env(world, clip_model_dir), log, secrets_) as base:
        yield base


@pytest.fixture()
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=120) as c:
        yield c


@pytest.fixture()
def conn(world: World) -> Iterator[psycopg.Connection]:
    with psycopg.connect(world.uri, autocommit=True) as c:
        yield c


def snapshot(conn: psycopg.Connection, asset: UUID) -> dict[str, Any]:
    """Every row of one asset in the tables a regenerate may touch (ids and updateIds included)."""
    return {
        "ocr": conn.execute(
            'SELECT id, x1, y1, x2, y2, x3, y3, x4, y4, "boxScore", "textScore", text, "isVisible", "updateId" '
            'FROM asset_ocr WHERE "assetId" = %s ORDER BY id',
            [asset],
        ).fetchall(),
        "search": conn.execute('SELECT text FROM ocr_search WHERE "assetId" = %s', [asset]).fetchall(),
        "status": conn.execute('SELECT * FROM asset_job_status WHERE "assetId" = %s', [asset]).fetchall(),
        "clip": conn.execute('SELECT embedding::text FROM smart_search WHERE "assetId" = %s', [asset]).fetchall(),
    }


def everything(conn: psycopg.Connection, world: World) -> dict[str, Any]:
    return {name: snapshot(conn, asset) for name, asset in world.ids.items()}


def regenerate(
    client: httpx.Client, base: str, kind: str, asset: UUID | str, headers: dict[str, str]
) -> httpx.Response:
    return client.post(f"{base}/ai/assets/{asset}/{kind}", headers=headers)


# ---- OCR -------------------------------------------------------------------------------------------------------


def test_regenerate_ocr_writes_like_immich(
    client: httpx.Client, gateway: str, world: World, conn: psycopg.Connection
) -> None:
    target = world.ids["invoice"]
    before = everything(conn, world)
    started = datetime.now(UTC) - timedelta(seconds=1)
    reply = regenerate(client, gateway, "ocr", target, world.users["a"].cookie)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert set(body) == {"assetId", "lines", "text"} and body["assetId"] == str(target)
    assert body["lines"] >= 2 and "发票" in body["text"] and "12345" in body["text"]

    rows = conn.execute(
        'SELECT text, x1, y1, x2, y2, x3, y3, x4, y4, "boxScore", "textScore", "isVisible" FROM asset_ocr '
        'WHERE "assetId" = %s',
        [target],
    ).fetchall()
    assert len(rows) == body["lines"]
    assert sorted(r[0] for r in rows) == sorted(body["text"].split("\n"))
    for _text, x1, y1, x2, y2, x3, y3, x4, y4, box_score, text_score, visible in rows:
        assert all(0.0 <= v <= 1.0 for v in (x1, y1, x2, y2, x3, y3, x4, y4)), "normalised to the preview"
        assert x1 < x2 and y1 < y4 and visible is True
        assert text_score >= 0.7 and 0 < box_score <= 1  # Immich's stored minRecognitionScore was used
    # ocr_search: Immich's tokenizeForSearch per line, in the order the lines came back
    lines = body["text"].split("\n")
    expected = " ".join(token for line in lines for token in tokenize_for_search(line))
    assert conn.execute('SELECT text FROM ocr_search WHERE "assetId" = %s', [target]).fetchone() == (expected,)
    assert "专用 用发 发票" in expected
    ocr_at = conn.execute('SELECT "ocrAt" FROM asset_job_status WHERE "assetId" = %s', [target]).fetchone()
    assert ocr_at is not None and ocr_at[0] >= started
    # exactly one asset changed
    after = everything(conn, world)
    assert {name for name in world.ids if after[name] != before[name]} == {"invoice"}
    # the preview was read as the caller, unedited, in preview size
    thumbs = world.stub.recorded(f"/api/assets/{target}/thumbnail")
    assert thumbs and thumbs[-1].query == "size=preview&edited=false"
    assert thumbs[-1].headers["x-immich-user-token"] == world.users["a"].session_token

    # Immich's own search and ours both see it now
    found = client.post(
        f"{gateway}/api/search/smart", json={"query": "ocr:增值税发票"}, headers=world.users["a"].cookie
    )
    assert [i["id"] for i in found.json()["assets"]["items"]] == [str(target)]

    # again: rows are replaced (new ids), never duplicated
    first_ids = {r[0] for r in conn.execute('SELECT id FROM asset_ocr WHERE "assetId" = %s', [target])}
    assert regenerate(client, gateway, "ocr", target, world.users["a"].key_header).status_code == 200
    second_ids = {r[0] for r in conn.execute('SELECT id FROM asset_ocr WHERE "assetId" = %s', [target])}
    assert len(second_ids) == len(first_ids) and not first_ids & second_ids


def test_regenerate_ocr_with_no_text_clears_it(
    client: httpx.Client, gateway: str, world: World, conn: psycopg.Connection
) -> None:
    target = world.ids["blank"]
    reply = regenerate(client, gateway, "ocr", target, world.users["a"].bearer)
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"assetId": str(target), "lines": 0, "text": ""}
    state = snapshot(conn, target)
    assert state["ocr"] == [] and state["search"] == []  # as Immich: no rows, no ocr_search row
    ocr_at = conn.execute('SELECT "ocrAt" FROM asset_job_status WHERE "assetId" = %s', [target]).fetchone()
    assert ocr_at is not None and ocr_at[0] is not None  # set even when nothing was found, as Immich does


# ---- CLIP ------------------------------------------------------------------------------------------------------


def test_regenerate_clip_upserts_smart_search(
    client: httpx.Client, gateway: str, world: World, conn: psycopg.Connection
) -> None:
    target = world.ids["photo"]
    before = everything(conn, world)
    reply = regenerate(client, gateway, "clip", target, world.users["a"].cookie)
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"assetId": str(target), "dimension": 512, "model": CLIP_MODEL}
    stored = conn.execute('SELECT embedding::text FROM smart_search WHERE "assetId" = %s', [target]).fetchone()
    assert stored is not None
    # the vector Immich's own job would have stored: the gateway's answer to Immich's request for that preview
    expected = immich_predict(
        client, gateway, {"clip": {"visual": {"modelName": CLIP_MODEL}}}, image=world.stub.previews[target]
    )
    assert expected.status_code == 200
    np.testing.assert_allclose(orjson.loads(stored[0]), orjson.loads(expected.json()["clip"]), atol=1e-6)
    after = everything(conn, world)
    assert {name for name in world.ids if after[name] != before[name]} == {"photo"}
    # a second run overwrites (upsert), one row
    assert regenerate(client, gateway, "clip", target, world.users["a"].cookie).status_code == 200
    assert conn.execute('SELECT count(*) FROM smart_search WHERE "assetId" = %s', [target]).fetchone() == (1,)


# ---- refusals write nothing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ocr", "clip"])
def test_refusals(client: httpx.Client, gateway: str, world: World, conn: psycopg.Connection, kind: str) -> None:
    a = world.users["a"]
    share = next(iter(world.stub.share_keys))
    cases: list[tuple[str, UUID | str, dict[str, str], int]] = [
        ("no credentials", world.ids["invoice"], {}, 401),
        ("forged session", world.ids["invoice"], {"cookie": "immich_access_token=forged"}, 401),
        ("forged api key", world.ids["invoice"], {"x-api-key": "forged"}, 401),
        ("shared link", world.ids["invoice"], {"x-immich-share-key": share, **a.cookie}, 403),
        ("another user's photo", world.ids["strangers"], a.cookie, 404),
        ("a partner's photo: visible, not owned", world.ids["partners"], a.cookie, 403),
        ("not a uuid", "not-a-uuid", a.cookie, 400),
        ("no such asset", uuid4(), a.cookie, 404),
        ("no preview yet", world.ids["no_preview"], a.cookie, 404),
        ("hidden motion part", world.ids["motion_part"], a.cookie, 409),
    ]
    before = everything(conn, world)
    for what, asset, headers, status in cases:
        reply = regenerate(client, gateway, kind, asset, headers)
        assert reply.status_code == status, f"{what}: {reply.status_code} {reply.text}"
        detail = reply.json()["detail"]
        assert isinstance(detail, str) and detail, what
        assert a.session_token not in detail and a.api_key not in detail
    assert everything(conn, world) == before
    # nobody's preview but the caller's own was fetched for a refused request
    for name in ("strangers", "partners", "motion_part"):
        assert not world.stub.recorded(f"/api/assets/{world.ids[name]}/thumbnail")
    assert client.get(f"{gateway}/ai/assets/{world.ids['invoice']}/ocr", headers=a.cookie).status_code == 405


# ---- API-key permissions, as Immich checks them -----------------------------------------------------------------
# A regenerate is Immich's per-photo job for OCR / CLIP (Immich has none of its own): POST /api/assets/jobs needs
# job.create and the caller's own photo. The gateway also reads the asset (asset.read) and its preview
# (asset.view) as the caller. The stub checks keys as Immich does.


def key_headers(key: str) -> dict[str, str]:
    return {"x-api-key": key}


def test_a_read_only_key_cannot_regenerate(
    client: httpx.Client, gateway: str, world: World, conn: psycopg.Connection
) -> None:
    a, target = world.users["a"], world.ids["invoice"]
    read_only = world.stub.add_api_key(a, "asset.read", "user.read", "asset.view")
    immichs = client.post(
        world.stub.url + "/api/assets/jobs",
        json={"assetIds": [str(target)], "name": "refresh-faces"},
        headers=key_headers(read_only),
    )
    assert immichs.status_code == 403
    assert immichs.json()["message"] == "Missing required permission: job.create"
    before = everything(conn, world)
    previews = len(world.stub.recorded(f"/api/assets/{target}/thumbnail"))
    for kind in ("ocr", "clip"):
        reply = regenerate(client, gateway, kind, target, key_headers(read_only))
        assert reply.status_code == 403, reply.text
        assert reply.json() == {"detail": "Immich refused: Missing required permission: job.create"}
    assert everything(conn, world) == before
    assert len(world.stub.recorded(f"/api/assets/{target}/thumbnail")) == previews  # refused before any reading


@pytest.mark.parametrize(
    ("permissions", "missing"),
    [(("job.create",), "asset.read"), (("job.create", "asset.read"), "asset.view")],
)
def test_job_create_alone_is_not_enough(
    client: httpx.Client,
    gateway: str,
    world: World,
    conn: psycopg.Connection,
    permissions: tuple[str, ...],
    missing: str,
) -> None:
    key = world.stub.add_api_key(world.users["a"], *permissions)
    before = everything(conn, world)
    reply = regenerate(client, gateway, "ocr", world.ids["invoice"], key_headers(key))
    assert reply.status_code == 403, reply.text
    assert reply.json()["detail"].endswith(f"Missing required permission: {missing}")
    assert everything(conn, world) == before


def test_a_key_with_what_immich_requires_regenerates_without_user_read(
    client: httpx.Client, gateway: str, world: World, conn: psycopg.Connection
) -> None:
    a = world.users["a"]
    key = world.stub.add_api_key(a, "job.create", "asset.read", "asset.view")
    me_calls = len(world.stub.recorded("/api/users/me"))
    reply = regenerate(client, gateway, "clip", world.ids["photo"], key_headers(key))
    assert reply.status_code == 200, reply.text
    assert reply.json()["dimension"] == 512
    assert len(world.stub.recorded("/api/users/me")) == me_calls
    probe = world.stub.recorded("/api/assets/jobs")[-1]
    assert probe.headers["x-api-key"] == key and orjson.loads(probe.body)["assetIds"] == []
    assert world.stub.queued_jobs == []  # asking Immich queued nothing
    # Owner only, as for Immich's own jobs: a partner's photo is refused even to a key with every permission.
    full = world.stub.add_api_key(a, "all")
    partners = world.ids["partners"]
    immichs = client.post(
        world.stub.url + "/api/assets/jobs",
        json={"assetIds": [str(partners)], "name": "refresh-faces"},
        headers=key_headers(full),
    )
    assert immichs.status_code == 400 and immichs.json()["message"] == "Not found or no asset.update access"
    before = snapshot(conn, partners)
    reply = regenerate(client, gateway, "ocr", partners, key_headers(full))
    assert reply.status_code == 403, reply.text
    assert snapshot(conn, partners) == before


# ---- the command line -------------------------------------------------------------------------------------------


def run_cli(world: World, model_dir: Path, *args: str, api_key: str | None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **gateway_env(world, model_dir), "GATEWAY_LOG_LEVEL": "warning", "GATEWAY_LOG_FORMAT": "text"}
    env.pop("IMMICH_API_KEY", None)
    if api_key is not None:
        env["IMMICH_API_KEY"] = api_key
    return subprocess.run(
        [sys.executable, "-m", "gateway", "regenerate", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_cli_regenerates_with_an_api_key(world: World, clip_model_dir: Path, conn: psycopg.Connection) -> None:
    a = world.users["a"]
    target = world.ids["invoice"]
    before = everything(conn, world)
    done = run_cli(world, clip_model_dir, "ocr", str(target), api_key=a.api_key)
    assert done.returncode == 0, done.stderr
    body = orjson.loads(done.stdout)
    assert body["assetId"] == str(target) and body["lines"] >= 2 and "发票" in body["text"]
    after = everything(conn, world)
    assert {name for name in world.ids if after[name] != before[name]} == {"invoice"}
    assert a.api_key not in done.stdout + done.stderr

    done = run_cli(world, clip_model_dir, "clip", str(world.ids["photo"]), "--api-key", a.api_key, api_key=None)
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == {"assetId": str(world.ids["photo"]), "dimension": 512, "model": CLIP_MODEL}


def test_cli_refusals(world: World, clip_model_dir: Path, conn: psycopg.Connection) -> None:
    before = everything(conn, world)
    wrong = run_cli(world, clip_model_dir, "ocr", str(world.ids["invoice"]), api_key="key-wrong-0123456789")
    assert wrong.returncode == 1 and "HTTP 401" in wrong.stderr and "key-wrong-0123456789" not in wrong.stderr
    other = run_cli(world, clip_model_dir, "ocr", str(world.ids["strangers"]), api_key=world.users["a"].api_key)
    assert other.returncode == 1 and "HTTP 404" in other.stderr and other.stdout == ""
    missing = run_cli(world, clip_model_dir, "ocr", str(world.ids["invoice"]), api_key=None)
    assert missing.returncode == 2 and "IMMICH_API_KEY" in missing.stderr
    usage = run_cli(world, clip_model_dir, "faces", str(world.ids["invoice"]), api_key="x")
    assert usage.returncode == 2
    assert everything(conn, world) == before
