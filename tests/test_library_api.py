"""``python -m library serve`` as a real process: the native API's statuses, the imgsmlr-server contract
field by field, the blocklist through HTTP and /metrics, and the embedded-PostgreSQL default."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import ImageOps

from tests.gateway_support import metric_value
from tests.library_support import PDQ_DATA, ImageServer, encode, library_env, library_server, photo
from tests.servers import free_port

IMGSMLR_IMAGE_FIELDS = {"id", "url", "dataId", "md5", "remark", "meta", "simr", "matchType"}


@pytest.fixture(scope="module")
def images() -> Iterator[ImageServer]:
    with ImageServer() as srv:
        srv.files["/cat.jpg"] = encode(photo("chelsea"), "JPEG", quality=90)
        srv.files["/cat-mirror-small.jpg"] = encode(ImageOps.mirror(photo("chelsea")).resize((300, 200)), "JPEG")
        srv.files["/coffee.png"] = encode(photo("coffee"))
        srv.files["/astronaut.png"] = encode(photo("astronaut"))
        srv.files["/bridge.jpg"] = (PDQ_DATA / "bridge-mods/aaa-orig.jpg").read_bytes()
        srv.files["/bridge-blur.jpg"] = (PDQ_DATA / "bridge-mods/blur-a-lot.jpg").read_bytes()
        yield srv


@pytest.fixture(scope="module")
def api(postgres_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    tmp = tmp_path_factory.mktemp("library-api")
    env = library_env(
        postgres_uri, tmp / "data", LIBRARY_MAX_IMAGE_BYTES="3000000", LIBRARY_MAX_BLOCKLIST_IMPORT_BYTES="2000000"
    )
    port = free_port()
    with (
        library_server(env, tmp / "server.log", port),
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client,
    ):
        yield client
    log = (tmp / "server.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]


def imgsmlr(api: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = api.post(f"/imgsmlr/{path}", json=body)
    assert response.status_code == 200, response.text
    return response.json()


# ---- imgsmlr contract -------------------------------------------------------------------------------------


def test_imgsmlr_add_and_duplicate(api: httpx.Client, images: ImageServer) -> None:
    url = images.url("/cat.jpg")
    first = imgsmlr(api, "mgr/add", {"url": url, "dataId": "cat-1", "remark": "a cat", "meta": {"tags": ["cat"]}})
    assert set(first) == {"code", "msg", "data"}
    assert first["code"] == 200 and first["msg"] == "OK"
    assert set(first["data"]) == {"id", "md5"}
    assert isinstance(first["data"]["id"], int)
    assert first["data"]["md5"] == hashlib.md5(images.files["/cat.jpg"]).hexdigest()
    again = imgsmlr(api, "mgr/add", {"url": url})
    assert again["code"] == 400 and again["msg"].startswith("image file already exists")
    assert again["data"] == first["data"]


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/404", "HTTP 404"),
        ("/page.jpg", "not an image"),
        ("/bomb.png", "too large"),
        ("/truncated.jpg", "not an image"),
        ("/endless", "larger than"),
        ("/loop", "redirects"),
    ],
)
def test_imgsmlr_add_errors_are_code_400_with_http_200(
    api: httpx.Client, images: ImageServer, path: str, reason: str
) -> None:
    reply = imgsmlr(api, "mgr/add", {"url": images.url(path)})
    assert reply["code"] == 400 and reply["data"] is None
    assert reason in reply["msg"]


def test_imgsmlr_refuses_metadata_addresses(api: httpx.Client) -> None:
    reply = imgsmlr(api, "mgr/add", {"url": "http://169.254.169.254/latest/meta-data/iam"})
    assert reply["code"] == 400 and "denied network" in reply["msg"] and reply["data"] is None


@pytest.mark.parametrize("path", ["mgr/add", "search"])
@pytest.mark.parametrize("raw", [b"{", b"not json", b"[]", b'{"dataId": "x"}', b'{"url": 5}', b"\xff\xfe"])
def test_imgsmlr_malformed_bodies_are_422(api: httpx.Client, path: str, raw: bytes) -> None:
    response = api.post(f"/imgsmlr/{path}", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text


def test_imgsmlr_fields_of_the_wrong_type_are_422(api: httpx.Client) -> None:
    assert api.post("/imgsmlr/mgr/add", json={"url": "http://x/", "meta": "str"}).status_code == 422
    assert api.post("/imgsmlr/search", json={"url": "http://x/", "limit": "many"}).status_code == 422
    assert api.post("/imgsmlr/search", json={"url": "http://x/", "threshold": -1}).status_code == 422


def test_imgsmlr_accepts_curl_dash_d_bodies(api: httpx.Client, images: ImageServer) -> None:
    """The original's README posts with `curl -d '{...}'`, i.e. application/x-www-form-urlencoded."""
    response = api.post(
        "/imgsmlr/search",
        content=b'{"url": "%s"}' % images.url("/cat.jpg").encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200 and response.json()["code"] == 200


def test_imgsmlr_search_contract(api: httpx.Client, images: ImageServer) -> None:
    added = {
        p: imgsmlr(api, "mgr/add", {"url": images.url(p)})["data"]["id"] for p in ("/coffee.png", "/astronaut.png")
    }
    cat = imgsmlr(api, "mgr/add", {"url": images.url("/cat.jpg")})["data"]["id"]  # already there: code 400
    reply = imgsmlr(api, "search", {"url": images.url("/cat-mirror-small.jpg")})
    assert reply["code"] == 200 and reply["msg"] == "OK"
    assert set(reply["data"]) == {"threshold", "images"}
    assert reply["data"]["threshold"] == 31  # PDQ default (no CLIP model installed here)
    found = reply["data"]["images"]
    assert [im["id"] for im in found] == [cat]
    image = found[0]
    assert set(image) == IMGSMLR_IMAGE_FIELDS
    assert image["url"] == images.url("/cat.jpg")
    assert image["dataId"] == "cat-1" and image["remark"] == "a cat" and image["meta"] == {"tags": ["cat"]}
    assert image["md5"] == hashlib.md5(images.files["/cat.jpg"]).hexdigest()
    assert image["matchType"] == "pdq" and isinstance(image["simr"], int) and 0 < image["simr"] <= 31
    # Exact bytes: distance 0; a threshold of 0 still finds it; unrelated images never appear.
    exact = imgsmlr(api, "search", {"url": images.url("/coffee.png"), "threshold": 0, "matchType": "pdq"})
    assert [(im["id"], im["simr"]) for im in exact["data"]["images"]] == [(added["/coffee.png"], 0)]
    assert exact["data"]["threshold"] == 0
    # Everything within 256 bits, ascending, limited.
    everything = imgsmlr(api, "search", {"url": images.url("/coffee.png"), "threshold": 256, "limit": 2})
    simrs = [im["simr"] for im in everything["data"]["images"]]
    assert len(simrs) == 2 and simrs == sorted(simrs) and simrs[0] == 0


def test_imgsmlr_search_errors(api: httpx.Client, images: ImageServer) -> None:
    clip = imgsmlr(api, "search", {"url": images.url("/cat.jpg"), "matchType": "clip"})
    assert clip["code"] == 400 and "CLIP" in clip["msg"] and clip["data"] is None
    for path in ("/404", "/page.jpg", "/bomb.png"):
        reply = imgsmlr(api, "search", {"url": images.url(path)})
        assert reply["code"] == 400 and reply["data"] is None, path
    bad_type = api.post("/imgsmlr/search", json={"url": images.url("/cat.jpg"), "matchType": "imgsmlr"})
    assert bad_type.status_code == 422


def test_imgsmlr_page(api: httpx.Client) -> None:
    page = api.get("/imgsmlr/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for needle in ('id="add"', 'id="search"', 'id="upload"', "mgr/add", "../api/search/image", 'id="results"'):
        assert needle in page.text


# ---- native API ---------------------------------------------------------------------------------------------


def test_native_upload_statuses(api: httpx.Client, images: ImageServer) -> None:
    data = encode(photo("rocket"), "JPEG")
    created = api.post("/api/items", files={"file": ("r.jpg", data)}, data={"remark": "rocket"})
    assert created.status_code == 201 and created.json()["created"] is True
    again = api.post("/api/items", files={"file": ("other-name.jpg", data)})
    assert again.status_code == 200 and again.json()["id"] == created.json()["id"]
    assert api.post("/api/items", files={"file": ("x.jpg", b"<html>")}).status_code == 415
    assert api.post("/api/items", files={"file": ("x.jpg", b"")}).status_code == 400
    assert api.post("/api/items", files={"file": ("big.jpg", b"\xff" * 3_100_000)}).status_code == 413
    assert api.post("/api/items", files={"file": ("bomb.png", images.files.get("/bomb.png") or b"")}).status_code in (
        400,
        413,
        415,
    )
    assert api.post("/api/items").status_code == 422
    # A body over the limit is refused while it streams (3 MB image + 1 MB framing), not spooled.
    huge = api.post("/api/items", files={"file": ("huge.jpg", b"\xff" * 5_000_000)})
    assert huge.status_code == 413 and "LIBRARY_MAX_IMAGE_BYTES" in huge.text
    item = api.get(f"/api/items/{created.json()['id']}").json()
    assert item["remark"] == "rocket" and item["steps"][0]["name"] == "pdq" and item["blocked"] is False
    image = api.get(f"/api/items/{item['id']}/image")
    assert image.status_code == 200 and image.content == data and image.headers["content-type"] == "image/jpeg"
    assert api.get("/api/items/987654").status_code == 404
    assert api.get("/api/items/not-a-number").status_code == 422


def test_native_url_and_search_statuses(api: httpx.Client, images: ImageServer) -> None:
    assert api.post("/api/items/url", json={"url": images.url("/404")}).status_code == 400
    assert api.post("/api/items/url", json={"url": images.url("/page.jpg")}).status_code == 415
    assert api.post("/api/items/url", json={"url": images.url("/bomb.png")}).status_code == 413
    assert api.post("/api/items/url", json={"url": "http://169.254.169.254/"}).status_code == 400
    added = api.post("/api/items/url", json={"url": images.url("/bridge.jpg")})
    assert added.status_code == 201
    item_id = added.json()["id"]
    hits = api.post("/api/search/image", files={"file": ("q.jpg", images.files["/bridge-blur.jpg"])}).json()
    assert hits["match_type"] == "pdq" and [h["id"] for h in hits["results"]] == [item_id]
    by_url = api.post("/api/search/url", json={"url": images.url("/bridge-blur.jpg")}).json()
    assert [h["id"] for h in by_url["results"]] == [item_id]
    assert api.get(f"/api/search/item/{item_id}").status_code == 200
    assert api.get(f"/api/search/item/{item_id}", params={"match_type": "clip"}).status_code == 409
    assert api.get("/api/search/item/987654").status_code == 404
    assert api.post("/api/search/image", files={"file": ("q", b"GIF89a-broken")}).status_code == 415
    assert api.get("/api/search/text", params={"q": ""}).status_code == 422
    assert api.get("/api/search/text", params={"q": "发票", "mode": "clip"}).status_code == 409
    assert api.get("/api/search/text", params={"q": "发票"}).json()["results"] == []
    groups = api.get("/api/duplicates").json()["groups"]
    assert isinstance(groups, list)
    status = api.get("/api/status").json()
    assert status["items"] >= 1 and "pdq" in status["steps"]


def test_blocklist_over_http_and_metrics(api: httpx.Client, images: ImageServer) -> None:
    bridge_id = api.post("/api/items/url", json={"url": images.url("/bridge.jpg")}).json()["id"]
    hashes = b"f8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22,100,known bridge\n"
    imported = api.post("/api/blocklist/hashes", files={"file": ("list.txt", hashes)})
    assert imported.status_code == 200 and imported.json()["items_flagged"] >= 1
    assert api.post("/api/blocklist/hashes", files={"file": ("bad.txt", b"nothing here\n")}).status_code == 400
    hits = api.get("/api/blocklist/hits").json()["hits"]
    assert bridge_id in [h["item_id"] for h in hits] and hits[0]["label"] == "known bridge"
    assert api.get(f"/api/items/{bridge_id}").json()["blocked"] is True
    assert api.get(f"/api/items/{bridge_id}/image").status_code == 451
    # Excluded from searches (native and imgsmlr).
    hits = api.post("/api/search/image", files={"file": ("q.jpg", images.files["/bridge-blur.jpg"])}).json()
    assert hits["results"] == []
    assert imgsmlr(api, "search", {"url": images.url("/bridge.jpg")})["data"]["images"] == []
    # The on-demand check matches and stores nothing.
    before = api.get("/api/status").json()["items"]
    check = api.post("/api/blocklist/check", files={"file": ("q.jpg", images.files["/bridge-blur.jpg"])}).json()
    assert check["match"] is True and check["label"] == "known bridge" and check["distance"] <= 31
    clean = api.post("/api/blocklist/check", files={"file": ("q.png", images.files["/astronaut.png"])}).json()
    assert clean == {"match": False, "distance": None, "entry_id": None, "label": None}
    assert api.get("/api/status").json()["items"] == before
    metrics = api.get("/metrics").text
    assert metric_value(metrics, "library_blocked_items") >= 1
    assert metric_value(metrics, "library_blocklist_entries") >= 1
    assert metric_value(metrics, "library_items") == before


# ---- the embedded default -------------------------------------------------------------------------------------


def test_serve_without_a_database_url_runs_embedded_postgres(tmp_path: Path, images: ImageServer) -> None:
    env = {"LIBRARY_DATA_DIR": str(tmp_path / "data"), "LIBRARY_DATABASE_URL": ""}
    port = free_port()
    with library_server(env, tmp_path / "one.log", port):
        first = httpx.post(f"http://127.0.0.1:{port}/imgsmlr/mgr/add", json={"url": images.url("/coffee.png")})
        assert first.json()["code"] == 200
    assert (tmp_path / "data" / "postgres" / "PG_VERSION").is_file()
    with library_server(env, tmp_path / "two.log", port):  # restarted: the data is still there
        again = httpx.post(f"http://127.0.0.1:{port}/imgsmlr/mgr/add", json={"url": images.url("/coffee.png")})
        assert again.json()["code"] == 400 and again.json()["data"] == first.json()["data"]


def test_search_filters(api: httpx.Client, images: ImageServer) -> None:
    """Every search takes the same filters as query parameters: source, added_after/before, data_id,
    location_prefix (a folder or URL prefix)."""
    cat = imgsmlr(api, "mgr/add", {"url": images.url("/cat.jpg"), "dataId": "cat-1"})["data"]["id"]
    upload = api.post("/api/items", files={"file": ("c.jpg", encode(photo("chelsea"), "JPEG", quality=70))})
    assert upload.status_code == 201
    query = {"file": ("q.jpg", images.files["/cat-mirror-small.jpg"])}

    def ids(**params: str) -> list[int]:
        response = api.post("/api/search/image", files=query, params=params)
        assert response.status_code == 200, response.text
        return [h["id"] for h in response.json()["results"]]

    both = ids()
    assert cat in both and upload.json()["id"] in both
    assert ids(source="url") == [cat]
    assert ids(source="upload") == [upload.json()["id"]]
    assert ids(location_prefix=images.base + "/") == [cat]
    assert ids(location_prefix="http://elsewhere/") == []
    assert ids(data_id="cat-1") == [cat]
    assert ids(added_after="2999-01-01T00:00:00Z") == []
    assert sorted(ids(added_before="2999-01-01T00:00:00Z")) == sorted(both)
    by_item = api.get(f"/api/search/item/{cat}", params={"source": "upload"}).json()["results"]
    assert [h["id"] for h in by_item] == [upload.json()["id"]]
    assert (
        api.post("/api/search/url", json={"url": images.url("/cat.jpg")}, params={"source": "url"}).json()["results"][
            0
        ]["id"]
        == cat
    )
    assert api.post("/api/search/image", files=query, params={"source": "ftp"}).status_code == 422
    assert api.post("/api/search/image", files=query, params={"added_after": "yesterday"}).status_code == 422
    assert api.get("/api/search/text", params={"q": "x", "source": "path"}).status_code == 200
