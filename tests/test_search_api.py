"""The search front, end to end: a real gateway process, the Immich stub on loopback, a real PostgreSQL with
Immich 3.1's tables, and the tiny 512-d CLIP test model for the hybrid side.

``POST /api/search/smart`` as the web and mobile apps send it: ``ocr:`` queries (Chinese, English, mixed),
hybrid ranking on a corpus whose right order is known, Immich's scope (owner, partners in the timeline, no
trash, visibility, locked only when elevated), filters and paging, hostile queries, the pass-through to
Immich, credentials of every kind, and that nothing secret reaches the log.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import numpy as np
import orjson
import psycopg
import pytest

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
from tests.gateway_support import gateway_process, immich_predict
from tests.immich_stub import (
    CANNED_SMART_SEARCH,
    ImmichStub,
    StubUser,
    create_system_metadata,
    search_gateway,
    search_gateway_env,
    wait_search_ready,
)

SMART = "/api/search/smart"
MODE = "x-immich-zh-ai-search"


@dataclass
class World:
    uri: str
    stub: ImmichStub
    users: dict[str, StubUser] = field(default_factory=dict)
    ids: dict[str, UUID] = field(default_factory=dict)

    def names(self, reply: httpx.Response) -> list[str]:
        reverse = {str(v): k for k, v in self.ids.items()}
        return [reverse.get(item["id"], item["id"]) for item in reply.json()["assets"]["items"]]


@pytest.fixture(scope="module")
def world(postgres_uri: str) -> Iterator[World]:
    with fresh_database(postgres_uri) as uri:
        load_immich_schema(uri)
        migrate(DbSearchSettings(url=uri))
        stub = ImmichStub(uri)
        w = World(uri, stub)
        with psycopg.connect(uri, autocommit=True) as conn:
            create_system_metadata(conn, None)  # no stored config: Immich's defaults (ViT-B-32__openai)
            for name in ("a", "b", "c", "d", "e", "p"):
                w.users[name] = stub.add_user(StubUser(insert_user(conn, name=name), email=f"{name}@example.test"))
            a, b, c, d = (w.users[n].id for n in "abcd")
            add_partner(conn, c, a, in_timeline=True)  # c shares with a, shown in a's timeline
            add_partner(conn, d, a, in_timeline=False)  # d shares with a, but a keeps d out of the timeline

            def add(name: str, owner: UUID, ocr: list[str] | None, **kw: Any) -> UUID:
                # Every Immich asset has an asset_exif row once its metadata is extracted; the web's withExif: true
                # inner-joins it, as Immich does.
                asset = insert_asset(conn, owner, **{"exif": {}, **kw})
                if ocr:
                    insert_ocr_rows(conn, asset, ocr)
                w.ids[name] = asset
                return asset

            add("invoice", a, ["增值税专用发票", "No.12345"], exif={"city": "Beijing"})
            add("beijing", a, ["我爱北京天安门"])
            add("starbucks", a, ["Welcome to STARBUCKS Coffee"])
            add("tokyo", a, ["Tokyo東京タワー 営業時間 10:00"])
            add("video", a, ["发票 video"], asset_type="VIDEO", taken_at=datetime(2020, 6, 1, tzinfo=UTC))
            add("fav", a, ["收据 receipt"], is_favorite=True)
            add("trashed", a, ["发票"], deleted_at=datetime(2024, 5, 1, tzinfo=UTC))
            add("archived", a, ["发票"], visibility="archive")
            add("locked", a, ["发票"], visibility="locked")
            add("stranger", b, ["发票"])
            add("partner", c, ["发票"])
            add("hidden_partner", d, ["发票"])
            for i in range(5):
                add(f"p{i}", w.users["p"].id, [f"页码 {i}"])
        with stub.running():
            yield w


@pytest.fixture(scope="module")
def gateway(world: World, clip_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("gw") / "gateway.log"
    # nothing secret ever reaches the log: no API key, session token or cookie of any user
    secrets_ = [s for u in world.users.values() for s in (u.api_key, u.session_token, u.elevated_token)]
    with search_gateway(search_gateway_env(world.stub.url, world.uri, clip_model_dir), log, secrets_) as base:
        yield base


@pytest.fixture()
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as c:
        yield c


def search(client: httpx.Client, base: str, user: StubUser | None, body: dict[str, Any], **kw: Any) -> httpx.Response:
    headers = kw.pop("headers", None) or (user.cookie if user else {})
    return client.post(base + SMART, content=orjson.dumps(body), headers=headers, **kw)


def web_body(query: str, **extra: Any) -> dict[str, Any]:
    """What Immich's web sends from the search bar: {visibility, page, withExif, ...terms, language}."""
    return {"visibility": "timeline", "page": 1, "withExif": True, "query": query, "language": "zh-CN", **extra}


def check_search_response(reply: httpx.Response) -> dict[str, Any]:
    """Immich's SearchResponseDto, with AssetResponseDto items shaped like Immich's search results."""
    assert reply.status_code == 200, reply.text
    data = reply.json()
    assert data["albums"] == {"total": 0, "count": 0, "items": [], "facets": []}
    assets = data["assets"]
    assert set(assets) == {"total", "count", "items", "facets", "nextPage"}
    assert assets["count"] == assets["total"] == len(assets["items"]) and assets["facets"] == []
    assert assets["nextPage"] is None or assets["nextPage"].isdigit()
    for item in assets["items"]:
        assert {"id", "type", "ownerId", "originalFileName", "fileCreatedAt", "visibility", "isFavorite"} <= set(item)
        assert not {"owner", "tags", "stack"} & set(item) and item["people"] == []
    return data


# ---- OCR search -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("ocr:发票", {"invoice", "video", "partner"}),  # inside 增值税专用发票 No.12345, and c's (partner)
        ("ocr:北京", {"beijing"}),  # inside unsegmented 我爱北京天安门
        ("ocr:starbucks", {"starbucks"}),  # English, case-insensitive
        ("ocr:Tokyo東京", {"tokyo"}),  # mixed scripts
        ("ocr:no.12345", {"invoice"}),
        ("OCR:发票", {"invoice", "video", "partner"}),  # the prefix in any case
        ("  ocr：发票  ", {"invoice", "video", "partner"}),  # full-width colon (Chinese input method), spaces
        ("ocr: 天安门", {"beijing"}),
    ],
)
def test_ocr_queries(client: httpx.Client, gateway: str, world: World, query: str, expected: set[str]) -> None:
    reply = search(client, gateway, world.users["a"], web_body(query))
    check_search_response(reply)
    assert reply.headers[MODE] == "ocr"
    assert set(world.names(reply)) == expected


def test_ocr_result_items_are_immichs_asset_dtos(client: httpx.Client, gateway: str, world: World) -> None:
    reply = search(client, gateway, world.users["a"], web_body("ocr:增值税专用发票"))
    items = check_search_response(reply)["assets"]["items"]
    assert [i["id"] for i in items] == [str(world.ids["invoice"])]
    item = items[0]
    assert item["ownerId"] == str(world.users["a"].id) and item["type"] == "IMAGE" and item["isTrashed"] is False
    assert item["exifInfo"]["city"] == "Beijing"  # withExif: true
    reply = search(client, gateway, world.users["a"], web_body("ocr:增值税专用发票", withExif=False))
    assert "exifInfo" not in check_search_response(reply)["assets"]["items"][0]
    # Immich's permission check ran a second time, as the caller: the stub saw a GET for that asset
    reads = world.stub.recorded(f"/api/assets/{world.ids['invoice']}", "GET")
    assert reads and reads[-1].headers.get("x-immich-user-token") == world.users["a"].session_token


# ---- scope ----------------------------------------------------------------------------------------------------


def test_scope_is_the_caller_and_partners_in_timeline(client: httpx.Client, gateway: str, world: World) -> None:
    a, b = world.users["a"], world.users["b"]
    names = set(world.names(search(client, gateway, a, web_body("ocr:发票"))))
    # never b's (stranger), never trashed / archived / locked, never d's (partner, not in the timeline)
    assert names == {"invoice", "video", "partner"}
    assert world.names(search(client, gateway, b, web_body("ocr:发票"))) == ["stranger"]
    # c shares with a, not the other way round
    assert world.names(search(client, gateway, world.users["c"], web_body("ocr:发票"))) == ["partner"]


def test_visibility_and_trash_follow_immich(client: httpx.Client, gateway: str, world: World) -> None:
    a = world.users["a"]
    archived = search(client, gateway, a, web_body("ocr:发票", visibility="archive"))
    assert world.names(archived) == ["archived"]
    with_trash = search(client, gateway, a, web_body("ocr:发票", withDeleted=True))
    assert set(world.names(with_trash)) == {"invoice", "video", "partner", "trashed"}
    # locked needs a PIN-elevated session (Immich: 401 "Elevated permission is required") and is own-only
    refused = search(client, gateway, a, web_body("ocr:发票", visibility="locked"))
    assert refused.status_code == 401 and refused.json()["message"] == "Elevated permission is required"
    elevated = {"cookie": f"immich_access_token={a.elevated_token}"}
    locked = search(client, gateway, a, web_body("ocr:发票", visibility="locked"), headers=elevated)
    assert world.names(locked) == ["locked"]


def test_gateway_scope_holds_even_if_immich_leaks(client: httpx.Client, gateway: str, world: World) -> None:
    """The database scope is the first line: a buggy Immich that shows every asset changes nothing."""
    world.stub.leaky = True
    try:
        assert set(world.names(search(client, gateway, world.users["a"], web_body("ocr:发票")))) == {
            "invoice",
            "video",
            "partner",
        }
    finally:
        world.stub.leaky = False


def test_hits_immich_refuses_are_dropped(client: httpx.Client, gateway: str, world: World) -> None:
    """Immich's own check is the second line: a hit it will not show this caller never reaches them."""
    world.stub.deny.add(world.ids["partner"])
    try:
        reply = search(client, gateway, world.users["a"], web_body("ocr:发票"))
        assert set(world.names(reply)) == {"invoice", "video"}
        assert reply.json()["assets"]["count"] == 2
    finally:
        world.stub.deny.clear()


# ---- credentials ----------------------------------------------------------------------------------------------


def test_every_credential_kind_works(client: httpx.Client, gateway: str, world: World) -> None:
    a = world.users["a"]
    for headers, params in (
        (a.cookie, None),
        (a.key_header, None),
        (a.bearer, None),
        ({"x-immich-user-token": a.session_token}, None),
        ({}, {"apiKey": a.api_key}),
    ):
        reply = search(client, gateway, None, web_body("ocr:北京"), headers=headers or {"x-none": "1"}, params=params)
        assert world.names(reply) == ["beijing"], headers.keys()


def test_unauthenticated_and_shared_links_are_refused(client: httpx.Client, gateway: str, world: World) -> None:
    for body in (web_body("ocr:发票"), web_body("发票")):
        none = search(client, gateway, None, body, headers={"x-none": "1"})
        assert none.status_code == 401 and none.json()["statusCode"] == 401
        bad = search(client, gateway, None, body, headers={"cookie": "immich_access_token=forged"})
        assert bad.status_code == 401 and bad.json()["message"] == "Invalid user token"
        share = next(iter(world.stub.share_keys))
        shared = search(client, gateway, None, body, headers={"x-immich-share-key": share, **world.users["a"].cookie})
        assert shared.status_code == 403
    assert not world.stub.recorded(SMART), "nothing was forwarded to Immich"


# ---- API-key permissions, as Immich checks them ---------------------------------------------------------------
# POST /api/search/smart is Immich's route with permission asset.read: a key holding it (or "all") may search,
# any other key gets Immich's 403, whatever else it holds. The stub checks keys as Immich does.


def key_search(client: httpx.Client, gateway: str, key: str, body: dict[str, Any]) -> httpx.Response:
    return client.post(gateway + SMART, content=orjson.dumps(body), headers={"x-api-key": key})


@pytest.mark.parametrize("permissions", [("asset.read",), ("asset.read", "user.read"), ("all",)])
def test_a_key_with_asset_read_searches_like_a_session(
    client: httpx.Client, gateway: str, world: World, permissions: tuple[str, ...]
) -> None:
    key = world.stub.add_api_key(world.users["a"], *permissions)
    me_calls = len(world.stub.recorded("/api/users/me"))
    for query, mode in (("ocr:发票", "ocr"), ("发票", "hybrid")):
        reply = key_search(client, gateway, key, web_body(query))
        check_search_response(reply)
        assert reply.headers[MODE] == mode  # answered here, not handed to Immich
        # Immich's scope, found without user.read: the key's owner and the partner in their timeline
        assert {"invoice", "partner"} <= set(world.names(reply)) and "stranger" not in world.names(reply)
    assert len(world.stub.recorded("/api/users/me")) == me_calls  # the key's user.read is never needed
    # Immich was asked, as the key, whether it may search (a search guarded by asset.read)
    probe = world.stub.recorded("/api/search/metadata")[-1]
    assert probe.headers["x-api-key"] == key


@pytest.mark.parametrize(
    "permissions", [("user.read",), ("user.read", "asset.view", "asset.download"), ("job.create",)]
)
def test_a_key_without_asset_read_gets_immichs_403(
    client: httpx.Client, gateway: str, world: World, permissions: tuple[str, ...]
) -> None:
    key = world.stub.add_api_key(world.users["a"], *permissions)
    immichs = client.post(world.stub.url + SMART, json={"query": "发票"}, headers={"x-api-key": key})
    assert immichs.status_code == 403
    for query in ("ocr:发票", "发票"):
        reply = key_search(client, gateway, key, web_body(query))
        assert reply.status_code == 403, reply.text
        assert reply.json() == {
            "message": "Missing required permission: asset.read",
            "error": "Forbidden",
            "statusCode": 403,
        }
        assert reply.json()["message"] == immichs.json()["message"]


def test_a_key_never_sees_locked_assets(client: httpx.Client, gateway: str, world: World) -> None:
    """Immich lets only a PIN-elevated *session* search locked assets; an API key has no session (401)."""
    key = world.stub.add_api_key(world.users["a"], "all")
    status_calls = len(world.stub.recorded("/api/auth/status"))
    reply = key_search(client, gateway, key, web_body("ocr:发票", visibility="locked"))
    assert reply.status_code == 401 and reply.json()["message"] == "Elevated permission is required"
    # GET /api/auth/status is not asked for a key (Immich would want "all" for it, and a key is never elevated)
    assert len(world.stub.recorded("/api/auth/status")) == status_calls


def test_a_lone_surrogate_in_an_ocr_query_is_answered_here(client: httpx.Client, gateway: str, world: World) -> None:
    """JSON may escape a lone surrogate; the gateway reads it as Immich does (U+FFFD) and answers itself."""
    body = b'{"query": "ocr:\\ud800\\u53d1\\u7968", "visibility": "timeline"}'
    assert json.loads(body)["query"] == "ocr:\ud800发票"
    forwarded = len(world.stub.recorded(SMART))
    reply = client.post(gateway + SMART, content=body, headers=world.users["a"].cookie)
    check_search_response(reply)
    assert reply.headers[MODE] == "ocr"
    assert len(world.stub.recorded(SMART)) == forwarded
    # NaN is not JSON for Immich either: that body still goes to Immich untouched
    reply = client.post(gateway + SMART, content=b'{"query": "ocr:x", "page": NaN}', headers=world.users["a"].cookie)
    assert reply.headers[MODE] == "immich"


# ---- filters and paging ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"type": "VIDEO"}, {"video"}),
        ({"type": "IMAGE"}, {"invoice", "partner"}),
        ({"takenBefore": "2021-01-01T00:00:00.000Z"}, {"video"}),
        ({"takenAfter": "2021-01-01T00:00:00+08:00"}, {"invoice", "partner"}),
        ({"city": "Beijing"}, {"invoice"}),
        ({"isFavorite": False, "isMotion": False}, {"invoice", "video", "partner"}),
        ({"isNotInAlbum": True, "unknownField": {"ignored": True}}, {"invoice", "video", "partner"}),
        ({"personIds": ["9f1b5d6e-0000-4000-8000-000000000001"]}, set()),
    ],
)
def test_filters(client: httpx.Client, gateway: str, world: World, extra: dict[str, Any], expected: set[str]) -> None:
    reply = search(client, gateway, world.users["a"], web_body("ocr:发票", **extra))
    assert set(world.names(reply)) == expected


@pytest.mark.parametrize(
    ("extra", "field_name"),
    [
        ({"type": "PHOTO"}, "type"),
        ({"visibility": "public"}, "visibility"),
        ({"takenAfter": "yesterday"}, "takenAfter"),
        ({"takenAfter": "2024-01-01T00:00:00"}, "takenAfter"),  # no offset
        ({"size": 0}, "size"),
        ({"size": 1001}, "size"),
        ({"page": 0}, "page"),
        ({"page": "2"}, "page"),
        ({"isFavorite": "yes"}, "isFavorite"),
        ({"personIds": ["not-a-uuid"]}, "personIds"),
        ({"albumIds": "x"}, "albumIds"),
        ({"rating": 9}, "rating"),
        ({"city": 5}, "city"),
        ({"libraryId": "lib"}, "libraryId"),
    ],
)
def test_invalid_values_are_400_with_a_message(
    client: httpx.Client, gateway: str, world: World, extra: dict[str, Any], field_name: str
) -> None:
    for query in ("ocr:发票", "发票"):
        reply = search(client, gateway, world.users["a"], web_body(query, **extra))
        assert reply.status_code == 400, reply.text
        body = reply.json()
        assert body["statusCode"] == 400 and body["error"] == "Bad Request" and field_name in body["message"]


def test_paging_like_immich(client: httpx.Client, gateway: str, world: World) -> None:
    p = world.users["p"]
    seen: list[str] = []
    page: int | None = 1
    pages = 0
    while page is not None:
        data = check_search_response(search(client, gateway, p, web_body("ocr:页码", page=page, size=2)))
        seen += [i["id"] for i in data["assets"]["items"]]
        page = int(data["assets"]["nextPage"]) if data["assets"]["nextPage"] else None
        pages += 1
    assert pages == 3 and len(seen) == len(set(seen)) == 5
    assert set(seen) == {str(world.ids[f"p{i}"]) for i in range(5)}
    # size defaults to Immich's 100
    data = check_search_response(search(client, gateway, p, {"query": "ocr:页码"}))
    assert data["assets"]["count"] == 5 and data["assets"]["nextPage"] is None


# ---- hostile input --------------------------------------------------------------------------------------------

HOSTILE = [
    "ocr:' or 1=1 --",
    "ocr:发票' OR '1'='1",
    "ocr:发票 & | ! <-> :* ()",
    "ocr:'",
    'ocr:"',
    "ocr:\\",
    "ocr:😀🎉",
    "ocr:\x00发票",
    "ocr:",
    "ocr:   ",
    "ocr:" + "发" * 10_000,
    "ocr:" + "a" * 10_000,
    "' or 1=1 --",
    "发票 & | !",
    "'",
    "😀",
    "\ud83d",  # a lone surrogate
    "ocr:\ud800发票",
    "x" * 10_000,
    "",
]


@pytest.mark.parametrize("query", HOSTILE, ids=lambda q: repr(q[:20]))
def test_hostile_queries_get_normal_answers(client: httpx.Client, gateway: str, world: World, query: str) -> None:
    # stdlib json: escapes a lone surrogate as \ud83d, as a browser's JSON.stringify does
    body = json.dumps(web_body(query)).encode()
    reply = client.post(gateway + SMART, content=body, headers=world.users["a"].cookie)
    check_search_response(reply)
    assert reply.headers[MODE] != "immich"  # answered here, never handed on (Immich's stub answers anything)
    assert "stranger" not in world.names(reply)


def test_sql_in_a_query_is_only_text(client: httpx.Client, gateway: str, world: World) -> None:
    for query in ("ocr:' or 1=1 --", "ocr:1' OR '1'='1", "ocr:x'; DROP TABLE asset; --"):
        assert world.names(search(client, gateway, world.users["a"], web_body(query))) == []
    with psycopg.connect(world.uri) as conn:
        assert conn.execute("SELECT count(*) FROM asset").fetchone() == (len(world.ids),)


# ---- hybrid ranking -------------------------------------------------------------------------------------------


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def with_similarity(q: np.ndarray, similarity: float, seed: int) -> list[float]:
    """A unit vector whose cosine similarity with ``q`` is exactly ``similarity``."""
    rng = np.random.default_rng(seed)
    r = rng.standard_normal(q.shape[0])
    u = unit(r - (r @ q) * q)
    return [float(x) for x in similarity * q + math.sqrt(1 - similarity**2) * u]


def test_hybrid_ranking_fuses_clip_and_ocr(client: httpx.Client, gateway: str, world: World) -> None:
    # The query vector as the gateway computes it for Immich's configured model (the test model's).
    reply = immich_predict(
        client, gateway, {"clip": {"textual": {"modelName": "ViT-B-32__openai", "options": {}}}}, text="发票"
    )
    assert reply.status_code == 200, reply.text
    q = unit(np.asarray(orjson.loads(reply.json()["clip"]), dtype=np.float64))
    e = world.users["e"]
    with psycopg.connect(world.uri, autocommit=True) as conn:

        def add(name: str, ocr: list[str] | None, similarity: float | None, seed: int) -> None:
            asset = insert_asset(conn, e.id, exif={})
            if ocr:
                insert_ocr_rows(conn, asset, ocr)
            if similarity is not None:
                insert_embedding(conn, asset, with_similarity(q, similarity, seed))
            world.ids[name] = asset

        add("e_both", ["发票"], 0.5, 1)  # both signals: first
        add("e_clip", None, 0.9, 2)  # best CLIP, no text: 1/(k+1)
        add("e_ocr", ["发票 报销 单据 审批 流程 说明"], None, 3)  # second OCR match, no vector: 1/(k+2)
        add("e_weak", ["天气"], 0.1, 4)  # third CLIP, unrelated text
    reply = search(client, gateway, e, web_body("发票"))
    check_search_response(reply)
    assert reply.headers[MODE] == "hybrid"
    assert world.names(reply) == ["e_both", "e_clip", "e_ocr", "e_weak"]
    # the same query as ocr: sees only the text matches
    assert world.names(search(client, gateway, e, web_body("ocr:发票"))) == ["e_both", "e_ocr"]
    # scope holds on the CLIP side too: a sees none of e's assets
    assert not {"e_both", "e_clip", "e_ocr", "e_weak"} & set(
        world.names(search(client, gateway, world.users["a"], web_body("发票")))
    )


def test_hybrid_finds_text_in_english_and_mixed_queries(client: httpx.Client, gateway: str, world: World) -> None:
    a = world.users["a"]
    assert world.names(search(client, gateway, a, web_body("Starbucks coffee")))[0] == "starbucks"
    assert world.names(search(client, gateway, a, web_body("Tokyo 東京タワー")))[0] == "tokyo"


def test_hybrid_ranks_by_ocr_alone_when_clip_cannot_answer(client: httpx.Client, gateway: str, world: World) -> None:
    a = world.users["a"]
    with psycopg.connect(world.uri, autocommit=True) as conn:
        try:
            # a model no backend has: every CLIP attempt fails, the search still answers from OCR
            create_system_metadata(conn, {"machineLearning": {"clip": {"modelName": "ViT-B-16__openai"}}})
            reply = search(client, gateway, a, web_body("北京"))
            assert reply.headers[MODE] == "hybrid-ocr-only" and world.names(reply) == ["beijing"]
            # CLIP switched off in Immich: no encoding at all, same answer
            create_system_metadata(conn, {"machineLearning": {"clip": {"enabled": False}}})
            reply = search(client, gateway, a, web_body("北京"))
            assert reply.headers[MODE] == "hybrid-ocr-only" and world.names(reply) == ["beijing"]
        finally:
            create_system_metadata(conn, None)


# ---- what goes to Immich untouched ----------------------------------------------------------------------------


def test_similar_photos_and_non_text_bodies_go_to_immich(client: httpx.Client, gateway: str, world: World) -> None:
    a = world.users["a"]
    for body in (
        b'{"queryAssetId":"' + str(world.ids["invoice"]).encode() + b'","page":1}',
        b'{"page":1}',
        b"not json at all",
    ):
        reply = client.post(gateway + SMART, content=body, headers={**a.cookie, "content-type": "application/json"})
        assert reply.headers[MODE] == "immich"
        assert world.stub.recorded(SMART)[-1].body == body
    assert reply.json() == CANNED_SMART_SEARCH


def test_hybrid_with_a_filter_the_layer_lacks_goes_to_immich(client: httpx.Client, gateway: str, world: World) -> None:
    a = world.users["a"]
    body = orjson.dumps(web_body("a red car", tagIds=["9f1b5d6e-0000-4000-8000-000000000001"]))
    reply = client.post(gateway + SMART, content=body, headers=a.cookie)
    assert reply.headers[MODE] == "immich" and world.stub.recorded(SMART)[-1].body == body
    # an ocr: query cannot go to Immich (it would CLIP-encode "ocr:..."): a clear 400 instead
    refused = search(client, gateway, a, web_body("ocr:发票", tagIds=None))
    assert refused.status_code == 400 and "tagIds" in refused.json()["message"]


def test_only_the_search_endpoint_is_served(client: httpx.Client, gateway: str, world: World) -> None:
    a = world.users["a"]
    assert client.get(gateway + "/api/server/ping", headers=a.cookie).status_code == 404
    assert client.post(gateway + "/api/search/metadata", json={"ocr": "发票"}, headers=a.cookie).status_code == 404
    assert client.get(gateway + SMART, headers=a.cookie).status_code == 405
    # a request the gateway itself forwarded never loops back through it
    loop = client.post(gateway + SMART, json={"query": "x"}, headers={**a.cookie, "x-immich-zh-ai-forwarded": "1"})
    assert loop.status_code == 508


@pytest.fixture(scope="module")
def gateway_hybrid_off(world: World, clip_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("gw-off") / "gateway.log"
    env = search_gateway_env(world.stub.url, world.uri, clip_model_dir, DB_SEARCH_HYBRID="false")
    with gateway_process(env, log) as gw:
        wait_search_ready(gw.base)
        yield gw.base


def test_hybrid_off_forwards_other_queries_unchanged(
    client: httpx.Client, gateway_hybrid_off: str, world: World
) -> None:
    a = world.users["a"]
    # exactly what the web sends, byte for byte (key order, spacing and non-ASCII as the browser wrote them)
    body = '{"visibility":"timeline","page":1,"withExif":true,"query":"海边的狗 dog","language":"zh-CN"}'.encode()
    before = len(world.stub.recorded(SMART))
    reply = client.post(
        gateway_hybrid_off + SMART,
        content=body,
        params={"trace": "1"},
        headers={**a.cookie, "content-type": "application/json", "accept-encoding": "identity", "x-custom": "kept"},
    )
    assert reply.status_code == 200 and reply.json() == CANNED_SMART_SEARCH and reply.headers[MODE] == "immich"
    received = world.stub.recorded(SMART)
    assert len(received) == before + 1
    got = received[-1]
    assert got.body == body and got.query == "trace=1"
    assert got.headers["cookie"] == a.cookie["cookie"] and got.headers["x-custom"] == "kept"
    assert got.headers["content-type"] == "application/json"
    # ocr: queries are still answered by the gateway
    ocr = search(client, gateway_hybrid_off, a, web_body("ocr:北京"))
    assert ocr.headers[MODE] == "ocr" and world.names(ocr) == ["beijing"]
    assert len(world.stub.recorded(SMART)) == before + 1
