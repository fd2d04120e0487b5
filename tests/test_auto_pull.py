"""Download on first use, as a user meets it: a real AI service (``python -m ai_service``) or gateway
(``python -m gateway``, the README's ``make run``) on an empty model folder, a real HTTP server speaking
the Hugging Face Hub API (``tests.test_model_store.FakeHub``), requests sent exactly as Immich sends them.

The models are tiny random-weight graphs in Immich's layouts: the tests check that they arrive, are
served and are fetched once; their vectors mean nothing.
"""

from __future__ import annotations

import concurrent.futures
import io
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.builders.clip_models import build_clip_model
from tests.builders.face_models import arcface_random_model, scrfd_random_model, write_immich_pack
from tests.fake_hub import OWNER, FakeHub, files_of
from tests.gateway_support import gateway_process, immich_predict
from tests.servers import free_port, module_process

CLIP = "ViT-B-32__openai"  # Immich's default CLIP model: 512-d in Immich's table
FACES = "buffalo_l"
TEXT_ENTRIES = {"clip": {"textual": {"modelName": CLIP, "options": {"language": "en"}}}}
FACE_ENTRIES = {
    "facial-recognition": {
        "detection": {"modelName": FACES, "options": {"minScore": 0.7}},
        "recognition": {"modelName": FACES},
    }
}
OCR_ENTRIES = {
    "ocr": {
        "detection": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.5, "maxResolution": 736}},
        "recognition": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.8}},
    }
}


@pytest.fixture(scope="module")
def repo_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    src = tmp_path_factory.mktemp("hub-src")
    clip = files_of(build_clip_model(src / "clip", CLIP, kind="openclip", embed_dim=512, seed=7))
    pack = write_immich_pack(
        src / "faces", FACES, detection=scrfd_random_model(seed=3), recognition=arcface_random_model(seed=4)
    )
    return {CLIP: clip, FACES: files_of(pack)}


@pytest.fixture()
def hub(repo_files: dict[str, dict[str, bytes]]) -> Iterator[FakeHub]:
    server = FakeHub()
    for name, files in repo_files.items():
        server.add(f"{OWNER}/{name}", files)
    try:
        yield server
    finally:
        server.close()


def _env(tmp_path: Path, endpoint: str, **extra: str) -> dict[str, str]:
    return {
        "AI_SERVICE_MODEL_DIR": str(tmp_path / "models"),
        "AI_SERVICE_HF_ENDPOINT": endpoint,
        "AI_SERVICE_MODEL_REPO_OWNER": OWNER,
        "AI_SERVICE_MODEL_TTL": "0",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_OFFLINE": "0",
        **extra,
    }


@pytest.fixture()
def jpeg() -> bytes:
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _vector(body: dict[str, Any], key: str = "clip") -> np.ndarray:
    import orjson

    return np.asarray(orjson.loads(body[key]), dtype=np.float32)


def _downloads_per_file(hub: FakeHub, name: str) -> Counter[str]:
    prefix = f"/{OWNER}/{name}/resolve/"
    return Counter(path.split("/", 5)[-1] for path in hub.file_requests() if path.startswith(prefix))


def _installed(tmp_path: Path) -> list[str]:
    root = tmp_path / "models"
    return sorted(str(p.relative_to(root)) for p in root.glob("*/*") if not p.parent.name.startswith("."))


def test_make_run_on_an_empty_model_folder_answers_clip_and_faces(
    tmp_path: Path, hub: FakeHub, repo_files: dict[str, dict[str, bytes]], jpeg: bytes
) -> None:
    """The gateway with nothing configured (``make run``) answers Immich's defaults on first use."""
    with gateway_process(_env(tmp_path, hub.url), tmp_path / "gateway.log") as gw, httpx.Client() as client:
        text = immich_predict(client, gw.base, TEXT_ENTRIES, text="a dog on the beach", timeout=120)
        assert text.status_code == 200, text.text
        assert _vector(text.json()).shape == (512,)
        faces = immich_predict(client, gw.base, FACE_ENTRIES, image=jpeg, timeout=120)
        assert faces.status_code == 200, faces.text
        assert faces.json()["imageWidth"] == 512
        # Installed once: a second request downloads nothing more.
        again = immich_predict(client, gw.base, TEXT_ENTRIES, text="一只狗", timeout=60)
        assert again.status_code == 200
        status = gw.status()
    for name, files in repo_files.items():
        fetched = _downloads_per_file(hub, name)
        assert set(fetched) <= set(files) and fetched, fetched
        assert max(fetched.values()) == 1, fetched
    assert _installed(tmp_path) == [f"clip/{CLIP}", f"facial-recognition/{FACES}"]
    downloads = {d["model"]: d for d in status["backends"]["local"]["downloads"]}
    assert downloads[CLIP]["state"] == downloads[FACES]["state"] == "installed"
    assert "downloaded clip model ViT-B-32__openai" in gw.log_text()


def test_concurrent_first_requests_download_each_file_once(tmp_path: Path, hub: FakeHub) -> None:
    hub.file_delay_s = 0.3  # the download takes long enough for all eight requests to arrive during it
    env = _env(tmp_path, hub.url)
    with (
        module_process("ai_service", env, log=tmp_path / "ai.log") as server,
        httpx.Client() as client,
        concurrent.futures.ThreadPoolExecutor(8) as pool,
    ):
        replies = list(
            pool.map(
                lambda i: immich_predict(client, server.base, TEXT_ENTRIES, text=f"query {i}", timeout=120), range(8)
            )
        )
    assert [r.status_code for r in replies] == [200] * 8, [r.text for r in replies if r.status_code != 200]
    fetched = _downloads_per_file(hub, CLIP)
    assert fetched and set(fetched.values()) == {1}, fetched


def test_a_download_cut_mid_file_installs_nothing_and_the_next_request_succeeds(
    tmp_path: Path, hub: FakeHub
) -> None:
    repo = hub.repos[f"{OWNER}/{CLIP}"]
    repo.failures["textual/model.onnx"] = "truncate"
    env = _env(tmp_path, hub.url, AI_SERVICE_AUTO_PULL_RETRY_S="0")
    with module_process("ai_service", env, log=tmp_path / "ai.log") as server, httpx.Client() as client:
        first = immich_predict(client, server.base, TEXT_ENTRIES, text="a cat", timeout=120)
        assert first.status_code == 503, first.text
        detail = first.json()["detail"]
        assert CLIP in detail and f"models pull {CLIP}" in detail
        assert not (tmp_path / "models" / "clip").exists()
        assert not list((tmp_path / "models" / ".incoming").glob("*pull-*"))
        repo.failures.clear()  # the network is back
        second = immich_predict(client, server.base, TEXT_ENTRIES, text="a cat", timeout=120)
        assert second.status_code == 200, second.text
        assert _vector(second.json()).shape == (512,)


def test_an_unreachable_hub_answers_503_within_seconds_and_ocr_keeps_serving(tmp_path: Path, jpeg: bytes) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = _env(tmp_path, dead)
    with module_process("ai_service", env, log=tmp_path / "ai.log") as server, httpx.Client() as client:
        started = time.monotonic()
        reply = immich_predict(client, server.base, TEXT_ENTRIES, text="a cat", timeout=60)
        took = time.monotonic() - started
        assert reply.status_code == 503, reply.text
        assert took < 15, took
        detail = reply.json()["detail"]
        assert CLIP in detail and f"python -m ai_service models pull {CLIP}" in detail and dead in detail
        # A request right after gets the remembered failure at once, without another attempt.
        started = time.monotonic()
        assert immich_predict(client, server.base, TEXT_ENTRIES, text="a cat", timeout=60).status_code == 503
        assert time.monotonic() - started < 2
        ocr = immich_predict(client, server.base, OCR_ENTRIES, image=jpeg, timeout=120)
        assert ocr.status_code == 200, ocr.text
        status = httpx.get(server.base + "/status", timeout=5).json()
    (failed,) = status["downloads"]
    assert failed["model"] == CLIP and failed["state"] == "failed" and dead in failed["error"]


def test_a_hub_that_accepts_but_never_answers_fails_the_download_in_bounded_time(tmp_path: Path) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # connections are accepted by the kernel and then never answered
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        env = _env(tmp_path, endpoint, AI_SERVICE_HUB_TIMEOUT_S="2")
        with module_process("ai_service", env, log=tmp_path / "ai.log") as server, httpx.Client() as client:
            started = time.monotonic()
            reply = immich_predict(client, server.base, TEXT_ENTRIES, text="a cat", timeout=120)
            took = time.monotonic() - started
    assert reply.status_code == 503, reply.text
    assert "timed out" in reply.json()["detail"] and f"models pull {CLIP}" in reply.json()["detail"]
    assert took < 20, took


def test_auto_pull_off_downloads_nothing(tmp_path: Path, hub: FakeHub) -> None:
    env = _env(tmp_path, hub.url, AI_SERVICE_AUTO_PULL="false")
    with module_process("ai_service", env, log=tmp_path / "ai.log") as server, httpx.Client() as client:
        reply = immich_predict(client, server.base, TEXT_ENTRIES, text="a cat", timeout=60)
    assert reply.status_code == 503
    assert "is not installed" in reply.json()["detail"] and f"models pull {CLIP}" in reply.json()["detail"]
    assert hub.requests == []
    assert not (tmp_path / "models" / "clip").exists()


def test_a_request_waits_a_bounded_time_and_is_told_how_far_the_download_got(tmp_path: Path, hub: FakeHub) -> None:
    hub.file_delay_s = 1.5
    env = _env(tmp_path, hub.url, AI_SERVICE_AUTO_PULL_WAIT_S="0.5")
    with module_process("ai_service", env, log=tmp_path / "ai.log") as server, httpx.Client() as client:
        started = time.monotonic()
        early = immich_predict(client, server.base, TEXT_ENTRIES, text="a cat", timeout=60)
        assert time.monotonic() - started < 5
        assert early.status_code == 503
        assert "is being downloaded" in early.json()["detail"] and "MB so far" in early.json()["detail"]
        downloading = httpx.get(server.base + "/status", timeout=5).json()["downloads"]
        assert [(d["model"], d["state"]) for d in downloading] == [(CLIP, "downloading")]
        deadline = time.monotonic() + 60
        while True:
            reply = immich_predict(client, server.base, TEXT_ENTRIES, text="a cat", timeout=60)
            if reply.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert reply.status_code == 200, reply.text
    assert max(_downloads_per_file(hub, CLIP).values()) == 1


def test_an_installed_model_is_never_downloaded_again(tmp_path: Path, hub: FakeHub) -> None:
    build_clip_model(tmp_path / "models", CLIP, kind="openclip", embed_dim=512, seed=9)
    env = _env(tmp_path, hub.url)
    with module_process("ai_service", env, log=tmp_path / "ai.log") as server, httpx.Client() as client:
        assert immich_predict(client, server.base, TEXT_ENTRIES, text="a cat").status_code == 200
    assert hub.requests == []
