"""The remote backends against real servers on loopback.

* ``immich``: a second, real AI service process; the gateway's replies must equal the service's own.
* ``mtphotos``: the AI service's MT Photos endpoints (same models, other dialect), and a stub that
  reproduces the documented MT Photos quirks (numbers as strings, x/y/width/height boxes,
  un-normalised vectors, HTTP 200 with ``msg`` on errors).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.assets import NSFW_ENTRIES, astronaut_jpeg, preview_jpeg, sample_png
from tests.builders.clip_models import build_test_models
from tests.gateway_support import (
    MT_KEY,
    FaultServer,
    GatewayProcess,
    MtPhotosStub,
    fault_vector,
    gateway_process,
    immich_predict,
    mt_raw_vector,
)
from tests.immich_requests import clip_textual as clip_text
from tests.immich_requests import clip_visual, faces
from tests.servers import python_module_server

pytestmark = pytest.mark.timeout(180)

CLIP_MODEL = "test-cn-clip-512"
SERVICE_KEY = "svc-mt-key-abcdef123456"
CLIP_MAP = json.dumps({"ViT-B-32__openai": CLIP_MODEL})
CLIP_DIMS = json.dumps({CLIP_MODEL: 512})


def ocr(model: str = "PP-OCRv5_mobile", rec_min: float = 0.8) -> dict[str, Any]:
    return {
        "ocr": {
            "detection": {"modelName": model, "options": {"minScore": 0.5, "maxResolution": 736}},
            "recognition": {"modelName": model, "options": {"minScore": rec_min}},
        }
    }


def vector(value: str) -> np.ndarray:
    return np.asarray(json.loads(value), dtype=np.float64)


# Immich's buffalo_l answered by the bundled dlib model, by choice (no InsightFace pack in tests).
DLIB_MAP = json.dumps({"buffalo_l": "dlib"})


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, logs: Path) -> Iterator[str]:
    """A real AI service: Immich protocol on /predict, MT Photos API on /clip, /ocr, /represent."""
    models = build_test_models(tmp_path_factory.mktemp("models"))
    env = {
        "AI_SERVICE_MODEL_DIR": str(models),
        "AI_SERVICE_MTPHOTOS_API_KEY": SERVICE_KEY,
        "AI_SERVICE_MTPHOTOS_CLIP_MODEL": CLIP_MODEL,
        "AI_SERVICE_MTPHOTOS_FACE_MODEL": "dlib",  # the bundled model: no InsightFace pack in tests
    }
    with python_module_server("ai_service", env, log=logs / "ai_service.log") as base:
        yield base


@pytest.fixture(scope="module")
def via_immich(service: str, logs: Path) -> Iterator[GatewayProcess]:
    env = {
        "GATEWAY_BACKENDS": json.dumps({"svc": {"kind": "immich", "url": service}}),
        "GATEWAY_MODEL_MAP__CLIP": CLIP_MAP,
        "GATEWAY_MODEL_MAP__FACIAL_RECOGNITION": DLIB_MAP,
        "GATEWAY_CLIP_DIMENSIONS": CLIP_DIMS,
    }
    with gateway_process(env, logs / "gw_immich.log") as gw:
        yield gw


@pytest.fixture(scope="module")
def via_mtphotos(service: str, logs: Path) -> Iterator[GatewayProcess]:
    mt = {
        "kind": "mtphotos",
        "url": service,
        "api_key": SERVICE_KEY,
        "models": {"clip": CLIP_MODEL, "facial-recognition": "dlib"},
    }
    env = {
        "GATEWAY_BACKENDS": json.dumps({"mt": mt}),
        "GATEWAY_MODEL_MAP__CLIP": CLIP_MAP,
        "GATEWAY_MODEL_MAP__FACIAL_RECOGNITION": DLIB_MAP,
        "GATEWAY_CLIP_DIMENSIONS": CLIP_DIMS,
    }
    with gateway_process(env, logs / "gw_mt.log") as gw:
        yield gw


@pytest.fixture(scope="module")
def stub() -> Iterator[MtPhotosStub]:
    with MtPhotosStub().running() as s:
        yield s


@pytest.fixture(scope="module")
def backup() -> Iterator[FaultServer]:
    with FaultServer(tag="backup").running() as s:
        yield s


@pytest.fixture(scope="module")
def via_stub(stub: MtPhotosStub, backup: FaultServer, logs: Path) -> Iterator[GatewayProcess]:
    env = {
        "GATEWAY_BACKENDS": json.dumps(
            {
                "wrongkey": {"kind": "mtphotos", "url": stub.url, "api_key": "not-the-key-7f3a9c"},
                "stub": {"kind": "mtphotos", "url": stub.url, "api_key": MT_KEY},
                "backup": {"kind": "immich", "url": backup.url},
            }
        ),
        "GATEWAY_ROUTES__CLIP": '["stub","backup"]',
        "GATEWAY_ROUTES__OCR": '["stub"]',
        "GATEWAY_ROUTES__FACIAL_RECOGNITION": '["wrongkey","stub"]',
        # The stub runs MT Photos' defaults (cn-clip ViT-B-16, buffalo_l): map Immich's names onto them.
        "GATEWAY_MODEL_MAP__CLIP": json.dumps({"ViT-B-32__openai": "ViT-B-16__cn-clip"}),
        "GATEWAY_MODEL_MAP__FACIAL_RECOGNITION": "{}",
        "GATEWAY_BREAKER__FAILURE_THRESHOLD": "1000",
        "GATEWAY_HEALTH__INTERVAL_S": "0.2",
        "GATEWAY_HEALTH__FAILURE_THRESHOLD": "100",
    }
    with gateway_process(env, logs / "gw_stub.log") as gw:
        yield gw


def _direct(client: httpx.Client, base: str, entries: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    response = immich_predict(client, base, entries, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


# ---- immich backend ---------------------------------------------------------------------------------------


def test_immich_backend_replies_equal_the_service(
    client: httpx.Client, service: str, via_immich: GatewayProcess, shared_data: Path
) -> None:
    photo = preview_jpeg(astronaut_jpeg())
    text_page = (shared_data / "ocr" / "paddleocr_00056221.jpg").read_bytes()
    cases = [
        (clip_text(), clip_text(CLIP_MODEL), {"text": "海滩上的狗"}),
        (clip_visual(), clip_visual(CLIP_MODEL), {"image": photo}),
        (faces(), faces("dlib"), {"image": photo}),
        (NSFW_ENTRIES, NSFW_ENTRIES, {"image": sample_png("retina")}),  # not Immich's, but a task of the table
        (ocr(), ocr(), {"image": text_page}),
    ]
    for gateway_entries, service_entries, payload in cases:
        through = _direct(client, via_immich.base, gateway_entries, **payload)
        direct = _direct(client, service, service_entries, **payload)
        assert through == direct, f"{next(iter(gateway_entries))} differs through the gateway"
    assert len(through["ocr"]["text"]) >= 5


def test_immich_backend_passes_input_errors_unchanged(
    client: httpx.Client, service: str, via_immich: GatewayProcess
) -> None:
    through = immich_predict(client, via_immich.base, clip_visual(), image=b"not an image at all")
    direct = immich_predict(client, service, clip_visual(CLIP_MODEL), image=b"not an image at all")
    assert through.status_code == direct.status_code == 400
    assert through.content == direct.content


def test_immich_backend_builds_immichs_form_under_a_sub_path(client: httpx.Client, logs: Path) -> None:
    with FaultServer(tag="probe").running() as probe:
        env = {
            # No trailing slash: the gateway keeps the sub-path anyway (Immich itself would drop it).
            "GATEWAY_BACKENDS": json.dumps({"p": {"kind": "immich", "url": probe.url + "/ml"}}),
            "GATEWAY_MODEL_MAP__CLIP": json.dumps({"ViT-B-32__openai": "ViT-B-16__cn-clip"}),
        }
        with gateway_process(env, logs / "gw_probe.log") as gw:
            image = astronaut_jpeg()
            entries = {"clip": {"visual": {"modelName": "ViT-B-32__openai", "options": {"scoreMode": "fast"}}}}
            response = immich_predict(client, gw.base, entries, image=image, headers={"X-Request-ID": "sub-1"})
            # The probe answers with a vector but no image size: the stock service always sends one, so
            # such a reply does not validate and the gateway reports it rather than passing it on.
            assert response.status_code == 503 and "imageHeight" in response.text
            sent = next(r for r in probe.requests if r.method == "POST")
            assert sent.path == "/ml/predict"
            assert any(r.method == "GET" and r.path == "/ml/ping" for r in probe.requests)
            # The health check's protocol probe went to the same sub-path (kept apart by the server).
            assert probe.probes and all(r.path == "/ml/predict" for r in probe.probes)
            assert sent.headers["x-request-id"] == "sub-1"
            boundary = sent.headers["content-type"].split("boundary=")[1]
            assert boundary.startswith("----formdata-undici-0")
            parts = sent.body.split(b"--" + boundary.encode())
            assert parts[0] == b"" and parts[-1] == b"--\r\n" and len(parts) == 4
            head, _, value = parts[1].partition(b"\r\n\r\n")
            assert head == b'\r\nContent-Disposition: form-data; name="entries"'
            forwarded = json.loads(value.removesuffix(b"\r\n"))
            # Mapped name, and the option this gateway does not know is forwarded untouched.
            assert forwarded == {
                "clip": {"visual": {"modelName": "ViT-B-16__cn-clip", "options": {"scoreMode": "fast"}}}
            }
            head, _, value = parts[2].partition(b"\r\n\r\n")
            assert head == (
                b'\r\nContent-Disposition: form-data; name="image"; filename="blob"\r\n'
                b"Content-Type: application/octet-stream"
            )
            assert value.removesuffix(b"\r\n") == image


def _wait_for(check: Any, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def test_immich_backend_url_keeps_its_query_and_health_proves_predict(client: httpx.Client, logs: Path) -> None:
    """A backend reached through '?token=…' (a token-checking proxy): every request carries the query, and
    the health check fails when /ping answers but POST /predict does not speak Immich's protocol."""
    token = "token=tok-s3cret-77"
    with FaultServer(tag="tok", required_query=token).running() as server:
        env = {
            "GATEWAY_BACKENDS": json.dumps({"tok": {"kind": "immich", "url": f"{server.url}/?{token}"}}),
            "GATEWAY_MODEL_MAP__CLIP": json.dumps({"ViT-B-32__openai": "ViT-B-16__cn-clip"}),
            "GATEWAY_HEALTH__INTERVAL_S": "0.2",
            "GATEWAY_BREAKER__FAILURE_THRESHOLD": "1000",
        }
        with gateway_process(env, logs / "gw_token.log") as gw:
            _wait_for(lambda: gw.status()["backends"]["tok"]["up"] is True)
            body = _direct(client, gw.base, clip_text(), text="猫")
            assert body == {"clip": fault_vector("tok")}
            assert [r.path for r in server.requests if r.method == "POST"] == [f"/predict?{token}"]
            assert f"/ping?{token}" in {r.path for r in server.requests if r.method == "GET"}
            assert server.probes and {r.path for r in server.probes} == {f"/predict?{token}"}
            assert server.refused == [], "a request went out without the URL's query"
            status = gw.status()
            assert status["backends"]["tok"]["url"] == f"{server.url}/?token=***"

            # Now the URL leads to something that answers /ping but not Immich's /predict (405).
            server.predict_served = False
            response = immich_predict(client, gw.base, clip_text(), text="猫")
            assert response.status_code == 503 and "HTTP 405" in response.text
            # The failed predict makes the next checks probe /predict again: the backend is reported down.
            _wait_for(lambda: gw.status()["backends"]["tok"]["up"] is False)
            error = gw.status()["backends"]["tok"]["health_check"]["last_error"]
            assert "answered HTTP 405" in error and "does not lead to an Immich ML service" in error

            server.predict_served = True
            _wait_for(lambda: gw.status()["backends"]["tok"]["up"] is True)
            assert _direct(client, gw.base, clip_text(), text="猫") == {"clip": fault_vector("tok")}
            assert "tok-s3cret-77" not in gw.log_text() + json.dumps(gw.status())


# ---- mtphotos backend against the AI service's MT Photos endpoints -----------------------------------------


def test_mtphotos_backend_agrees_with_the_immich_protocol(
    client: httpx.Client, service: str, via_mtphotos: GatewayProcess, shared_data: Path
) -> None:
    photo = preview_jpeg(astronaut_jpeg())
    # CLIP: the same model behind both dialects; MT strings parse back to the same unit vector.
    for gateway_entries, service_entries, payload in [
        (clip_text(), clip_text(CLIP_MODEL), {"text": "一只猫在海滩上"}),
        (clip_visual(), clip_visual(CLIP_MODEL), {"image": photo}),
    ]:
        through = _direct(client, via_mtphotos.base, gateway_entries, **payload)
        direct = _direct(client, service, service_entries, **payload)
        assert set(through) == set(direct)
        assert cosine(vector(through["clip"]), vector(direct["clip"])) > 0.99999
        assert np.linalg.norm(vector(through["clip"])) == pytest.approx(1.0, abs=1e-5)
        for key in ("imageHeight", "imageWidth"):
            assert through.get(key) == direct.get(key)

    # Faces: boxes back in corner form, integer-valued; MT sends unit embeddings (cosine is unchanged).
    through = _direct(client, via_mtphotos.base, faces(), image=photo)
    direct = _direct(client, service, faces("dlib"), image=photo)
    assert (through["imageHeight"], through["imageWidth"]) == (direct["imageHeight"], direct["imageWidth"])
    assert len(through["facial-recognition"]) == len(direct["facial-recognition"]) >= 1
    for mine, theirs in zip(through["facial-recognition"], direct["facial-recognition"], strict=True):
        assert mine["boundingBox"] == theirs["boundingBox"]
        assert mine["score"] == pytest.approx(theirs["score"], abs=1e-6)
        assert cosine(vector(mine["embedding"]), vector(theirs["embedding"])) > 0.99999

    # OCR: MT Photos boxes are axis-aligned rectangles with 2-decimal pixels; same lines, same places.
    page = (shared_data / "ocr" / "paddleocr_00207393.jpg").read_bytes()
    through = _direct(client, via_mtphotos.base, ocr(), image=page)
    direct = _direct(client, service, ocr(), image=page)
    assert (through["imageHeight"], through["imageWidth"]) == (direct["imageHeight"], direct["imageWidth"])
    mine, theirs = through["ocr"], direct["ocr"]
    assert mine["text"] and set(mine["text"]) <= set(theirs["text"])
    # MT rounds scores to 2 decimals, so a line at 0.801 may fall to the '<= 0.8' rule; nothing else differs.
    assert len(mine["text"]) >= len(theirs["text"]) - 1
    for i, text in enumerate(mine["text"]):
        j = theirs["text"].index(text)
        quad = np.asarray(theirs["box"][8 * j : 8 * j + 8]).reshape(4, 2)
        (x0, y0), (x1, y1) = quad.min(axis=0), quad.max(axis=0)
        expected = [x0, y0, x1, y0, x1, y1, x0, y1]
        assert mine["box"][8 * i : 8 * i + 8] == pytest.approx(expected, abs=0.002)
        assert mine["textScore"][i] == pytest.approx(theirs["textScore"][j], abs=0.006)


def test_mtphotos_backend_refuses_a_clip_entry_of_the_other_type(
    client: httpx.Client, service: str, via_mtphotos: GatewayProcess, via_immich: GatewayProcess
) -> None:
    """MT Photos picks /clip/img or /clip/txt by what it is sent; the entry's type must still match, as on
    every other path: a clip.visual entry with only text (or clip.textual with an image) is a 400."""
    photo = preview_jpeg(astronaut_jpeg())
    cases = [
        (clip_visual(), clip_visual(CLIP_MODEL), {"text": "一只猫"}, "clip/visual needs an 'image' file"),
        (clip_text(), clip_text(CLIP_MODEL), {"image": photo}, "clip/textual needs a 'text' field, not an image"),
    ]
    for entries, service_entries, payload, message in cases:
        direct = immich_predict(client, service, service_entries, **payload)
        assert direct.status_code == 400 and direct.json() == {"detail": message}
        for gateway in (via_mtphotos, via_immich):
            through = immich_predict(client, gateway.base, entries, **payload)
            assert through.status_code == 400, (gateway.base, through.text)
            assert through.json() == direct.json()


def test_mtphotos_backend_skips_a_server_running_another_model(
    client: httpx.Client, via_mtphotos: GatewayProcess
) -> None:
    response = immich_predict(client, via_mtphotos.base, clip_text("ViT-L-14__openai"), text="cat")
    assert response.status_code == 503
    assert "runs clip model 'test-cn-clip-512'" in response.json()["detail"]


def test_mtphotos_backend_is_never_asked_for_a_task_mt_photos_lacks(
    client: httpx.Client, via_mtphotos: GatewayProcess
) -> None:
    response = immich_predict(client, via_mtphotos.base, NSFW_ENTRIES, image=sample_png("retina"))
    assert response.status_code == 503
    assert "mt: MT Photos has no nsfw endpoint" in response.json()["detail"]


# ---- mtphotos backend against a stub with MT Photos' quirks ------------------------------------------------------


def _jpeg(size: tuple[int, int], orientation: int | None = None) -> bytes:
    image = Image.new("RGB", size, (200, 180, 160))
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif)
    return buf.getvalue()


def test_mtphotos_clip_strings_become_unit_vectors(
    client: httpx.Client, stub: MtPhotosStub, via_stub: GatewayProcess
) -> None:
    stub.mode = "ok"
    body = _direct(client, via_stub.base, clip_text(), text="飞机")
    expected = mt_raw_vector("飞机".encode())
    got = vector(body["clip"])
    assert body.keys() == {"clip"} and got.shape == (512,)
    assert np.linalg.norm(expected) > 5, "the stub's vectors are un-normalised, like cn-clip's raw features"
    np.testing.assert_allclose(got, expected / np.linalg.norm(expected), atol=1e-6)
    assert stub.headers_seen[-1]["api-key"] == MT_KEY

    # A photo stored with EXIF orientation 6 (rotated 90°): Immich must get the upright size.
    photo = _jpeg((300, 200), orientation=6)
    body = _direct(client, via_stub.base, clip_visual(), image=photo)
    assert (body["imageWidth"], body["imageHeight"]) == (200, 300)
    np.testing.assert_allclose(
        vector(body["clip"]) @ (mt_raw_vector(photo) / np.linalg.norm(mt_raw_vector(photo))), 1.0
    )


def test_mtphotos_ocr_becomes_immich_quads(client: httpx.Client, stub: MtPhotosStub, via_stub: GatewayProcess) -> None:
    stub.mode = "ok"
    width, height = 800, 400
    body = _direct(client, via_stub.base, ocr(), image=_jpeg((width, height)))
    assert (body["imageWidth"], body["imageHeight"]) == (width, height)
    result = body["ocr"]
    # minScore 0.8 drops "0.79" and the line at exactly "0.80"; reading order is top-down, left-right.
    assert result["text"] == ["第一行", "第二行左", "第二行右"]
    assert result["textScore"] == [0.99, 0.95, 0.97] and result["boxScore"] == result["textScore"]
    x, y, w, h = 10.0, 10.0, 400.0, 40.0  # 第一行
    assert result["box"][:8] == pytest.approx(
        [
            x / width,
            y / height,
            (x + w) / width,
            y / height,
            (x + w) / width,
            (y + h) / height,
            x / width,
            (y + h) / height,
        ]
    )
    assert len(result["box"]) == 24 and all(0.0 <= v <= 1.0 for v in result["box"])

    lenient = _direct(client, via_stub.base, ocr(rec_min=0.5), image=_jpeg((width, height)))
    assert lenient["ocr"]["text"] == ["第一行", "第二行左", "第二行右", "刚好0.80", "低分行"]


def test_mtphotos_faces_become_corner_boxes(client: httpx.Client, stub: MtPhotosStub, via_stub: GatewayProcess) -> None:
    stub.mode = "ok"
    photo = _jpeg((640, 480))
    body = _direct(client, via_stub.base, faces(min_score=0.7), image=photo)
    assert (body["imageWidth"], body["imageHeight"]) == (640, 480)
    [face] = body["facial-recognition"]  # the 0.5-confidence face is below minScore
    assert face["boundingBox"] == {"x1": 212.0, "y1": 112.0, "x2": 391.0, "y2": 362.0}
    assert face["score"] == 0.98 and len(json.loads(face["embedding"])) == 512
    assert len(_direct(client, via_stub.base, faces(min_score=0.4), image=photo)["facial-recognition"]) == 2
    # The route starts with a backend whose key is wrong: it failed over, and said why in the metrics.
    metrics = client.get(via_stub.base + "/metrics").text
    assert 'gateway_backend_errors_total{backend="wrongkey",kind="http_status",task="facial-recognition"}' in metrics


def test_mtphotos_200_with_msg_is_a_failure_never_an_empty_answer(
    client: httpx.Client, stub: MtPhotosStub, backup: FaultServer, via_stub: GatewayProcess
) -> None:
    try:
        for mode in ("msg", "empty"):
            stub.mode = mode
            # CLIP fails over to the next backend instead of handing Immich "[]".
            body = _direct(client, via_stub.base, clip_text(), text="飞机")
            assert body == {"clip": fault_vector("backup")}, mode
        stub.mode = "msg"
        # OCR has no other backend: a 503 that carries MT Photos' own message.
        response = immich_predict(client, via_stub.base, ocr(), image=_jpeg((100, 100)))
        assert response.status_code == 503
        assert "CUDA out of memory (stub)" in response.json()["detail"]
    finally:
        stub.mode = "ok"


def test_mtphotos_health_check_and_keys_stay_secret(
    client: httpx.Client, stub: MtPhotosStub, via_stub: GatewayProcess
) -> None:
    stub.mode = "ok"
    # An earlier test may have left the stub failing its checks: give the next checks (every 0.2 s) time to pass.
    deadline = time.monotonic() + 10
    status = via_stub.status()
    while status["backends"]["stub"]["up"] is not True and time.monotonic() < deadline:
        time.sleep(0.2)
        status = via_stub.status()
    assert status["backends"]["stub"]["up"] is True
    assert stub.calls["/check"] >= 1
    wrong = status["backends"]["wrongkey"]
    assert wrong["up"] is False and "API key rejected" in wrong["health_check"]["last_error"]
    # Neither key appears in /status or in the logs, although both travel in every request.
    for text in (json.dumps(status), via_stub.log_text()):
        assert MT_KEY not in text and "not-the-key-7f3a9c" not in text
