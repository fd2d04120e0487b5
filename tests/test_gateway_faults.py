"""The gateway under failure: real gateway processes in front of real misbehaving servers on loopback.

Backends that are down, slow past their timeout, answering 500, garbage JSON, an empty vector, or
cutting the connection mid-body: the request fails over, each backend is tried at most once, the
breaker opens and later closes, nothing hangs, and the gateway keeps serving.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway_support import (
    FaultServer,
    GatewayProcess,
    fault_vector,
    gateway_process,
    immich_predict,
    metric_value,
)
from tests.servers import REPO, free_port

pytestmark = pytest.mark.timeout(120)

CLIP_TEXT = {"clip": {"textual": {"modelName": "ViT-B-32__openai", "options": {"language": "zh-CN"}}}}


def _immich_backends(**servers: FaultServer | str) -> str:
    return json.dumps(
        {name: {"kind": "immich", "url": s if isinstance(s, str) else s.url} for name, s in servers.items()}
    )


def _env(backends: str, **extra: str) -> dict[str, str]:
    return {
        "GATEWAY_BACKENDS": backends,
        "GATEWAY_TIMEOUTS__CLIP": "1",
        "GATEWAY_BREAKER__FAILURE_THRESHOLD": "2",
        "GATEWAY_BREAKER__COOLDOWN_S": "60",
        "GATEWAY_HEALTH__INTERVAL_S": "0",
        "GATEWAY_LOG_FORMAT": "json",
        **extra,
    }


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    # Every call is bounded: a hanging gateway fails the test instead of stalling the suite.
    with httpx.Client(timeout=15) as c:
        yield c


def _ask(client: httpx.Client, gw: GatewayProcess, request_id: str | None = None) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    headers = {"X-Request-ID": request_id} if request_id else None
    response = immich_predict(client, gw.base, CLIP_TEXT, text="海滩上的狗", headers=headers, timeout=15)
    return response, time.perf_counter() - started


def test_every_fault_fails_over_once_then_breakers_skip(client: httpx.Client, tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    slow = FaultServer(tag="slow", mode="slow", delay_s=5)
    err = FaultServer(tag="err", mode="500")
    garbage = FaultServer(tag="garbage", mode="garbage")
    empty = FaultServer(tag="empty", mode="empty")
    wrongdim = FaultServer(tag="wrongdim", mode="wrongdim")
    cut = FaultServer(tag="cut", mode="cut")
    good = FaultServer(tag="good")
    faulty = [slow, err, garbage, empty, wrongdim, cut]
    servers = [*faulty, good]
    with contextlib.ExitStack() as stack:
        for s in servers:
            stack.enter_context(s.running())
        backends = _immich_backends(
            down=down, slow=slow, err=err, garbage=garbage, empty=empty, wrongdim=wrongdim, cut=cut, good=good
        )
        with gateway_process(_env(backends), tmp_path / "gw.log") as gw:
            response, elapsed = _ask(client, gw, "fault-test-1")
            assert response.status_code == 200, response.text
            assert response.json() == {"clip": fault_vector("good")}
            assert response.headers["x-request-id"] == "fault-test-1"
            # One slow backend costs its 1 s timeout, everything else fails fast.
            assert elapsed < 4.0
            for s in servers:
                assert s.count() == 1, f"{s.tag} must be tried exactly once"
            assert good.requests[0].headers["x-request-id"] == "fault-test-1"

            response, _ = _ask(client, gw)
            assert response.status_code == 200
            # Two consecutive failures opened every faulty breaker: the third request goes straight to 'good'.
            response, elapsed = _ask(client, gw)
            assert response.status_code == 200 and response.json() == {"clip": fault_vector("good")}
            assert elapsed < 0.5
            for s in faulty:
                assert s.count() == 2, f"{s.tag} must be skipped once its breaker is open"
            assert good.count() == 3

            status = gw.status()["breakers"]["clip"]
            for name in ("down", "slow", "err", "garbage", "empty", "wrongdim", "cut"):
                assert status[name]["state"] == "open", (name, status[name])
            assert status["good"]["state"] == "closed"
            assert "timeout" in status["slow"]["last_error"] or "within" in status["slow"]["last_error"]

            metrics = client.get(gw.base + "/metrics").text
            for backend, kind in [
                ("down", "connect"),
                ("slow", "timeout"),
                ("err", "http_status"),
                ("garbage", "invalid_response"),
                ("empty", "invalid_response"),
                ("wrongdim", "invalid_response"),
                ("cut", "connection"),
            ]:
                assert metric_value(metrics, "gateway_backend_errors_total", backend=backend, kind=kind) == 2, backend
            assert metric_value(metrics, "gateway_failovers_total", task="clip") >= 12
            assert metric_value(metrics, "gateway_backend_skipped_total", reason="breaker_open") == 7
            assert metric_value(metrics, "gateway_requests_total", task="clip", status="200") == 3
            assert metric_value(metrics, "gateway_breaker_state", backend="err", task="clip") == 2
            assert metric_value(metrics, "gateway_request_duration_seconds_count", task="clip") == 3

            # The logs are JSON lines that carry the request id, and never a body.
            lines = [json.loads(line) for line in gw.log_text().splitlines() if line.startswith("{")]
            tagged = [entry for entry in lines if entry.get("request_id") == "fault-test-1"]
            assert any(entry.get("backend") == "cut" and entry.get("kind") == "connection" for entry in tagged)
            assert any(entry["msg"] == "request" and entry.get("status") == 200 for entry in tagged)
            assert "海滩" not in gw.log_text()


def test_breaker_half_opens_after_cooldown_and_closes_on_success(client: httpx.Client, tmp_path: Path) -> None:
    flaky, good = FaultServer(tag="flaky", mode="500"), FaultServer(tag="good")
    with flaky.running(), good.running():
        env = _env(_immich_backends(flaky=flaky, good=good), GATEWAY_BREAKER__COOLDOWN_S="1")
        with gateway_process(env, tmp_path / "gw.log") as gw:
            for _ in range(2):
                assert _ask(client, gw)[0].json() == {"clip": fault_vector("good")}
            assert gw.status()["breakers"]["clip"]["flaky"]["state"] == "open"
            _ask(client, gw)
            assert flaky.count() == 2  # skipped while open

            # Still failing after the cooldown: the single trial request fails and re-opens it.
            time.sleep(1.1)
            assert _ask(client, gw)[0].status_code == 200
            assert flaky.count() == 3
            assert gw.status()["breakers"]["clip"]["flaky"]["state"] == "open"

            # Recovered: the next trial succeeds, the breaker closes and flaky serves again.
            flaky.mode = "ok"
            time.sleep(1.1)
            response, _ = _ask(client, gw)
            assert response.json() == {"clip": fault_vector("flaky")}
            assert gw.status()["breakers"]["clip"]["flaky"]["state"] == "closed"
            assert _ask(client, gw)[0].json() == {"clip": fault_vector("flaky")}
            metrics = client.get(gw.base + "/metrics").text
            assert metric_value(metrics, "gateway_breaker_state", backend="flaky", task="clip") == 0


def test_all_backends_failing_gives_fast_503_with_reasons(client: httpx.Client, tmp_path: Path) -> None:
    err = FaultServer(tag="err", mode="500")
    down = f"http://127.0.0.1:{free_port()}"
    env = _env(_immich_backends(err=err, down=down))
    with err.running(), gateway_process(env, tmp_path / "gw.log") as gw:
        response, elapsed = _ask(client, gw)
        assert response.status_code == 503
        body = response.json()
        assert "no backend could serve clip" in body["detail"]
        reasons = {a["backend"]: a for a in body["backends"]}
        assert reasons["err"]["kind"] == "http_status" and "500" in reasons["err"]["error"]
        assert reasons["down"]["kind"] == "connect"
        assert elapsed < 1.0

        _ask(client, gw)  # second failure: both breakers open now
        # Everything open: one early trial on the backend that reopens first, still a fast 503.
        response, elapsed = _ask(client, gw)
        assert response.status_code == 503 and elapsed < 1.0
        assert response.headers.get("retry-after")
        tried = [a for a in response.json()["backends"] if "error" in a]
        skipped = [a for a in response.json()["backends"] if "skipped" in a]
        assert len(tried) == 1 and len(skipped) == 1 and "circuit" in skipped[0]["skipped"]
        assert err.count() <= 3

        # The gateway itself stays healthy for Immich's checks.
        assert client.get(gw.base + "/ping").text == "pong"


def test_client_input_errors_pass_through_without_failover(client: httpx.Client, tmp_path: Path) -> None:
    picky, second = FaultServer(tag="picky", mode="400"), FaultServer(tag="second")
    env = _env(_immich_backends(picky=picky, second=second))
    with picky.running(), second.running(), gateway_process(env, tmp_path / "gw.log") as gw:
        for _ in range(3):
            response, _ = _ask(client, gw)
            assert response.status_code == 400
            assert response.json() == {"detail": "Image could not be decoded (fault server)"}
        # A bad input is nobody's failure: no failover, and the breaker stays closed.
        assert second.count() == 0
        assert gw.status()["breakers"]["clip"]["picky"]["state"] == "closed"


def test_health_checks_open_and_close_breakers(client: httpx.Client, tmp_path: Path) -> None:
    sick, good = FaultServer(tag="sick", ping_mode="500"), FaultServer(tag="good")
    with sick.running(), good.running():
        env = _env(
            _immich_backends(sick=sick, good=good),
            GATEWAY_HEALTH__INTERVAL_S="0.2",
            GATEWAY_HEALTH__FAILURE_THRESHOLD="1",
        )
        with gateway_process(env, tmp_path / "gw.log") as gw:
            deadline = time.monotonic() + 5
            while gw.status()["breakers"]["clip"]["sick"]["state"] != "open":
                assert time.monotonic() < deadline, "a failing health check must open the breaker"
                time.sleep(0.05)
            assert gw.status()["backends"]["sick"]["up"] is False
            assert _ask(client, gw)[0].json() == {"clip": fault_vector("good")}
            assert sick.count() == 0
            metrics = client.get(gw.base + "/metrics").text
            assert metric_value(metrics, "gateway_backend_up", backend="sick") == 0
            assert metric_value(metrics, "gateway_backend_up", backend="good") == 1

            sick.ping_mode = "ok"
            deadline = time.monotonic() + 5
            while gw.status()["breakers"]["clip"]["sick"]["state"] != "closed":
                assert time.monotonic() < deadline, "a passing health check must close a breaker it opened"
                time.sleep(0.05)
            assert _ask(client, gw)[0].json() == {"clip": fault_vector("sick")}


def test_requests_waiting_on_a_hung_backend_fail_over_when_its_breaker_opens(tmp_path: Path) -> None:
    """A backend that accepts requests and never answers (nor its /ping): the requests already sent to it fail
    over as soon as its health checks open the breaker, not after the 60 s task timeout."""
    hung, backup = FaultServer(tag="hung", delay_s=3600), FaultServer(tag="backup")
    with hung.running(), backup.running():
        env = _env(
            _immich_backends(hung=hung, backup=backup),
            GATEWAY_TIMEOUTS__CLIP="60",
            GATEWAY_BREAKER__FAILURE_THRESHOLD="3",
            GATEWAY_HEALTH__INTERVAL_S="0.5",
            GATEWAY_HEALTH__TIMEOUT_S="0.5",
            GATEWAY_HEALTH__FAILURE_THRESHOLD="2",
        )
        with gateway_process(env, tmp_path / "gw.log") as gw, httpx.Client(timeout=90) as client:
            deadline = time.monotonic() + 10
            while gw.status()["backends"]["hung"]["up"] is not True:
                assert time.monotonic() < deadline, "the backend must be up before it hangs"
                time.sleep(0.05)
            hung.mode, hung.ping_mode = "hang", "slow"
            results: list[tuple[int, Any, float]] = []

            def ask() -> None:
                started = time.monotonic()
                response = immich_predict(client, gw.base, CLIP_TEXT, text="海滩上的狗", timeout=90)
                results.append((response.status_code, response.json(), time.monotonic() - started))

            threads = [threading.Thread(target=ask) for _ in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(90)
            assert hung.count() == 4, "every request was first sent to the hung backend"
            assert [(status, body) for status, body, _ in results] == [(200, {"clip": fault_vector("backup")})] * 4
            waits = sorted(wait for _, _, wait in results)
            # Two failed checks (0.5 s apart, 0.5 s each) open the breaker after ~1.5 s; 60 s without the cut.
            assert waits[-1] < 15, f"requests waited {waits} s on a hung backend"
            metrics = client.get(gw.base + "/metrics").text
            assert metric_value(metrics, "gateway_backend_errors_total", backend="hung", kind="cut") == 4
            assert gw.status()["breakers"]["clip"]["hung"]["state"] == "open"


def test_an_attempt_with_nowhere_to_go_is_not_cut(client: httpx.Client, tmp_path: Path) -> None:
    """The breaker of a slow only backend opens (its /ping is slow too) while a request waits on it: the request
    keeps waiting and gets the answer, since cutting it could only turn a slow answer into a 503."""
    slow = FaultServer(tag="slow", delay_s=4)
    with slow.running():
        env = _env(
            _immich_backends(slow=slow),
            GATEWAY_TIMEOUTS__CLIP="10",
            GATEWAY_HEALTH__INTERVAL_S="0.3",
            GATEWAY_HEALTH__TIMEOUT_S="0.3",
            GATEWAY_HEALTH__FAILURE_THRESHOLD="2",
        )
        with gateway_process(env, tmp_path / "gw.log") as gw:
            deadline = time.monotonic() + 10
            while gw.status()["backends"]["slow"]["up"] is not True:
                assert time.monotonic() < deadline, "the backend must be up first"
                time.sleep(0.05)
            slow.mode, slow.ping_mode = "slow", "slow"
            response = immich_predict(client, gw.base, CLIP_TEXT, text="海滩上的狗", timeout=15)
            assert response.status_code == 200 and response.json() == {"clip": fault_vector("slow")}
            # Health checks opened its breaker while the request waited (the answer then closed it again).
            assert gw.status()["backends"]["slow"]["up"] is False
            assert '"msg":"circuit breaker open"' in gw.log_text()


def test_graceful_shutdown_finishes_in_flight_requests(tmp_path: Path) -> None:
    slow = FaultServer(tag="slow", mode="slow", delay_s=1.5)
    with slow.running():
        env = _env(_immich_backends(slow=slow), GATEWAY_TIMEOUTS__CLIP="10", GATEWAY_GRACEFUL_SHUTDOWN_S="10")
        with gateway_process(env, tmp_path / "gw.log") as gw:
            results: dict[str, Any] = {}

            def call() -> None:
                with httpx.Client(timeout=15) as c:
                    results["response"] = immich_predict(c, gw.base, CLIP_TEXT, text="cat", timeout=15)

            thread = threading.Thread(target=call)
            thread.start()
            deadline = time.monotonic() + 5
            while slow.count() == 0:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            gw.proc.send_signal(signal.SIGTERM)
            thread.join(15)
            assert results["response"].status_code == 200
            assert results["response"].json() == {"clip": fault_vector("slow")}
            # uvicorn re-raises the SIGTERM it caught once shutdown is complete.
            assert gw.proc.wait(15) in (0, -signal.SIGTERM)
            assert "Application shutdown complete" in gw.log_text()


@pytest.mark.parametrize(
    ("mapping", "numbers"),
    [
        ({"ViT-L-14__openai": "ViT-B-16__cn-clip"}, ("768", "512")),
        ({"ViT-B-32__openai": "ViT-H-14__cn-clip"}, ("512", "1024")),
    ],
)
def test_refuses_to_start_on_clip_dimension_mismatch(mapping: dict[str, str], numbers: tuple[str, str]) -> None:
    env = {
        "GATEWAY_MODEL_MAP__CLIP": json.dumps(mapping),
        "GATEWAY_BACKENDS": json.dumps({"x": {"kind": "immich", "url": "http://127.0.0.1:9"}}),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "--port", str(free_port())],
        cwd=REPO,
        env={**_base_env(), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    message = proc.stderr
    for number in numbers:
        assert number in message
    (immich_name, target) = next(iter(mapping.items()))
    assert immich_name in message and target in message


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"GATEWAY_ROUTES__CLIP": '["nowhere"]'}, "nowhere"),
        # The error names the problem, never the input: that input holds the API key.
        (
            {"GATEWAY_BACKENDS": '{"mt":{"kind":"mtphotos","url":"ftp://mt","api_key":"hunter2-secret"}}'},
            "http(s) url",
        ),
    ],
)
def test_refuses_to_start_on_bad_configuration(env: dict[str, str], needle: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "--port", str(free_port())],
        cwd=REPO,
        env={**_base_env(), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "hunter2-secret" not in proc.stderr + proc.stdout


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
