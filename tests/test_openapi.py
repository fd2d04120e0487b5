"""Both OpenAPI documents tell the truth: schemathesis against real servers on loopback.

The AI service runs with the tiny CLIP test models (tests/builders) and the OCR model its package ships, so
``/predict`` and the MT Photos routes really run models; the gateway runs in front of it with its search front
on (an Immich stub and a real PostgreSQL), so ``/api/search/smart`` and ``/ai/`` are in its document too.
Every operation is called with generated valid and invalid input (a bounded number of examples each, so this
stays well under a minute on two cores) and every answer is checked against the document: no 5xx, only
documented status codes, the documented content type, and bodies that match the documented schema.

Besides the generated cases, a few properties schemathesis cannot know: ``/metrics`` and ``/ai/addon.js`` are
documented as what they are (Prometheus text, JavaScript), and every route documents the 401 / 400 it gives.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from prometheus_client import CONTENT_TYPE_LATEST

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the test extra")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from db.migrate import migrate  # noqa: E402
from db.settings import DbSearchSettings  # noqa: E402
from db.testing import fresh_database, insert_user, load_immich_schema  # noqa: E402
from tests.immich_stub import (  # noqa: E402
    ImmichStub,
    StubUser,
    create_system_metadata,
    render_text_jpeg,
    search_gateway,
    search_gateway_env,
)
from tests.servers import python_module_server  # noqa: E402

MT_KEY = "openapi-test-mt-key-0123456789"
CLIP_MODEL = "test-cn-clip-512"
# Few examples per operation: the point is every documented status and schema, not volume (CI < ~60 s).
EXAMPLES = settings(
    max_examples=10,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


# "Schema-valid request rejected": a schema cannot say that ``entries`` must be a JSON object naming installed
# models, or that an image must decode, so valid-by-schema input is rightly refused with a documented 4xx.
NOT_CHECKED = [schemathesis.checks.positive_data_acceptance]


@pytest.fixture(scope="module")
def ai_service(clip_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {
        "AI_SERVICE_MODEL_DIR": str(clip_model_dir),
        "AI_SERVICE_MTPHOTOS_API_KEY": MT_KEY,
        "AI_SERVICE_MTPHOTOS_CLIP_MODEL": CLIP_MODEL,
        # The bundled face model: MT Photos' default (buffalo_l) would be downloaded, and tests reach no hub.
        "AI_SERVICE_MTPHOTOS_FACE_MODEL": "dlib",
        "AI_SERVICE_LOG_LEVEL": "warning",
    }
    log = tmp_path_factory.mktemp("ai") / "ai_service.log"
    with python_module_server("ai_service", env, log=log) as base:
        yield base


@pytest.fixture(scope="module")
def gateway(postgres_uri: str, ai_service: str, clip_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    with fresh_database(postgres_uri, prefix="zh_openapi") as uri:
        load_immich_schema(uri)
        migrate(DbSearchSettings(url=uri))
        stub = ImmichStub(uri)
        with psycopg.connect(uri, autocommit=True) as conn:
            create_system_metadata(conn, None)
            user = stub.add_user(StubUser(insert_user(conn, name="a"), is_admin=True))
        env = search_gateway_env(
            stub.url,
            uri,
            clip_model_dir,
            GATEWAY_LOG_LEVEL="warning",
            GATEWAY_HEALTH__INTERVAL_S="0",
        )
        log = tmp_path_factory.mktemp("gw") / "gateway.log"
        with stub.running(), search_gateway(env, log, [user.api_key, user.session_token]) as base:
            yield base, user


def operations(base: str) -> list[Any]:
    schema = schemathesis.openapi.from_url(base + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def fuzz(base: str, headers: dict[str, str] | None) -> list[str]:
    """Every operation of the document at ``base``, with valid and with invalid generated input: the failures,
    one line each (schemathesis's own report of the first failing case per operation and mode)."""
    failures: list[str] = []
    for operation in operations(base):
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @EXAMPLES
            def run(case: Any) -> None:
                case.call_and_validate(headers=headers, excluded_checks=NOT_CHECKED)

            try:
                run()
            except Unsatisfiable:
                pass  # nothing invalid can be sent to it (GET / takes no input)
            except (Exception, BaseExceptionGroup) as exc:  # schemathesis's FailureGroup, or a check's error
                failures.append(f"{operation.label} [{mode.value}]: {str(exc).strip()[:1500]}")
    if failures:
        print("\n\n".join(failures))
    return failures


def test_ai_service_answers_as_documented(ai_service: str) -> None:
    # With the right MT Photos key, so the handlers behind it run (a generated key would only meet the 401).
    assert fuzz(ai_service, {"api-key": MT_KEY}) == []


def test_ai_service_refusals_are_documented(ai_service: str) -> None:
    assert fuzz(ai_service, None) == []


def test_gateway_answers_as_documented(gateway: tuple[str, StubUser]) -> None:
    assert fuzz(gateway[0], {"x-api-key": gateway[1].api_key}) == []


def test_gateway_refusals_are_documented(gateway: tuple[str, StubUser]) -> None:
    assert fuzz(gateway[0], None) == []


# ---- requests only a client that knows the protocol sends: the models really run -----------------------------


def entries(task: str, **types: str) -> str:
    return orjson.dumps({task: {kind: {"modelName": model} for kind, model in types.items()}}).decode()


# 5xx by design, documented: a model no backend has (the AI service says 404; the gateway, whose other backends
# might have had it, 503 "no backend could serve" with the reasons) and a known model not installed (503 with
# how to install it). Only these two may answer 5xx below.
UNKNOWN_MODEL = {"entries": entries("clip", textual="no-such-model"), "text": "x"}
NOT_INSTALLED = {"entries": entries("facial-recognition", detection="buffalo_l", recognition="buffalo_l")}


def real_cases() -> dict[str, list[dict[str, Any]]]:
    """Per operation label, bodies that reach the models (generated ``entries`` are never valid JSON of models)."""
    image = render_text_jpeg(["发票 2024"], width=640, height=320, font_px=48)
    return {
        "POST /predict": [
            {"entries": entries("clip", textual=CLIP_MODEL), "text": "发票"},
            {"entries": entries("clip", visual=CLIP_MODEL), "image": image},
            {"entries": entries("ocr", detection="PP-OCRv6_small", recognition="PP-OCRv6_small"), "image": image},
            {"entries": entries("facial-recognition", detection="dlib", recognition="dlib"), "image": image},
            {"entries": entries("clip", textual=CLIP_MODEL), "image": b"not an image"},
            NOT_INSTALLED | {"image": image},
            UNKNOWN_MODEL,
        ],
        "POST /ocr": [{"file": image}, {"file": b"not an image"}],
        "POST /clip/img": [{"file": image}],
        "POST /represent": [{"file": image}],
        "POST /clip/txt": [{"text": "发票"}, {"text": ""}],
    }


def send(client: httpx.Client, url: str, headers: dict[str, str], body: dict[str, Any]) -> httpx.Response:
    """As Immich and MT Photos send it: JSON for /clip/txt, else multipart with the bytes as a file part
    (schemathesis sends OpenAPI 3.1 binary fields as plain fields, which no client does)."""
    if url.endswith("/clip/txt"):
        return client.post(url, json=body, headers=headers)
    files = {k: ("upload", v, "application/octet-stream") for k, v in body.items() if isinstance(v, bytes)}
    data = {k: v for k, v in body.items() if not isinstance(v, bytes)}
    reply = client.post(url, data=data, files=files or None, headers=headers)
    reply.request.read()  # schemathesis's report quotes the request
    return reply


def test_real_requests_are_answered_as_documented(ai_service: str, gateway: tuple[str, StubUser]) -> None:
    headers = {"api-key": MT_KEY, "x-api-key": gateway[1].api_key}
    statuses: dict[str, list[int]] = {}
    with httpx.Client(trust_env=False, timeout=120) as client:
        for base in (ai_service, gateway[0]):
            cases = real_cases()
            for operation in operations(base):
                for body in cases.get(operation.label, []):
                    reply = send(client, base + operation.path, headers, body)
                    excluded = [*NOT_CHECKED]
                    if body is UNKNOWN_MODEL or body.get("entries") == NOT_INSTALLED["entries"]:
                        excluded.append(schemathesis.checks.not_a_server_error)
                    # schemathesis judges the answer against the document, as for its generated cases
                    operation.Case(body=body).validate_response(reply, excluded_checks=excluded)
                    statuses.setdefault(f"{base} {operation.label}", []).append(reply.status_code)
    ai_predict, gw_predict = statuses[f"{ai_service} POST /predict"], statuses[f"{gateway[0]} POST /predict"]
    assert ai_predict[:4] == [200] * 4 and gw_predict[:4] == [200] * 4, statuses
    # (buffalo_l is served by buffalo_l, never swapped: not installed and, with no hub reachable, 503 on both)
    assert ai_predict[4:] == [400, 503, 404] and gw_predict[4:] == [400, 503, 503], statuses
    assert statuses[f"{ai_service} POST /ocr"][0] == 200 and statuses[f"{ai_service} POST /clip/txt"][0] == 200


# ---- what the generated cases cannot see --------------------------------------------------------------------------


def _operation(spec: dict[str, Any], path: str, method: str = "get") -> dict[str, Any]:
    return spec["paths"][path][method]


def test_text_and_script_routes_are_not_documented_as_json(gateway: tuple[str, StubUser], ai_service: str) -> None:
    with httpx.Client(trust_env=False, timeout=30) as client:
        spec = client.get(gateway[0] + "/openapi.json").json()
        metrics = _operation(spec, "/metrics")["responses"]["200"]["content"]
        assert list(metrics) == [CONTENT_TYPE_LATEST]
        assert client.get(gateway[0] + "/metrics").headers["content-type"] == next(iter(metrics))
        script = _operation(spec, "/ai/addon.js")["responses"]["200"]["content"]
        assert list(script) == ["text/javascript; charset=utf-8"]
        for path in ("/ai/",):
            assert list(_operation(spec, path)["responses"]["200"]["content"]) == ["text/html; charset=utf-8"]
        for doc in (spec, client.get(ai_service + "/openapi.json").json()):
            assert list(_operation(doc, "/ping")["responses"]["200"]["content"]) == ["text/plain"]


def test_every_refusal_is_documented(gateway: tuple[str, StubUser], ai_service: str) -> None:
    with httpx.Client(trust_env=False, timeout=30) as client:
        ai = client.get(ai_service + "/openapi.json").json()
        for path in ("/check", "/ocr", "/clip/img", "/clip/txt", "/represent", "/restart"):
            assert "401" in _operation(ai, path, "post")["responses"], path
        for path in ("/ocr", "/clip/img", "/clip/txt", "/represent"):
            assert "400" in _operation(ai, path, "post")["responses"], path
        gw = client.get(gateway[0] + "/openapi.json").json()
        for path in ("/ai/", "/ai/status.json"):
            assert {"401", "403"} <= set(_operation(gw, path)["responses"]), path
        for path in ("/ai/assets/{asset_id}/ocr", "/ai/assets/{asset_id}/clip"):
            assert {"400", "401", "403"} <= set(_operation(gw, path, "post")["responses"]), path
