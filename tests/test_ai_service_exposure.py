"""The MT Photos API's public default key never reaches the network: ``python -m ai_service`` refuses to listen
beyond loopback with it, and the Docker images (which listen on 0.0.0.0) switch the MT Photos API off instead."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from ai_service.settings import DEFAULT_MTPHOTOS_API_KEY, AIServiceSettings, is_loopback
from tests.servers import REPO, free_port, module_process

pytestmark = pytest.mark.timeout(180)


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AI_SERVICE_")}
    return {**env, **values}


def _check(base: str, key: str | None) -> int:
    headers = {"api-key": key} if key is not None else {}
    return httpx.post(base + "/check", headers=headers, timeout=10).status_code


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "myhost.lan", ""])
def test_refuses_to_listen_beyond_loopback_with_the_default_key(host: str) -> None:
    started = subprocess.run(
        [sys.executable, "-m", "ai_service", "--host", host, "--port", str(free_port())],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 2
    assert "AI_SERVICE_MTPHOTOS_API_KEY" in started.stderr and "127.0.0.1" in started.stderr
    assert DEFAULT_MTPHOTOS_API_KEY not in started.stderr + started.stdout
    # The same with the default written out: it is the value that is public, not its being unset.
    explicit = AIServiceSettings(host=host, mtphotos_api_key=DEFAULT_MTPHOTOS_API_KEY)
    assert explicit.exposure_problem() is not None


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_addresses_keep_the_default_key(host: str) -> None:
    assert is_loopback(host)
    assert AIServiceSettings(host=host, mtphotos_api_key=DEFAULT_MTPHOTOS_API_KEY).exposure_problem() is None


def test_default_key_works_on_loopback(tmp_path: Path) -> None:
    with module_process("ai_service", {}, log=tmp_path / "loopback.log") as server:
        assert _check(server.base, DEFAULT_MTPHOTOS_API_KEY) == 200


def test_all_interfaces_with_a_key_of_ones_own_or_with_the_api_off(tmp_path: Path) -> None:
    own = "own-key-5f2c9a71e0"
    env = {"AI_SERVICE_MTPHOTOS_API_KEY": own}
    with module_process("ai_service", env, log=tmp_path / "own.log", host="0.0.0.0") as server:
        assert _check(server.base, own) == 200
        assert _check(server.base, DEFAULT_MTPHOTOS_API_KEY) == 401
    assert own not in (tmp_path / "own.log").read_text()

    # Empty: the MT Photos API is off (what the Docker images default to); no key, not even an empty one, opens it.
    env = {"AI_SERVICE_MTPHOTOS_API_KEY": ""}
    with module_process("ai_service", env, log=tmp_path / "off.log", host="0.0.0.0") as server:
        for key in ("", DEFAULT_MTPHOTOS_API_KEY, None):
            assert _check(server.base, key) == 401
        assert httpx.get(server.base + "/ping", timeout=10).text == "pong"  # the Immich protocol still serves
    assert "MT Photos API is off" in (tmp_path / "off.log").read_text()


def test_docker_images_listen_everywhere_with_the_mt_photos_api_off() -> None:
    import dockerfile

    images = []
    for command in dockerfile.parse_file(str(REPO / "docker" / "Dockerfile")):
        values = list(command.value)
        env = dict(zip(values[::2], values[1::2], strict=True)) if command.cmd.upper() == "ENV" else {}
        if "AI_SERVICE_HOST" in env:
            images.append({k: v.strip('"') for k, v in env.items()})
    assert len(images) == 2, "the CPU runtime and the CUDA image each set the AI service's environment"
    for env in images:
        settings = AIServiceSettings(host=env["AI_SERVICE_HOST"], mtphotos_api_key=env["AI_SERVICE_MTPHOTOS_API_KEY"])
        assert not is_loopback(settings.host) and settings.mtphotos_api_key == ""
        assert settings.exposure_problem() is None
