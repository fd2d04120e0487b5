"""The gateway as the Immich server uses it: a real ``python -m gateway`` process with the in-process
``local`` backend, called with the exact multipart Immich's Node FormData sends, and every reply
consumed the way Immich consumes it - embedding strings go straight into pgvector columns of a real
PostgreSQL, face boxes into integer columns, OCR boxes into real columns.
"""

from __future__ import annotations

import io
import json
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psycopg
import pytest
from PIL import Image

from tests.assets import NSFW_ENTRIES, astronaut_jpeg, preview_jpeg, reference_nsfw, sample_png
from tests.builders.clip_models import build_test_models
from tests.gateway_support import GatewayProcess, gateway_process, immich_predict, metric_value, node_formdata
from tests.immich_requests import CLIP_VISUAL, FACES, OCR, clip_textual

pytestmark = pytest.mark.timeout(180)

CLIP_MODEL = "test-cn-clip-512"  # tiny towers, but cn-clip's layout and ViT-B-16's 512-d output
MAX_BODY = 6 * 1024 * 1024


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    models = build_test_models(tmp_path_factory.mktemp("models"))
    env = {
        "AI_SERVICE_MODEL_DIR": str(models),
        # Immich's default CLIP name and a cn-clip/ prefix route both answered by the 512-d test model;
        # Immich's buffalo_l answered by the bundled dlib model, the offline choice (no InsightFace pack here).
        "GATEWAY_MODEL_MAP__CLIP": json.dumps({"ViT-B-32__openai": CLIP_MODEL, "cn-clip/": CLIP_MODEL}),
        "GATEWAY_MODEL_MAP__FACIAL_RECOGNITION": json.dumps({"buffalo_l": "dlib"}),
        "GATEWAY_CLIP_DIMENSIONS": json.dumps({CLIP_MODEL: 512}),
        "GATEWAY_MAX_BODY_BYTES": str(MAX_BODY),
    }
    with gateway_process(env, tmp_path_factory.mktemp("logs") / "gateway.log") as gw:
        yield gw


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def immich_db(postgres_uri: str) -> Iterator[psycopg.Connection]:
    """Immich's ML-fed tables with the column types that matter (pgvector, integer boxes, real OCR)."""
    with psycopg.connect(postgres_uri, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS gw_immich CASCADE")
        conn.execute("CREATE SCHEMA gw_immich")
        conn.execute("SET search_path TO gw_immich, public")
        conn.execute('CREATE TABLE smart_search ("assetId" int PRIMARY KEY, embedding vector(512) NOT NULL)')
        conn.execute(
            'CREATE TABLE asset_face (id serial PRIMARY KEY, "assetId" int NOT NULL, '
            '"imageWidth" integer NOT NULL, "imageHeight" integer NOT NULL, '
            '"boundingBoxX1" integer NOT NULL, "boundingBoxY1" integer NOT NULL, '
            '"boundingBoxX2" integer NOT NULL, "boundingBoxY2" integer NOT NULL)'
        )
        conn.execute('CREATE TABLE face_search ("faceId" int PRIMARY KEY, embedding vector(512) NOT NULL)')
        conn.execute(
            'CREATE TABLE asset_ocr (id serial PRIMARY KEY, "assetId" int NOT NULL, '
            "x1 real, y1 real, x2 real, y2 real, x3 real, y3 real, x4 real, y4 real, "
            '"boxScore" real NOT NULL, "textScore" real NOT NULL, text text NOT NULL)'
        )
        yield conn


def js_number(value: float) -> str:
    """How node-postgres sends a JS number: String(n) ('174' for 174.0, '174.5' otherwise)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# ---- the basic endpoints -----------------------------------------------------------------------------


def test_root_and_ping_as_the_stock_service(client: httpx.Client, gateway: GatewayProcess) -> None:
    root = client.get(gateway.base + "/")
    assert root.status_code == 200 and root.json() == {"message": "Immich ML"}
    assert root.headers["content-type"] == "application/json"
    ping = client.get(gateway.base + "/ping")
    assert ping.status_code == 200 and ping.text == "pong"
    assert ping.headers["content-type"].startswith("text/plain")


# ---- CLIP ---------------------------------------------------------------------------------------------


def test_clip_textual_goes_into_pgvector(
    client: httpx.Client, gateway: GatewayProcess, immich_db: psycopg.Connection
) -> None:
    queries = ["海滩上的狗", "a dog on the beach", "红色的车"]
    for asset_id, query in enumerate(queries, start=1):
        response = immich_predict(client, gateway.base, clip_textual(), text=query)
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"clip"}, "text requests carry no image dimensions"
        assert isinstance(body["clip"], str)
        immich_db.execute("INSERT INTO smart_search VALUES (%s, %s)", (asset_id, body["clip"]))
    # Immich's search: ORDER BY embedding <=> $query. The same query must find its own row first.
    query_vector = immich_predict(client, gateway.base, clip_textual(language=None), text=queries[1]).json()["clip"]
    rows = immich_db.execute(
        'SELECT "assetId", embedding <=> %s AS d FROM smart_search ORDER BY d LIMIT 3', (query_vector,)
    ).fetchall()
    assert rows[0][0] == 2 and rows[0][1] == pytest.approx(0.0, abs=1e-5)
    norm = immich_db.execute('SELECT vector_norm(embedding) FROM smart_search WHERE "assetId" = 2').fetchone()
    assert norm is not None and norm[0] == pytest.approx(1.0, abs=1e-4)


def test_clip_visual_with_image_dimensions(
    client: httpx.Client, gateway: GatewayProcess, immich_db: psycopg.Connection
) -> None:
    preview = preview_jpeg(astronaut_jpeg())
    response = immich_predict(client, gateway.base, CLIP_VISUAL, image=preview)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"clip", "imageHeight", "imageWidth"}
    assert (body["imageWidth"], body["imageHeight"]) == Image.open(io.BytesIO(preview)).size
    immich_db.execute("INSERT INTO smart_search VALUES (100, %s)", (body["clip"],))
    # The server sends the visual entry without options; the load test sends "options":{}: same answer.
    again = immich_predict(
        client, gateway.base, {"clip": {"visual": {"modelName": "ViT-B-32__openai", "options": {}}}}, image=preview
    )
    assert again.json()["clip"] == body["clip"]


def test_clip_prefix_route_and_its_dimension_check(client: httpx.Client, gateway: GatewayProcess) -> None:
    direct = immich_predict(client, gateway.base, clip_textual(), text="一只猫").json()["clip"]
    routed = immich_predict(client, gateway.base, clip_textual("cn-clip/ViT-B-16__openai"), text="一只猫")
    assert routed.status_code == 200 and routed.json()["clip"] == direct
    # Immich would size its column at 768 for this name; the route's model gives 512: refuse, loudly.
    wrong = immich_predict(client, gateway.base, clip_textual("cn-clip/ViT-L-14__openai"), text="一只猫")
    assert wrong.status_code == 422
    detail = wrong.json()["detail"]
    assert "768" in detail and "512" in detail and "cn-clip/ViT-L-14__openai" in detail


# ---- faces -----------------------------------------------------------------------------------------------


def test_faces_as_immich_stores_them(
    client: httpx.Client, gateway: GatewayProcess, immich_db: psycopg.Connection
) -> None:
    preview = preview_jpeg(astronaut_jpeg())
    response = immich_predict(client, gateway.base, FACES, image=preview)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"facial-recognition", "imageHeight", "imageWidth"}
    faces = body["facial-recognition"]
    assert len(faces) >= 1, "the astronaut photo has a face and Immich's default name must be answered"
    for face in faces:
        box = face["boundingBox"]
        assert all(float(box[k]).is_integer() for k in ("x1", "y1", "x2", "y2"))
        assert face["score"] >= 0.7
        assert len(json.loads(face["embedding"])) == 512
        # Exactly as Immich writes them: numbers as node-postgres renders them, into integer columns.
        row = immich_db.execute(
            'INSERT INTO asset_face ("assetId", "imageWidth", "imageHeight", "boundingBoxX1", "boundingBoxY1", '
            '"boundingBoxX2", "boundingBoxY2") VALUES (1, %s, %s, %s, %s, %s, %s) RETURNING id',
            (
                js_number(body["imageWidth"]),
                js_number(body["imageHeight"]),
                *(js_number(box[k]) for k in ("x1", "y1", "x2", "y2")),
            ),
        ).fetchone()
        assert row is not None
        immich_db.execute("INSERT INTO face_search VALUES (%s, %s)", (row[0], face["embedding"]))
    # The face sits in the upper middle of the astronaut photo.
    box = faces[0]["boundingBox"]
    assert 0 < box["x1"] < box["x2"] <= body["imageWidth"] and 0 < box["y1"] < box["y2"] < body["imageHeight"] / 2

    # minScore is applied per request: nothing passes 1.0, and the reply keeps its shape.
    strict = json.loads(json.dumps(FACES))
    strict["facial-recognition"]["detection"]["options"]["minScore"] = 1.0
    empty = immich_predict(client, gateway.base, strict, image=preview).json()
    assert empty == {"facial-recognition": [], "imageHeight": body["imageHeight"], "imageWidth": body["imageWidth"]}


# ---- OCR ---------------------------------------------------------------------------------------------------


def test_ocr_boxes_normalised_and_stored(
    client: httpx.Client, gateway: GatewayProcess, immich_db: psycopg.Connection, shared_data: Path
) -> None:
    image = (shared_data / "ocr" / "cnocr_multi-line_cn1.png").read_bytes()
    response = immich_predict(client, gateway.base, OCR, image=image)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"ocr", "imageHeight", "imageWidth"}
    ocr = body["ocr"]
    n = len(ocr["text"])
    assert n >= 5
    assert len(ocr["box"]) == 8 * n and len(ocr["boxScore"]) == n and len(ocr["textScore"]) == n
    assert all(0.0 <= v <= 1.0 for v in ocr["box"])
    assert all(s > 0.8 for s in ocr["textScore"])
    tops = [min(ocr["box"][8 * i + 1 : 8 * i + 8 : 2]) for i in range(n)]
    assert tops == sorted(tops), "lines come top to bottom"
    assert "每一个手机号码和邮件地址背后" in "".join(ocr["text"])
    for i, text in enumerate(ocr["text"]):
        immich_db.execute(
            'INSERT INTO asset_ocr ("assetId", x1, y1, x2, y2, x3, y3, x4, y4, "boxScore", "textScore", text) '
            "VALUES (1, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (*ocr["box"][8 * i : 8 * i + 8], ocr["boxScore"][i], ocr["textScore"][i], text),
        )
    count = immich_db.execute("SELECT count(*) FROM asset_ocr").fetchone()
    assert count is not None and count[0] == n


def test_nsfw_is_routed_to_the_local_backend(client: httpx.Client, gateway: GatewayProcess) -> None:
    """Not an Immich task, but one of the table: routed, run in-process and answered like the others."""
    for name in ("retina", "astronaut"):
        data = sample_png(name)
        response = immich_predict(client, gateway.base, NSFW_ENTRIES, image=data)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body.keys() == {"nsfw", "imageHeight", "imageWidth"}
        assert body["nsfw"]["score"] == pytest.approx(reference_nsfw(data), abs=1e-5)
    response = immich_predict(client, gateway.base, NSFW_ENTRIES, text="no image")
    assert response.status_code == 400 and "needs an 'image'" in response.json()["detail"]
    metrics = client.get(gateway.base + "/metrics").text
    assert metric_value(metrics, "gateway_backend_requests_total", backend="local", task="nsfw", outcome="ok") >= 2
    assert client.get(gateway.base + "/status").json()["routes"]["nsfw"]["backends"] == ["local"]


# ---- errors exactly where the stock service has them ------------------------------------------------------


def _raw_post(client: httpx.Client, base: str, content_type: str, body: bytes) -> httpx.Response:
    return client.post(base + "/predict", content=body, headers={"content-type": content_type})


def test_bad_requests_get_the_stock_statuses(client: httpx.Client, gateway: GatewayProcess) -> None:
    base = gateway.base
    # 'entries' missing: FastAPI's own validation error, a list in 'detail'.
    boundary = "----formdata-undici-012345678901"
    only_text = f'--{boundary}\r\nContent-Disposition: form-data; name="text"\r\n\r\nhi\r\n--{boundary}--\r\n'
    missing = _raw_post(client, base, f"multipart/form-data; boundary={boundary}", only_text.encode())
    assert missing.status_code == 422 and isinstance(missing.json()["detail"], list)
    # 'entries' that is not JSON, or of the wrong shape.
    for bad in (
        "{not json",
        '{"clip":{"textual":{}}}',
        '{"clip":{"detection":{"modelName":"x"}}}',
        "{}",
        '{"video":{"visual":{"modelName":"x"}}}',  # an unknown task is an error, never another task
    ):
        content_type, body = node_formdata({}, text="hi")
        body = body.replace(b"{}", bad.encode(), 1)
        response = _raw_post(client, base, content_type, body)
        assert response.status_code == 422, (bad, response.text)
    # Neither image nor text.
    content_type, body = node_formdata(clip_textual())
    response = _raw_post(client, base, content_type, body)
    assert response.status_code == 400 and response.json() == {"detail": "Either image or text must be provided"}
    # A dependent entry without its dependency.
    recognition_only = {"facial-recognition": {"recognition": {"modelName": "buffalo_l"}}}
    response = immich_predict(client, base, recognition_only, image=astronaut_jpeg())
    assert response.status_code == 400 and "depends on" in response.json()["detail"]
    # Bytes that are no image: the backend's 400 comes back unchanged (no failover for bad input).
    response = immich_predict(client, base, CLIP_VISUAL, image=b"definitely not an image")
    assert response.status_code == 400 and "decoded" in response.json()["detail"]
    # A model nobody has: 503 naming the backend and why.
    response = immich_predict(client, base, clip_textual("ViT-L-14__openai"), text="cat")
    assert response.status_code == 503
    assert "local" in response.json()["detail"] and "ViT-L-14__openai" in response.json()["detail"]
    # Over the body limit: 413 before the body is parsed.
    response = immich_predict(client, base, CLIP_VISUAL, image=b"\xff" * (MAX_BODY + 1))
    assert response.status_code == 413 and "GATEWAY_MAX_BODY_BYTES" in response.json()["detail"]


def test_forms_in_other_shapes_get_the_same_answer(client: httpx.Client, gateway: GatewayProcess) -> None:
    """Immich's exact form takes the gateway's fast path (gateway/fastpath.py); other shapes go through
    FastAPI's form parsing. Both must answer alike."""
    content_type, body = node_formdata(clip_textual(), text="海滩上的一只狗")
    reference = _raw_post(client, gateway.base, content_type, body)
    assert reference.status_code == 200, reference.text
    extra_part = b'Content-Disposition: form-data; name="note"\r\n\r\nfrom a script\r\n'
    boundary = content_type.split("boundary=")[1].encode()
    for other in (
        body.replace(b'name="text"\r\n', b'name="text"\r\nContent-Type: text/plain; charset=utf-8\r\n'),
        body.replace(b"--" + boundary + b"--", b"--" + boundary + b"\r\n" + extra_part + b"--" + boundary + b"--"),
    ):
        response = _raw_post(client, gateway.base, content_type, other)
        assert response.status_code == 200, response.text
        assert response.json() == reference.json()


def test_image_wins_over_text(client: httpx.Client, gateway: GatewayProcess) -> None:
    content_type, body = node_formdata(CLIP_VISUAL, image=astronaut_jpeg())
    # Append a text part as well (Immich never does; its service ignores text when an image is there).
    text_part = b'Content-Disposition: form-data; name="text"\r\n\r\nignored\r\n'
    boundary = content_type.split("boundary=")[1].encode()
    body = body.replace(b"--" + boundary + b"--", b"--" + boundary + b"\r\n" + text_part + b"--" + boundary + b"--")
    response = _raw_post(client, gateway.base, content_type, body)
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"clip", "imageHeight", "imageWidth"}


def test_request_id_is_echoed_or_made(client: httpx.Client, gateway: GatewayProcess) -> None:
    response = immich_predict(client, gateway.base, clip_textual(), text="猫", headers={"X-Request-ID": "immich-42"})
    assert response.headers["x-request-id"] == "immich-42"
    made = immich_predict(client, gateway.base, clip_textual(), text="猫").headers["x-request-id"]
    assert len(made) == 32 and int(made, 16) >= 0
    # A header that could forge log lines is replaced, not trusted.
    forged = immich_predict(client, gateway.base, clip_textual(), text="猫", headers={"X-Request-ID": "a b\tc"})
    assert forged.headers["x-request-id"] != "a b\tc"
    assert any('"request_id":"immich-42"' in line for line in gateway.log_text().splitlines())


# ---- liveness under load, and metrics ------------------------------------------------------------------------


def test_ping_answers_fast_while_inference_saturates_the_cpu(
    client: httpx.Client, gateway: GatewayProcess, shared_data: Path
) -> None:
    image = preview_jpeg((shared_data / "ocr" / "paddleocr_11.jpg").read_bytes())
    stop = threading.Event()
    done: list[int] = []

    def load() -> None:
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                done.append(immich_predict(c, gateway.base, OCR, image=image, timeout=120).status_code)

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(1.0)  # let the OCR requests occupy every core
        latencies = []
        for _ in range(30):
            started = time.perf_counter()
            assert client.get(gateway.base + "/ping", timeout=2).text == "pong"
            latencies.append(time.perf_counter() - started)
            time.sleep(0.05)
    finally:
        stop.set()
        for worker in workers:
            worker.join(120)
    assert done and set(done) == {200}
    # Immich's availability check gives up after 2 s; the gateway must be far below that.
    assert statistics.median(latencies) < 0.05, latencies
    assert max(latencies) < 0.5, latencies


def test_metrics_count_requests_per_task_and_backend(client: httpx.Client, gateway: GatewayProcess) -> None:
    immich_predict(client, gateway.base, clip_textual(), text="metrics")
    text = client.get(gateway.base + "/metrics").text
    assert metric_value(text, "gateway_requests_total", task="clip", status="200") >= 1
    assert metric_value(text, "gateway_backend_requests_total", backend="local", task="clip", outcome="ok") >= 1
    assert metric_value(text, "gateway_request_duration_seconds_count", task="clip") >= 1
    assert metric_value(text, "gateway_backend_up", backend="local") == 1
    assert metric_value(text, "gateway_breaker_state", backend="local", task="ocr") == 0
    # The effective routing is visible to operators, without secrets.
    status = client.get(gateway.base + "/status").json()
    assert status["routes"]["facial-recognition"]["model_map"]["buffalo_l"] == "dlib"
    assert status["routes"]["clip"]["dimensions"][CLIP_MODEL] == 512
    assert np.isfinite(metric_value(text, "gateway_requests_in_flight"))


def test_lenient_input_is_refused_as_the_ai_service_refuses_it(client: httpx.Client, gateway: GatewayProcess) -> None:
    base = gateway.base
    # A body cut off before its closing boundary: said so, not "Either image or text must be provided".
    content_type, body = node_formdata(CLIP_VISUAL, image=astronaut_jpeg())
    for cut in (body[: body.rindex(b"\r\n--")], body[: len(body) // 2]):
        response = _raw_post(client, base, content_type, cut)
        assert response.status_code == 400 and "truncated" in response.json()["detail"], response.text
    # Booleans are not thresholds (pydantic's lax mode read true as 1.0).
    entries = {"clip": {"visual": {"modelName": "ViT-B-32__openai", "options": {"minScore": True}}}}
    response = immich_predict(client, base, entries, image=astronaut_jpeg())
    assert response.status_code == 422 and "JSON number" in response.json()["detail"]
    # A query with nothing visible in it gets no embedding.
    for text in ("\0\0\0", "\u200b\ufeff\x01"):
        response = immich_predict(client, base, clip_textual(), text=text)
        assert response.status_code == 400 and "'text'" in response.json()["detail"], response.text
    # A chunked body over the limit is a 413, as one with a Content-Length is.
    content_type, body = node_formdata(CLIP_VISUAL, image=b"\xff" * (MAX_BODY + 1))
    chunks = (body[i : i + (1 << 20)] for i in range(0, len(body), 1 << 20))
    response = client.post(base + "/predict", content=chunks, headers={"content-type": content_type})
    assert response.status_code == 413 and "GATEWAY_MAX_BODY_BYTES" in response.json()["detail"]
    assert client.get(base + "/ping").text == "pong"
