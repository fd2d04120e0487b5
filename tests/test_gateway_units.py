"""The gateway's pure parts, on real objects: settings, model mapping, breaker, reply validation, MT conversions."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartParser

from ai_service.protocol.immich import EntriesError, ModelTask
from ai_service.protocol.reading_order import sort_lines
from ai_service.tasks import TASKS, InvalidReply, UnknownTaskError, parse_entries, task_for
from ai_service.tasks.clip import unit_vector
from ai_service.tasks.faces import mtphotos_to_immich as faces_to_immich
from ai_service.tasks.ocr import mtphotos_to_immich as ocr_to_immich
from gateway.backends.http import base_url, encode_formdata, endpoint_url, redact_url
from gateway.backends.mtphotos import MtPhotosBackend
from gateway.form import PredictForm, parse_predict_form
from gateway.health import BreakerState, CircuitBreaker
from gateway.logs import request_id_from
from gateway.routing import ConfigError, MappingError, Router
from gateway.settings import BackendKind, GatewaySettings
from gateway.validate import InvalidResponse, validate_response
from tests.gateway_support import node_formdata
from tests.servers import REPO


def settings(**values: Any) -> GatewaySettings:
    return GatewaySettings(**values)


def routed(router: Router, entries: dict[str, Any]) -> Any:
    parsed = parse_entries(json.dumps(entries))
    [(task, types)] = parsed.items()
    return router.route_task(task, types, entries[task.value])


# ---- settings ------------------------------------------------------------------------------------------


def test_defaults_serve_everything_locally() -> None:
    s = settings()
    assert list(s.backends) == ["local"] and s.backends["local"].kind is BackendKind.LOCAL
    assert all(s.route(task) == ["local"] for task in ModelTask)
    assert (s.host, s.port) == ("127.0.0.1", 3003)
    assert s.timeouts["clip"] < s.timeouts["ocr"] <= 60 < 300
    assert s.model_map["facial_recognition"] == {}  # never a silent swap: buffalo_l is answered by buffalo_l
    assert s.model_map["clip"] == {"cn-clip/": "ViT-B-16__cn-clip"}


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "GATEWAY_BACKENDS",
        '{"gpu":{"kind":"immich","url":"http://gpu:3003"},"mt":{"kind":"mtphotos","url":"http://mt:8060",'
        '"api_key":"s3cret-key"},"local":{"kind":"local"}}',
    )
    monkeypatch.setenv("GATEWAY_ROUTES__CLIP", '["gpu","local"]')
    monkeypatch.setenv("GATEWAY_TIMEOUTS__OCR", "45")
    monkeypatch.setenv("GATEWAY_BREAKER__COOLDOWN_S", "5")
    s = GatewaySettings()
    assert s.route(ModelTask.CLIP) == ["gpu", "local"]
    assert s.route(ModelTask.OCR) == ["gpu", "mt", "local"], "unset routes use every backend in config order"
    assert s.timeouts["ocr"] == 45 and s.breaker.cooldown_s == 5
    mt = s.backends["mt"]
    assert mt.served_model(ModelTask.CLIP) == "ViT-B-16__cn-clip"  # MT Photos' default model, declared
    assert "s3cret-key" not in repr(s) and "s3cret-key" not in s.model_dump_json()
    assert mt.api_key is not None and mt.api_key.get_secret_value() == "s3cret-key"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"backends": {"mt": {"kind": "mtphotos", "url": "http://mt:8060"}}}, "api_key"),
        ({"backends": {"x": {"kind": "local", "url": "http://x"}}}, "takes no url"),
        ({"backends": {"x": {"kind": "immich"}}}, "needs an http(s) url"),
        ({"backends": {"a": {"kind": "local"}, "b": {"kind": "local"}}}, "at most one 'local'"),
        ({"routes": {"ocr": ["nowhere"]}}, "unknown backends"),
        ({"routes": {"ocr": []}}, "empty"),
        ({"timeouts": {"clip": 400}}, "less than or equal"),
    ],
)
def test_settings_refuse_what_cannot_work(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        GatewaySettings(**values)


# ---- model mapping and dimensions ------------------------------------------------------------------------


def test_mapping_exact_prefix_and_pass_through() -> None:
    router = Router(
        settings(
            model_map={
                "clip": {
                    "cn-clip/": "ViT-B-16__cn-clip",
                    "cn-clip/big/": "ViT-H-14__cn-clip",
                    "ViT-B-32__openai": "ViT-B-16__cn-clip",
                }
            }
        )
    )
    exact = router.resolve(ModelTask.CLIP, "ViT-B-32__openai")
    assert (exact.target, exact.rule, exact.expected_dim) == ("ViT-B-16__cn-clip", "ViT-B-32__openai", 512)
    prefix = router.resolve(ModelTask.CLIP, "cn-clip/ViT-B-16__openai")
    assert (prefix.target, prefix.rule) == ("ViT-B-16__cn-clip", "cn-clip/")
    longest = router.resolve(ModelTask.CLIP, "cn-clip/big/RN50__openai")
    assert (longest.target, longest.expected_dim) == ("ViT-H-14__cn-clip", 1024)
    same = router.resolve(ModelTask.CLIP, "ViT-L-14__openai")
    assert (same.target, same.rule, same.expected_dim) == ("ViT-L-14__openai", None, 768)
    faces = router.resolve(ModelTask.FACIAL_RECOGNITION, "buffalo_l")
    assert (faces.target, faces.expected_dim) == ("buffalo_l", 512)
    chosen = Router(settings(model_map={"facial_recognition": {"buffalo_l": "dlib"}}))
    assert chosen.resolve(ModelTask.FACIAL_RECOGNITION, "buffalo_l").target == "dlib"


def test_prefix_route_with_the_wrong_dimension_is_refused_per_request() -> None:
    router = Router(settings())
    with pytest.raises(MappingError, match="768") as info:
        router.resolve(ModelTask.CLIP, "cn-clip/ViT-L-14__openai")
    assert "512" in str(info.value) and "cn-clip/ViT-B-16__openai" in str(info.value)


@pytest.mark.parametrize(
    ("clip_map", "dims", "needles"),
    [
        ({"ViT-L-14__openai": "ViT-B-16__cn-clip"}, {}, ["768", "512", "ViT-L-14__openai", "ViT-B-16__cn-clip"]),
        ({"ViT-B-32__openai": "my-export"}, {}, ["my-export", "GATEWAY_CLIP_DIMENSIONS"]),
        ({"ViT-B-32__openai": "my-export"}, {"my-export": 768}, ["512", "768"]),
        ({"zh/": "my-export"}, {}, ["zh/", "GATEWAY_CLIP_DIMENSIONS"]),
    ],
)
def test_start_up_check_refuses_mismatches(clip_map: dict[str, str], dims: dict[str, int], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        Router(settings(model_map={"clip": clip_map}, clip_dimensions=dims))
    for needle in needles:
        assert needle in str(info.value)


def test_declared_dimension_makes_a_custom_model_usable() -> None:
    router = Router(
        settings(model_map={"clip": {"ViT-L-14__openai": "fg-clip2-base"}}, clip_dimensions={"fg-clip2-base": 768})
    )
    assert router.resolve(ModelTask.CLIP, "ViT-L-14__openai").expected_dim == 768


def test_route_task_maps_names_and_keeps_unknown_options() -> None:
    router = Router(settings(model_map={"facial_recognition": {"buffalo_l": "dlib"}}))
    entries = {
        "facial-recognition": {
            "detection": {"modelName": "buffalo_l", "options": {"minScore": 0.6, "newOption": [1, 2]}},
            "recognition": {"modelName": "buffalo_l"},
        }
    }
    r = routed(router, entries)
    assert r.raw == {
        "detection": {"modelName": "dlib", "options": {"minScore": 0.6, "newOption": [1, 2]}},
        "recognition": {"modelName": "dlib"},
    }
    assert {e.model_name for e in r.entries.values()} == {"dlib"}
    mixed = {"ocr": {"detection": {"modelName": "a"}, "recognition": {"modelName": "b"}}}
    with pytest.raises(MappingError, match="different models"):
        routed(router, mixed)


def test_start_up_warnings_point_at_unreachable_or_risky_backends() -> None:
    s = settings(
        backends={
            "mt": {"kind": "mtphotos", "url": "http://mt:8060", "api_key": "k"},
            "stock": {"kind": "immich", "url": "http://immich-ml:3003"},
        },
        model_map={"facial_recognition": {"buffalo_l": "dlib"}},
    )
    warnings = Router(s).startup_warnings()
    # mt runs buffalo_l, but the map sends buffalo_l to dlib: mt can never serve faces.
    assert any("'mt' runs 'buffalo_l'" in w and "skipped" in w for w in warnings)
    assert any("'stock' will be asked for 'dlib'" in w for w in warnings)
    passthrough = settings(backends=s.backends)  # the default map passes Immich's names through
    assert not any("facial-recognition" in w for w in Router(passthrough).startup_warnings())


# ---- circuit breaker ---------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, changes: list[str]) -> CircuitBreaker:
    return CircuitBreaker(
        backend="b",
        task=ModelTask.CLIP,
        threshold=2,
        cooldown_s=10,
        on_change=lambda br: changes.append(br.state.value),
        clock=clock,
    )


def test_breaker_opens_half_opens_and_closes() -> None:
    clock, changes = Clock(), []
    br = breaker(clock, changes)
    br.failure(br.acquire(), "boom")  # type: ignore[arg-type]
    assert br.state is BreakerState.CLOSED
    br.failure(br.acquire(), "boom")  # type: ignore[arg-type]
    assert br.state is BreakerState.OPEN and br.acquire() is None and br.retry_in() == 10
    clock.now += 10
    trial = br.acquire()
    assert trial is not None and trial.trial and br.state is BreakerState.HALF_OPEN
    assert br.acquire() is None, "only one trial at a time"
    br.failure(trial, "still down")
    assert br.state is BreakerState.OPEN and br.last_error == "still down"
    clock.now += 10
    trial = br.acquire()
    assert trial is not None
    br.success(trial)
    assert br.state is BreakerState.CLOSED and br.failures == 0
    assert changes == ["open", "half_open", "open", "half_open", "closed"]


def test_breaker_trial_slot_is_freed_on_cancel_and_early_trials() -> None:
    clock, changes = Clock(), []
    br = breaker(clock, changes)
    for _ in range(2):
        br.failure(br.acquire(), "x")  # type: ignore[arg-type]
    early = br.acquire_early()
    assert early is not None and early.trial and br.acquire_early() is None
    br.release(early)
    assert br.acquire_early() is not None


def test_health_opens_and_a_passing_check_closes_only_what_it_opened() -> None:
    clock, changes = Clock(), []
    br = breaker(clock, changes)
    br.health_failed("ping refused")
    assert br.state is BreakerState.OPEN and br.opened_by_health
    br.health_passed()
    assert br.state is BreakerState.CLOSED
    for _ in range(2):
        br.failure(br.acquire(), "model missing")  # type: ignore[arg-type]
    br.health_passed()
    assert br.state is BreakerState.OPEN, "a working /ping proves nothing about a failing model"


# ---- reply validation ------------------------------------------------------------------------------------------

CLIP_TEXT = {"clip": {"textual": {"modelName": "ViT-B-32__openai"}}}
FACES = {"facial-recognition": {"detection": {"modelName": "buffalo_l"}, "recognition": {"modelName": "buffalo_l"}}}
OCR = {"ocr": {"detection": {"modelName": "PP-OCRv5_mobile"}, "recognition": {"modelName": "PP-OCRv5_mobile"}}}


def vec(n: int, value: float = 0.1) -> str:
    return orjson.dumps([value] * n).decode()


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        ({"clip": "[]"}, "empty"),
        ({"clip": vec(2)}, "2 dimensions, expected 512"),
        ({"clip": [0.1] * 512}, "must be a string"),
        ({"clip": "[" + ",".join(["NaN"] * 512) + "]"}, "not a JSON array"),
        ({"clip": vec(512, 0.0)}, "all zeros"),
        ({"clip": orjson.dumps(["0.1"] * 512).decode()}, "finite numbers"),
        ({"other": 1}, "no 'clip'"),
    ],
)
def test_bad_clip_replies_are_rejected(reply: dict[str, Any], problem: str) -> None:
    with pytest.raises(InvalidResponse, match=problem):
        validate_response(routed(Router(settings()), CLIP_TEXT), reply, image=False)


def test_face_boxes_are_rounded_and_image_size_required() -> None:
    r = routed(Router(settings()), FACES)
    face = {"boundingBox": {"x1": 10.4, "y1": -3.6, "x2": 50.5, "y2": 60.0}, "score": 0.9, "embedding": vec(512)}
    out = validate_response(r, {"facial-recognition": [face], "imageHeight": 80, "imageWidth": 60.0}, image=True)
    assert out["facial-recognition"][0]["boundingBox"] == {"x1": 10.0, "y1": -4.0, "x2": 50.0, "y2": 60.0}
    assert out["imageWidth"] == 60 and isinstance(out["imageWidth"], int)
    with pytest.raises(InvalidResponse, match="imageHeight"):
        validate_response(r, {"facial-recognition": [face]}, image=True)
    with pytest.raises(InvalidResponse, match="128 dimensions"):
        validate_response(r, {"facial-recognition": [{**face, "embedding": vec(128)}]}, image=False)
    with pytest.raises(InvalidResponse, match="inverted"):
        inverted = {**face, "boundingBox": {"x1": 50, "y1": 0, "x2": 10, "y2": 5}}
        validate_response(r, {"facial-recognition": [inverted]}, image=False)


def test_ocr_replies_must_align_and_be_normalised() -> None:
    r = routed(Router(settings()), OCR)
    good = {"text": ["a"], "box": [0, 0, 1.0000001, 0, 1, 1, 0, 1], "boxScore": [0.9], "textScore": [0.95]}
    out = validate_response(r, {"ocr": good}, image=False)
    assert max(out["ocr"]["box"]) == 1.0
    for broken, problem in [
        ({**good, "text": []}, "'text' must be 1 strings"),
        ({**good, "box": good["box"][:7]}, "8 per line"),
        ({**good, "box": [10, 20, 300, 20, 300, 40, 10, 40]}, "not normalised"),
        ({**good, "textScore": ["0.9"]}, "textScore"),
    ]:
        with pytest.raises(InvalidResponse, match=problem):
            validate_response(r, {"ocr": broken}, image=False)


# ---- MT Photos conversions ----------------------------------------------------------------------------------------


def test_mt_ocr_conversion() -> None:
    data = {
        "result": {
            "texts": ["second", "first", "weak"],
            "scores": ["0.91", "0.99", "0.80"],
            # The ONNX build may report negative widths for right-to-left polygons: still a rectangle.
            "boxes": [
                {"x": "10.0", "y": "50.0", "width": "90.0", "height": "10.0"},
                {"x": "100.0", "y": "10.0", "width": "-80.0", "height": "20.0"},
                {"x": "0", "y": "0", "width": "1", "height": "1"},
            ],
        }
    }
    out = ocr_to_immich(data, 200, 100, 0.8)
    assert out["text"] == ["first", "second"]
    assert out["box"][:8] == pytest.approx([0.1, 0.1, 0.5, 0.1, 0.5, 0.3, 0.1, 0.3])
    assert out["boxScore"] == out["textScore"] == [0.99, 0.91]
    with pytest.raises(InvalidReply, match="differ in length"):
        ocr_to_immich({"result": {"texts": ["a"], "scores": [], "boxes": []}}, 10, 10, 0.5)
    with pytest.raises(InvalidReply, match="not a number"):
        bad = {
            "result": {"texts": ["a"], "scores": ["high"], "boxes": [{"x": "0", "y": "0", "width": "1", "height": "1"}]}
        }
        ocr_to_immich(bad, 10, 10, 0.5)


def test_reading_order_treats_near_tops_as_one_line() -> None:
    # The one reading-order rule, shared by the AI service's OCR and the MT Photos adapter.
    lines = [(100.0, 300.0, "right"), (104.0, 20.0, "left"), (10.0, 50.0, "top"), (130.0, 0.0, "below")]
    assert sort_lines(lines) == ["top", "left", "right", "below"]
    assert sort_lines([]) == []


def test_mt_faces_and_vectors() -> None:
    data = {
        "result": [
            {"embedding": [0.1] * 512, "facial_area": {"x": 5, "y": 6, "w": 10, "h": 20}, "face_confidence": 0.9},
            {"embedding": [0.1] * 512, "facial_area": {"x": 1, "y": 1, "w": 1, "h": 1}, "face_confidence": 0.2},
        ]
    }
    [face] = faces_to_immich(data, 0.7, with_embeddings=True)
    assert face["boundingBox"] == {"x1": 5.0, "y1": 6.0, "x2": 15.0, "y2": 26.0}
    assert len(json.loads(face["embedding"])) == 512
    assert "embedding" not in faces_to_immich(data, 0.7, with_embeddings=False)[0]
    v = unit_vector(["3", "4"], "v")
    assert v.tolist() == pytest.approx([0.6, 0.8])
    for bad in ([], ["0", "0"], ["inf", "1"]):
        with pytest.raises(InvalidReply):
            unit_vector(bad, "v")


# ---- plumbing --------------------------------------------------------------------------------------------------------


def test_gateway_form_has_node_formdatas_layout() -> None:
    entries = {"clip": {"visual": {"modelName": "x"}}}
    image = b"\x89PNG\r\n\x1a\n fake \r\n bytes"
    mine_type, mine = encode_formdata(
        [
            ("entries", json.dumps(entries, separators=(",", ":"))),
            ("image", ("blob", image, "application/octet-stream")),
        ]
    )
    node_type, node = node_formdata(entries, image=image)
    mine_boundary, node_boundary = mine_type.split("boundary=")[1], node_type.split("boundary=")[1]
    assert len(mine_boundary) == len(node_boundary) and mine_boundary.startswith("----formdata-undici-0")
    assert mine.replace(mine_boundary.encode(), b"B") == node.replace(node_boundary.encode(), b"B")


def test_urls_and_request_ids() -> None:
    assert base_url("http://h/ml") == base_url("http://h/ml/") == "http://h/ml/"
    assert redact_url("http://user:pw@h:3003/ml/") == "http://***@h:3003/ml/"
    assert redact_url("http://h:3003/") == "http://h:3003/"
    assert redact_url("http://h/ml/?token=s3cret&v=1") == "http://h/ml/?token=***&v=***"
    assert request_id_from("abc-123") == "abc-123"
    assert request_id_from("bad id\n") != "bad id\n" and len(request_id_from(None)) == 32


def test_settings_command_masks_credentials_in_urls() -> None:
    """``python -m gateway settings`` shows URLs as /status does: no user:password, no query values, no keys."""
    env = {
        **os.environ,
        "GATEWAY_BACKENDS": json.dumps(
            {
                "gpu": {"kind": "immich", "url": "http://bob:hunter2-pw@gpu:3003/ml/?token=tok-SECRET-1&v=2"},
                "mt": {"kind": "mtphotos", "url": "http://mt:8060/?key=tok-SECRET-2", "api_key": "mt-SECRET-3"},
            }
        ),
        "GATEWAY_IMMICH__URL": "http://alice:pw-SECRET-4@immich:2283",
    }
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "settings"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    for secret in ("hunter2-pw", "bob", "tok-SECRET-1", "tok-SECRET-2", "mt-SECRET-3", "pw-SECRET-4", "alice"):
        assert secret not in out.stdout + out.stderr
    lines = dict(line.split("=", 1) for line in out.stdout.splitlines() if line.startswith("GATEWAY_"))
    backends = json.loads(lines["GATEWAY_BACKENDS"])
    assert backends["gpu"]["url"] == redact_url("http://bob:hunter2-pw@gpu:3003/ml/?token=tok-SECRET-1&v=2")
    assert backends["gpu"]["url"] == "http://***@gpu:3003/ml/?token=***&v=***"
    assert backends["mt"]["api_key"] == "**********" and backends["mt"]["url"] == "http://mt:8060/?key=***"
    assert json.loads(lines["GATEWAY_IMMICH"])["url"] == "http://***@immich:2283"
    assert json.loads(lines["GATEWAY_HTTP"])["max_header_bytes"] == 65536


def test_backend_endpoints_keep_the_sub_path_and_the_query() -> None:
    assert endpoint_url("http://h/ml", "predict") == endpoint_url("http://h/ml/", "predict") == "http://h/ml/predict"
    assert endpoint_url("http://h:3003/?token=T", "predict") == "http://h:3003/predict?token=T"
    assert endpoint_url("http://h:3003?token=T&a=b", "ping") == "http://h:3003/ping?token=T&a=b"
    assert endpoint_url("http://u:p@h/x?t=1#frag", "check") == "http://u:p@h/x/check?t=1"
    assert base_url("http://h:3003/?token=T") == "http://h:3003/?token=T"


# ---- the task table ----------------------------------------------------------------------------------------------


def test_every_task_is_in_the_table_and_an_unknown_one_is_an_error() -> None:
    assert set(TASKS) == set(ModelTask)
    for name in ("video", "", "OCR", "NSFW"):
        with pytest.raises(UnknownTaskError, match="unknown task"):
            task_for(name)
    with pytest.raises(EntriesError):
        parse_entries(json.dumps({"nsfw": {"detection": {"modelName": "x"}}}))
    with pytest.raises(EntriesError, match="video"):
        parse_entries(json.dumps({"video": {"visual": {"modelName": "x"}}}))


NSFW = {"nsfw": {"classification": {"modelName": "opennsfw"}}}
MT = {"kind": "mtphotos", "url": "http://mt:8060", "api_key": "k"}


def test_mtphotos_has_no_nsfw_endpoint_so_it_is_never_asked() -> None:
    with pytest.raises(ValueError, match="MT Photos has no nsfw"):
        settings(backends={"mt": MT, "local": {"kind": "local"}}, routes={"nsfw": ["mt", "local"]})
    s = settings(backends={"mt": MT, "local": {"kind": "local"}})  # the default route: every backend, mt first
    backend = MtPhotosBackend("mt", s.backends["mt"], s)
    assert backend.cannot_serve(routed(Router(s), NSFW)) == "MT Photos has no nsfw endpoint"
    assert backend.cannot_serve(routed(Router(s), {"ocr": {"detection": {"modelName": "x"}}})) is None
    assert GatewaySettings.per_task_defaults()["timeouts"]["nsfw"] == TASKS[ModelTask.NSFW].timeout_s == 30


def test_nsfw_replies_are_checked() -> None:
    r = routed(Router(settings()), NSFW)
    size = {"imageHeight": 2, "imageWidth": 3}
    out = validate_response(r, {"nsfw": {"score": 0, "model": "opennsfw"}, **size}, image=True)
    assert out == {"nsfw": {"score": 0.0, "model": "opennsfw"}, **size}  # fields it does not know pass through
    for bad in ({"score": 1.5}, {"score": -0.1}, {"score": "0.2"}, {"score": True}, {"score": None}, {}, [0.2], 0.2):
        with pytest.raises(InvalidResponse, match="nsfw"):
            validate_response(r, {"nsfw": bad, **size}, image=True)


def test_per_task_settings_take_defaults_from_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_TIMEOUTS__CLIP", "45")
    monkeypatch.setenv("GATEWAY_MODEL_MAP__OCR", '{"PP-OCRv5_mobile":"PP-OCRv5_server"}')
    s = GatewaySettings()
    assert s.timeout(ModelTask.CLIP) == 45 and s.timeout(ModelTask.FACIAL_RECOGNITION) == 60
    assert s.model_map_for(ModelTask.OCR) == {"PP-OCRv5_mobile": "PP-OCRv5_server"}
    assert s.model_map_for(ModelTask.CLIP) == {"cn-clip/": "ViT-B-16__cn-clip"}, "other tasks keep their defaults"
    monkeypatch.setenv("GATEWAY_TIMEOUTS__CLIPP", "45")
    with pytest.raises(ValueError, match="no task clipp"):
        GatewaySettings()
    monkeypatch.delenv("GATEWAY_TIMEOUTS__CLIPP")
    monkeypatch.setenv("GATEWAY_TIMEOUTS__OCR", "300")
    with pytest.raises(ValueError, match="less than or equal to 290"):
        GatewaySettings()


def test_validation_keeps_fields_it_does_not_know() -> None:
    face = {
        "boundingBox": {"x1": 1.2, "y1": 2, "x2": 3, "y2": 4, "rotation": 0},
        "score": 0.9,
        "landmarks": [1, 2],
        "embedding": vec(512),
    }
    out = validate_response(routed(Router(settings()), FACES), {"facial-recognition": [face]}, image=False)
    assert out["facial-recognition"][0]["landmarks"] == [1, 2]
    assert out["facial-recognition"][0]["boundingBox"] == {"x1": 1.0, "y1": 2.0, "x2": 3.0, "y2": 4.0, "rotation": 0}
    ocr = {"text": ["a"], "box": [0, 0, 1, 0, 1, 1, 0, 1], "boxScore": [0.9], "textScore": [0.9], "language": "zh"}
    assert validate_response(routed(Router(settings()), OCR), {"ocr": ocr}, image=False)["ocr"]["language"] == "zh"


# ---- /predict's form read without FastAPI (gateway/form.py) ---------------------------------------------------


def _starlette_form(content_type: str, body: bytes) -> PredictForm:
    """What FastAPI's form parsing (Starlette's parser) reads from the same body."""

    async def stream() -> AsyncIterator[bytes]:
        yield body

    async def parse() -> PredictForm:
        form = await MultiPartParser(Headers({"content-type": content_type}), stream()).parse()
        image, text = form.get("image"), form.get("text")
        return PredictForm(
            entries=str(form["entries"]),
            image=await image.read() if isinstance(image, UploadFile) else None,
            text=text if isinstance(text, str) else None,
        )

    return asyncio.run(parse())


@pytest.mark.parametrize(
    "payload",
    [
        {"text": "海滩上的一只狗"},
        {"text": "two\nlines\r\nand a --formdata-undici lookalike"},
        {"image": b"\xff\xd8" + bytes(range(256)) * 50 + b"\r\n--not-the-boundary\r\n"},
    ],
)
def test_immichs_form_reads_as_fastapi_reads_it(payload: dict[str, Any]) -> None:
    content_type, body = node_formdata({"clip": {"textual": {"modelName": "ViT-B-32__openai"}}}, **payload)
    form = parse_predict_form([(b"content-type", content_type.encode())], body)
    assert form is not None and form == _starlette_form(content_type, body)


def test_other_form_shapes_are_left_to_fastapi() -> None:
    """Anything but Immich's exact shape gives None: the request then goes to FastAPI, whose answer is the rule."""
    content_type, body = node_formdata({"clip": {"textual": {"modelName": "m"}}}, text="hi")
    boundary = content_type.split("boundary=")[1].encode()
    headers = [(b"content-type", content_type.encode())]
    delimiter = b"--" + boundary
    odd = {
        "not multipart": ([(b"content-type", b"application/json")], body),
        "truncated": (headers, body[:-10]),
        "preamble": (headers, b"hello\r\n" + body),
        "part header": (headers, body.replace(b'name="text"\r\n', b'name="text"\r\nContent-Type: text/plain\r\n')),
        "unknown field": (headers, body.replace(b'name="text"', b'name="_charset_"')),
        "duplicate": (headers, body.replace(b'name="text"', b'name="entries"')),
        "entries as a file": (headers, body.replace(b'name="entries"', b'name="entries"; filename="e"')),
        "empty text": (headers, body.replace(b"\r\n\r\nhi\r\n", b"\r\n\r\n\r\n")),
        "not utf-8": (headers, body.replace(b"hi", b"\xff\xfe")),
        "delimiter inside": (headers, body.replace(b"hi", delimiter + b"x")),
        "no entries": (headers, body[: body.index(delimiter, 1)].replace(b"entries", b"text") + delimiter + b"--\r\n"),
    }
    for what, (hdrs, data) in odd.items():
        assert parse_predict_form(hdrs, data) is None, what
    assert parse_predict_form(headers, body) == PredictForm(
        entries='{"clip":{"textual":{"modelName":"m"}}}', image=None, text="hi"
    )
