"""The gateway reads Immich's face settings and warns when ``maxDistance`` does not fit the face model that
will answer Immich (after the model map): in its log at start-up and on ``/status`` (which ``/ai/`` shows).

Real sources, as Immich keeps them: a ``system_metadata`` row in a real PostgreSQL with Immich's tables, and an
``IMMICH_CONFIG_FILE``-format JSON file; a real gateway process in front of the Immich stub.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from ai_service.protocol.immich_face_models import FACE_MAX_DISTANCE, max_distance_range
from db.testing import fresh_database, load_immich_schema
from gateway.routing import Router
from gateway.search.immich_config import parse_ml_config
from gateway.settings import GatewaySettings
from tests.gateway_support import gateway_process
from tests.immich_stub import ImmichStub, create_system_metadata, search_gateway_env, wait_search_ready

DLIB_MAP = {"buffalo_l": "dlib"}


def face_warnings(status: dict[str, object]) -> list[str]:
    warnings = status["warnings"]
    assert isinstance(warnings, list)
    return [w for w in warnings if "maxDistance" in w]


# ---- the check itself ---------------------------------------------------------------------------------------


def test_immichs_face_settings_are_read_with_immichs_defaults_and_limits() -> None:
    default = parse_ml_config(None, "defaults").faces
    assert (default.enabled, default.model_name, default.max_distance) == (True, "buffalo_l", 0.5)
    stored = parse_ml_config({"machineLearning": {"facialRecognition": {"maxDistance": 0.7}}}, "database").faces
    assert (stored.model_name, stored.max_distance) == ("buffalo_l", 0.7)
    # Immich refuses values outside 0.1-2: such a hand-edited value is read as the default
    assert (
        parse_ml_config({"machineLearning": {"facialRecognition": {"maxDistance": 5}}}, "file").faces.max_distance
        == 0.5
    )
    off = parse_ml_config({"machineLearning": {"facialRecognition": {"enabled": False}}}, "file")
    assert not off.faces_enabled


def test_the_check_uses_the_model_after_the_map() -> None:
    plain = Router(GatewaySettings())
    assert plain.face_distance_warnings("buffalo_l", 0.5) == []  # buffalo_l at Immich's default
    [merge] = plain.face_distance_warnings("buffalo_l", 1.2)
    assert "'buffalo_l' is answered by 'buffalo_l'" in merge and "merged" in merge
    dlib = Router(GatewaySettings(model_map={"facial_recognition": DLIB_MAP}))
    assert dlib.face_distance_warnings("buffalo_l", 0.5) == []  # the centred dlib vectors fit Immich's default
    [merge] = dlib.face_distance_warnings("buffalo_l", 0.7)
    assert "answered by 'dlib'" in merge and "0.3-0.5" in merge and "merged" in merge
    [split] = dlib.face_distance_warnings("buffalo_l", 0.1)
    assert "split" in split
    # a model without a known range: no claim either way
    assert (
        Router(GatewaySettings(model_map={"facial_recognition": {"buffalo_l": "my-own"}})).face_distance_warnings(
            "buffalo_l", 1.9
        )
        == []
    )


def test_a_backend_that_runs_a_fixed_face_model_is_checked_too() -> None:
    backends = {
        "mt": {"kind": "mtphotos", "url": "http://mt:8060", "api_key": "k", "models": {"facial-recognition": "dlib"}}
    }
    router = Router(GatewaySettings(backends=backends, model_map={"facial_recognition": DLIB_MAP}))
    assert len(router.face_distance_warnings("buffalo_l", 0.8)) == 1  # target and served model are one: once


def test_ranges_are_in_one_table() -> None:
    assert max_distance_range("dlib") is FACE_MAX_DISTANCE["dlib"]
    assert FACE_MAX_DISTANCE["dlib"].fits(0.5) and not FACE_MAX_DISTANCE["dlib"].fits(0.6)
    assert all(FACE_MAX_DISTANCE[name].fits(0.5) for name in ("buffalo_l", "buffalo_m", "buffalo_s", "antelopev2"))
    assert max_distance_range("unknown-model") is None


# ---- a real gateway, Immich's settings from its database and from a config file ---------------------------------


@pytest.fixture(scope="module")
def immich(postgres_uri: str) -> Iterator[tuple[str, ImmichStub]]:
    with fresh_database(postgres_uri, prefix="zh_faces") as uri:
        load_immich_schema(uri)
        stub = ImmichStub(uri)
        with stub.running():
            yield uri, stub


def wait_for_log(gateway_log: Path, text: str, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        content = gateway_log.read_text(encoding="utf-8", errors="replace")
        if text in content:
            return content
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in the gateway log")


def test_gateway_warns_from_immichs_database(
    immich: tuple[str, ImmichStub], clip_model_dir: Path, tmp_path: Path
) -> None:
    uri, stub = immich
    with psycopg.connect(uri, autocommit=True) as conn:
        create_system_metadata(conn, {"machineLearning": {"facialRecognition": {"maxDistance": 0.7}}})
    env = search_gateway_env(stub.url, uri, clip_model_dir, GATEWAY_MODEL_MAP__FACIAL_RECOGNITION=json.dumps(DLIB_MAP))
    log = tmp_path / "gateway.log"
    with gateway_process(env, log) as gw:
        wait_search_ready(gw.base)
        text = wait_for_log(log, "facialRecognition.maxDistance")
        assert "is 0.7" in text and "answered by 'dlib'" in text
        [warning] = face_warnings(gw.status())
        assert "is 0.7" in warning
        # the admin follows the advice in Immich's settings: the warning goes (the config TTL is 0 here)
        with psycopg.connect(uri, autocommit=True) as conn:
            create_system_metadata(conn, {"machineLearning": {"facialRecognition": {"maxDistance": 0.45}}})
        assert face_warnings(gw.status()) == []
        # face recognition switched off in Immich: nothing to check
        with psycopg.connect(uri, autocommit=True) as conn:
            create_system_metadata(
                conn, {"machineLearning": {"facialRecognition": {"enabled": False, "maxDistance": 2}}}
            )
        assert face_warnings(gw.status()) == []
    with psycopg.connect(uri, autocommit=True) as conn:
        create_system_metadata(conn, None)


def test_gateway_warns_from_immichs_config_file(
    immich: tuple[str, ImmichStub], clip_model_dir: Path, tmp_path: Path
) -> None:
    uri, stub = immich
    config = tmp_path / "immich.json"
    config.write_text(json.dumps({"machineLearning": {"facialRecognition": {"maxDistance": 1.5}}}))
    env = search_gateway_env(stub.url, uri, clip_model_dir, GATEWAY_IMMICH__CONFIG_FILE=str(config))
    log = tmp_path / "gateway.log"
    with gateway_process(env, log) as gw:
        text = wait_for_log(log, "facialRecognition.maxDistance")
        assert "is 1.5" in text and "answered by 'buffalo_l'" in text
        [warning] = face_warnings(gw.status())
        assert "merged" in warning
        # Immich's default with buffalo_l (the default map): no warning
        config.write_text(json.dumps({"machineLearning": {"facialRecognition": {"maxDistance": 0.5}}}))
        assert face_warnings(gw.status()) == []
