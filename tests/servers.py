"""Real servers for tests: processes on loopback ports, started and stopped by fixtures."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_http(url: str, timeout_s: float = 60.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s: {last}")


@dataclass
class ServerProcess:
    """A ``python -m MODULE`` server started by :func:`module_process`."""

    proc: subprocess.Popen[bytes]
    base: str  # http://127.0.0.1:PORT
    log: Path | None

    def log_text(self, settle_s: float = 0.2, limit_s: float = 5.0) -> str:
        """The process's log so far. The services write log lines from a writer thread in batches (every
        ~20 ms, later on a busy machine), so this waits until the file has not grown for ``settle_s``."""
        if self.log is None:
            return ""
        deadline = time.monotonic() + limit_s
        size = -1
        while time.monotonic() < deadline:
            current = self.log.stat().st_size if self.log.exists() else 0
            if current == size:
                break
            size = current
            time.sleep(settle_s)
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""


@contextlib.contextmanager
def module_process(
    module: str,
    env: dict[str, str],
    *,
    log: Path | None = None,
    port: int | None = None,
    ready_path: str = "/ping",
    ready_timeout: float = 90.0,
    host: str = "127.0.0.1",
) -> Iterator[ServerProcess]:
    """Run ``python -m module --host HOST --port P`` until the block ends; wait until it answers (on 127.0.0.1)."""
    port = port or free_port()
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", module, "--host", host, "--port", str(port)],
        cwd=REPO,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    handle = ServerProcess(proc=proc, base=f"http://127.0.0.1:{port}", log=log)
    try:
        wait_for_http(handle.base + ready_path, timeout_s=ready_timeout, proc=proc)
        yield handle
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log:
            out.close()  # type: ignore[union-attr]


@contextlib.contextmanager
def python_module_server(
    module: str, env: dict[str, str], *, port: int | None = None, ready_path: str = "/ping", log: Path | None = None
) -> Iterator[str]:
    """Like :func:`module_process`, yielding just the base URL."""
    with module_process(module, env, log=log, port=port, ready_path=ready_path) as server:
        yield server.base
