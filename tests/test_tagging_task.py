"""The 'tagging' task: a RAM++-layout ONNX tagger (tiny, random weights, built with onnx.helper) and the
zero-shot CLIP tagger, through the AI service's /predict, the gateway (an MT Photos backend is skipped, never
sent to another task's endpoint) and the library's 'tags' step (in-process and over LIBRARY_INFERENCE_URL).
The tagger's expected scores are computed here from its weights, independently of the service's code."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image
from pydantic import ValidationError

from ai_service.tasks import TASKS, InvalidReply
from ai_service.tasks.tagging import MAX_TAGS, TAGGING
from gateway.settings import GatewaySettings
from library import tags
from library.service import Library
from tests.builders.clip_models import build_test_models
from tests.builders.tagging_models import TAGS, build_ram_tagger
from tests.gateway_support import MT_KEY, MtPhotosStub, gateway_process, immich_predict, metric_value
from tests.library_support import library_env, settings_from
from tests.servers import python_module_server

RAM = "test-ram-tiny"
CLIP = "test-cn-clip-512"
COLOURS = [(200, 30, 30), (20, 180, 60), (30, 40, 220), (240, 240, 240), (10, 10, 10)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny RAM++-layout tagger beside the tiny CLIP test models (their own folder: nothing shared)."""
    root = tmp_path_factory.mktemp("tag-models")
    build_ram_tagger(root, RAM)
    clip_root = build_test_models(tmp_path_factory.mktemp("clip-models"))
    shutil.copytree(clip_root / "clip" / CLIP, root / "clip" / CLIP)
    return root


@pytest.fixture(scope="module")
def ai_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("logs") / "ai_service.log"
    with python_module_server("ai_service", {"AI_SERVICE_MODEL_DIR": str(model_dir)}, log=log) as base:
        yield base


def solid_png(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (50, 40), colour).save(out, "PNG")
    return out.getvalue()


def expected_ram_tags(model_dir: Path, colour: tuple[int, int, int]) -> list[tuple[str, str, float]]:
    """What the tagger must answer for a one-colour image: resizing keeps the colour, so the graph's pooled
    input is the normalised colour itself; sigmoid(x @ W + b) against the per-tag thresholds file."""
    folder = model_dir / "tagging" / RAM
    graph = onnx.load(str(folder / "visual" / "model.onnx")).graph
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    x = (np.asarray(colour, np.float64) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    scores = 1 / (1 + np.exp(-(x @ weights["w"] + weights["b"])))
    limits = [float(v) for v in (folder / "ram_tag_list_threshold.txt").read_text().split()]
    kept = [(TAGS[i][0], TAGS[i][1], float(scores[i])) for i in range(len(TAGS)) if scores[i] >= limits[i]]
    return sorted(kept, key=lambda t: -t[2])


def test_the_task_table_has_tagging_and_mt_photos_cannot_serve_it() -> None:
    assert TASKS["tagging"] is TAGGING and not TAGGING.on_mtphotos
    backends = {"mt": {"kind": "mtphotos", "url": "http://127.0.0.1:9", "api_key": "k"}, "local": {"kind": "local"}}
    settings = GatewaySettings(backends=backends)
    assert settings.timeout("tagging") == TAGGING.timeout_s  # per-task defaults come from the table
    assert GatewaySettings.per_task_defaults()["timeouts"]["tagging"] == TAGGING.timeout_s
    with pytest.raises(ValidationError, match="MT Photos has no tagging"):
        GatewaySettings(backends=backends, routes={"tagging": ["mt", "local"]})


def test_reply_validation() -> None:
    good = [{"tag": "cat", "zh": "猫", "score": 0.9}, {"tag": "dog", "score": 1}]
    assert TAGGING.check_reply(good, {}, None) == [
        {"tag": "cat", "zh": "猫", "score": 0.9},
        {"tag": "dog", "zh": "dog", "score": 1.0},
    ]
    for bad in (
        {"tag": "cat"},
        [{"tag": "", "score": 0.5}],
        [{"tag": "cat", "score": "0.5"}],
        [{"tag": "cat", "score": True}],
        [{"tag": "cat", "zh": 3, "score": 0.5}],
        [{"tag": f"t{n}", "score": 0.5} for n in range(MAX_TAGS + 1)],
    ):
        with pytest.raises(InvalidReply):
            TAGGING.check_reply(bad, {}, None)


def test_ram_layout_tagger_through_predict(ai_server: str, model_dir: Path) -> None:
    entries = {"tagging": {"visual": {"modelName": RAM}}}
    with httpx.Client(timeout=60) as client:
        seen: set[str] = set()
        for colour in COLOURS:
            response = immich_predict(client, ai_server, entries, image=solid_png(colour))
            assert response.status_code == 200, response.text
            reply = response.json()
            assert (reply["imageWidth"], reply["imageHeight"]) == (50, 40)
            expected = expected_ram_tags(model_dir, colour)
            assert [(t["tag"], t["zh"]) for t in reply["tagging"]] == [(en, zh) for en, zh, _ in expected]
            assert [t["score"] for t in reply["tagging"]] == pytest.approx([s for _, _, s in expected], abs=1e-5)
            seen.update(t["tag"] for t in reply["tagging"])
        assert len(seen) >= 2  # the colours do move tags across their thresholds
        # minScore replaces the per-tag thresholds: 0 keeps every tag.
        everything = {"tagging": {"visual": {"modelName": RAM, "options": {"minScore": 0}}}}
        reply = immich_predict(client, ai_server, everything, image=solid_png(COLOURS[0])).json()
        assert len(reply["tagging"]) == len(TAGS)
        # Text is not an input of tagging; an unknown model names what is installed.
        assert immich_predict(client, ai_server, entries, text="cat").status_code == 400
        missing = immich_predict(client, ai_server, {"tagging": {"visual": {"modelName": "nope"}}}, image=b"x")
        assert missing.status_code in (400, 404) and RAM in missing.text
        wrong_type = immich_predict(client, ai_server, {"tagging": {"textual": {"modelName": RAM}}}, text="cat")
        assert wrong_type.status_code in (400, 422)


def test_zero_shot_tagger_through_predict(ai_server: str) -> None:
    """Scores are the cosine of the image's CLIP embedding and each tag prompt's, checked with the service's
    own CLIP embeddings of the same image and prompts."""
    image = solid_png((120, 80, 200))
    entries = {"tagging": {"visual": {"modelName": CLIP, "options": {"minScore": 0}}}}
    with httpx.Client(timeout=120) as client:
        found = immich_predict(client, ai_server, entries, image=image).json()["tagging"]
        assert 0 < len(found) <= MAX_TAGS
        assert [t["score"] for t in found] == sorted((t["score"] for t in found), reverse=True)
        names = {t.en: t.zh for t in tags.vocabulary()}
        assert all(names[t["tag"]] == t["zh"] and t["score"] >= 0 for t in found)
        visual = immich_predict(client, ai_server, {"clip": {"visual": {"modelName": CLIP}}}, image=image).json()
        vector = np.asarray(json.loads(visual["clip"]))
        for t in found[:3]:
            text = immich_predict(
                client, ai_server, {"clip": {"textual": {"modelName": CLIP}}}, text=f"一张{t['zh']}的照片。"
            )
            assert float(vector @ np.asarray(json.loads(text.json()["clip"]))) == pytest.approx(t["score"], abs=1e-4)


def test_gateway_skips_mt_photos_for_tagging(model_dir: Path, tmp_path: Path) -> None:
    with MtPhotosStub().running() as stub:
        env = {
            "AI_SERVICE_MODEL_DIR": str(model_dir),
            "GATEWAY_BACKENDS": json.dumps(
                {"mt": {"kind": "mtphotos", "url": stub.url, "api_key": MT_KEY}, "local": {"kind": "local"}}
            ),
        }
        with gateway_process(env, tmp_path / "gw.log") as gw, httpx.Client(timeout=60) as client:
            entries = {"tagging": {"visual": {"modelName": RAM}}}
            response = immich_predict(client, gw.base, entries, image=solid_png(COLOURS[1]))
            assert response.status_code == 200, response.text
            expected = expected_ram_tags(model_dir, COLOURS[1])
            assert [t["tag"] for t in response.json()["tagging"]] == [en for en, _, _ in expected]
            metrics = client.get(gw.base + "/metrics").text
            assert (
                metric_value(metrics, "gateway_backend_requests_total", backend="local", task="tagging", outcome="ok")
                == 1
            )
        assert set(stub.calls) <= {"/check"}  # MT Photos was never asked to tag


def _ram_library(postgres_uri: str, data: Path, **extra: str) -> Library:
    env = library_env(postgres_uri, data, LIBRARY_TAG_MODEL=RAM, LIBRARY_TAGS_TOP_K="3", **extra)
    return Library(settings_from(env))


@pytest.mark.parametrize("where", ["in-process", "inference-url"])
def test_ram_layout_tagger_in_the_library_pipeline(
    where: str, postgres_uri: str, model_dir: Path, ai_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AI_SERVICE_MODEL_DIR", str(model_dir))
    extra = {"LIBRARY_INFERENCE_URL": ai_server} if where == "inference-url" else {}
    lib = _ram_library(postgres_uri, tmp_path / "data", **extra)
    try:
        ids = {c: lib.ingestor.add_bytes(solid_png(c), source="upload", location="x").item_id for c in COLOURS}
        lib.pipeline.run_until_idle()
        with lib.db.conn() as conn:
            steps = conn.execute("SELECT DISTINCT name, state FROM step WHERE name = 'tags'").fetchall()
            assert steps == [("tags", "done")]
            for colour, item_id in ids.items():
                expected = expected_ram_tags(model_dir, colour)[:3]
                stored = tags.item_tags(conn, item_id)
                assert [(t["tag"], t["zh"]) for t in stored] == [(en, zh) for en, zh, _ in expected]
                assert [t["score"] for t in stored] == pytest.approx([s for _, _, s in expected], abs=1e-5)
            counts = {f["tag"]: f for f in tags.facets(conn, 100, "zh")}
        for en, zh in TAGS:
            having = sum(en in {t[0] for t in expected_ram_tags(model_dir, c)[:3]} for c in COLOURS)
            if having:
                assert (counts[en]["count"], counts[en]["name"]) == (having, zh)
            else:
                assert en not in counts
    finally:
        lib.close()
