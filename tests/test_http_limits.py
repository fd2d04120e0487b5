"""Header limits and slow-client timeouts of both services, probed with raw sockets on loopback.

Real ``python -m gateway`` and ``python -m ai_service`` processes with small limits and short timeouts
(``*_HTTP__*``): an oversized head or too many header fields get 431 before they are buffered, a
client that sends its head or body too slowly (or nothing at all) is cut off after the timeout, a slow
but steady upload still gets through, and the service answers normal requests all the while.
"""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import ServerProcess, module_process

pytestmark = pytest.mark.timeout(180)

HEADER_TIMEOUT_S = 1.5
BODY_TIMEOUT_S = 1.5
MIN_RATE = 1000  # bytes/s that earn a body more time
MAX_HEAD = 8192
MAX_HEADERS = 50


def _limits(prefix: str) -> dict[str, str]:
    return {
        f"{prefix}HTTP__MAX_HEADER_BYTES": str(MAX_HEAD),
        f"{prefix}HTTP__MAX_HEADERS": str(MAX_HEADERS),
        f"{prefix}HTTP__HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        f"{prefix}HTTP__BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        f"{prefix}HTTP__BODY_MIN_BYTES_PER_S": str(MIN_RATE),
    }


@pytest.fixture(scope="module", params=["gateway", "ai_service"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    module = request.param
    prefix = "GATEWAY_" if module == "gateway" else "AI_SERVICE_"
    log = tmp_path_factory.mktemp("logs") / f"{module}.log"
    with module_process(module, _limits(prefix), log=log) as proc:
        yield proc


def _connect(server: ServerProcess) -> socket.socket:
    host, port = server.base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_to_close(sock: socket.socket, timeout_s: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    sock.settimeout(timeout_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return data


def _send_ignoring_close(sock: socket.socket, data: bytes) -> None:
    # The server stopped reading and closed: what a limit is for.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


def _status(reply: bytes) -> int:
    assert reply.startswith(b"HTTP/1.1 "), reply[:200]
    return int(reply[9:12])


def _ping_s(server: ServerProcess) -> float:
    started = time.monotonic()
    response = httpx.get(server.base + "/ping", timeout=10)
    assert response.status_code == 200 and response.text == "pong"
    return time.monotonic() - started


def _trickle(socks: list[socket.socket], payload: bytes | None, every_s: float, limit_s: float) -> dict[int, float]:
    """Send ``payload`` on every open socket each ``every_s`` (None: stay silent) until the server closes
    them; returns when (time.monotonic()) each socket, by index, was found closed, for those that were."""
    started = time.monotonic()
    closed: dict[int, float] = {}
    for sock in socks:
        sock.setblocking(False)
    while len(closed) < len(socks) and time.monotonic() - started < limit_s:
        open_ = [i for i in range(len(socks)) if i not in closed]
        if payload is not None:
            for i in open_:
                try:
                    socks[i].send(payload)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    closed[i] = time.monotonic()
        readable, _, _ = select.select([socks[i] for i in open_ if i not in closed], [], [], every_s)
        for sock in readable:
            i = socks.index(sock)
            try:
                while sock.recv(65536):
                    pass
            except BlockingIOError:
                continue  # a reply arrived; the close follows
            except OSError:
                pass
            closed[i] = time.monotonic()
    for sock in socks:
        sock.close()
    return closed


def test_oversized_head_gets_431_before_it_is_buffered(server: ServerProcess) -> None:
    sock = _connect(server)
    sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (2 * MAX_HEAD) + b"\r\n\r\n")
    reply = _read_to_close(sock)
    assert _status(reply) == 431 and b"larger than 8192 bytes" in reply

    # 1 MB of a header that never ends: refused after the first 8 KiB, the rest is never read (the
    # client may see the 431 or, with its unread bytes pending, a reset: both mean "closed").
    sock = _connect(server)
    started = time.monotonic()
    _send_ignoring_close(sock, b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1024 * 1024)
    reply = _read_to_close(sock)
    assert reply == b"" or _status(reply) == 431
    assert time.monotonic() - started < HEADER_TIMEOUT_S, "cut by the size limit, not by the timeout"
    assert _ping_s(server) < 2


def test_too_many_header_fields_get_431(server: ServerProcess) -> None:
    fields = b"".join(b"X-F%d: 1\r\n" % i for i in range(MAX_HEADERS + 1))  # ~600 bytes: far below the size limit
    sock = _connect(server)
    sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
    reply = _read_to_close(sock)
    assert _status(reply) == 431 and b"more than 50 header fields" in reply

    # Just at the limit is fine (Host + 49 more).
    sock = _connect(server)
    sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + fields[: fields.index(b"X-F48")] + b"\r\n")
    assert _status(_read_to_close(sock)) == 200


def test_slowloris_heads_and_idle_connections_are_cut_while_the_service_answers(server: ServerProcess) -> None:
    connected = time.monotonic()
    trickling = [_connect(server) for _ in range(100)]
    for sock in trickling:
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n")
    idle = [_connect(server) for _ in range(100)]
    # Both kinds are open now; the service still answers at once.
    assert _ping_s(server) < 1.5
    closed_trickling = _trickle(trickling, b"X", 0.1, HEADER_TIMEOUT_S + 8)
    closed_idle = _trickle(idle, None, 0.1, 8)
    assert len(closed_trickling) == len(trickling), "a client dribbling its head was never cut off"
    assert len(closed_idle) == len(idle), "a connection that never sent anything was never cut off"
    # Never before the timeout (counted from each connect), and soon after it on a loaded machine.
    waits = [at - connected for at in closed_trickling.values()]
    assert min(waits) >= HEADER_TIMEOUT_S and max(waits) < HEADER_TIMEOUT_S + 6
    assert _ping_s(server) < 1.5

    sock = _connect(server)
    sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n")
    reply = _read_to_close(sock)
    assert _status(reply) == 408 and b"request head not complete within 1.5s" in reply


def _form_head(length: int) -> bytes:
    return (
        b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b0undary\r\n"
        + b"Content-Length: %d\r\n\r\n" % length
    )


def _form_body(size: int) -> bytes:
    """A form whose 'entries' is not JSON, padded to ``size`` bytes: a complete one gets 422."""
    start = b'--b0undary\r\nContent-Disposition: form-data; name="entries"\r\n\r\n'
    end = b"\r\n--b0undary--\r\n"
    return start + b"x" * (size - len(start) - len(end)) + end


def test_slow_body_is_cut_but_a_steady_upload_passes(server: ServerProcess) -> None:
    # A trickle: 10 bytes every 0.1 s (100 B/s, a tenth of the minimum rate) of a 100 kB body.
    sock = _connect(server)
    sock.sendall(_form_head(100_000) + _form_body(100_000)[:100])
    sent = time.monotonic()
    closed = _trickle([sock], b"x" * 10, 0.1, BODY_TIMEOUT_S + 10)
    assert 0 in closed, "a client trickling its body was never cut off"
    assert BODY_TIMEOUT_S <= closed[0] - sent < BODY_TIMEOUT_S + 6
    assert _ping_s(server) < 1.5

    sock = _connect(server)
    sock.sendall(_form_head(100_000) + _form_body(100_000)[:100])
    time.sleep(BODY_TIMEOUT_S + 1)
    reply = _read_to_close(sock)
    assert _status(reply) == 408 and b"request body arrived too slowly" in reply

    # Slow but steady: 12 kB at ~4 kB/s takes ~3 s, twice the body timeout, yet earns enough time
    # (1.5 s + 1 s per 1000 bytes) and gets the app's own answer.
    body = _form_body(12_000)
    sock = _connect(server)
    sock.sendall(_form_head(len(body)))
    started = time.monotonic()
    for offset in range(0, len(body), 400):
        sock.sendall(body[offset : offset + 400])
        time.sleep(0.1)
    assert time.monotonic() - started > 2 * BODY_TIMEOUT_S
    reply = _read_to_close(sock, timeout_s=30)
    assert _status(reply) == 422, reply[:300]


def test_limits_apply_in_every_worker_process(tmp_path: Path) -> None:
    """AI_SERVICE_WORKERS > 1 runs uvicorn's worker processes: the limits must reach them too."""
    env = {**_limits("AI_SERVICE_"), "AI_SERVICE_WORKERS": "2"}
    with module_process("ai_service", env, log=tmp_path / "workers.log") as proc:
        for _ in range(4):  # the kernel spreads connections over both workers
            sock = _connect(proc)
            sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (2 * MAX_HEAD) + b"\r\n\r\n")
            assert _status(_read_to_close(sock)) == 431
        sock = _connect(proc)
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n")
        assert _status(_read_to_close(sock)) == 408
