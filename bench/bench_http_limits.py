"""What the per-connection limits (``ai_service/runtime/http_server.py``) cost a normal request.

Two uvicorn servers in this process on 127.0.0.1, the same tiny app behind both: one with uvicorn's own
httptools protocol, one with the limited subclass both services run (default limits). Blocks of requests
alternate between them so that a busy machine disturbs both alike:

* ``GET /ping`` on a kept-alive connection (the head path: size and count checks, head timer);
* ``POST /echo`` of a 1 MiB body (the body path: byte counting, body timer, flow control).

    .venv/bin/python bench/bench_http_limits.py [--blocks 10] [--per-block 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ai_service.runtime.http_limits import HttpLimits  # noqa: E402
from ai_service.runtime.http_server import uvicorn_http  # noqa: E402
from tests.servers import free_port  # noqa: E402

BODY = b"x" * (1024 * 1024)


async def ping(request: Request) -> Response:
    return PlainTextResponse("pong")


async def echo(request: Request) -> Response:
    return PlainTextResponse(str(len(await request.body())))


def _serve(http: object) -> tuple[uvicorn.Server, str]:
    app = Starlette(routes=[Route("/ping", ping), Route("/echo", echo, methods=["POST"])])
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", http=http)  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    return server, f"http://127.0.0.1:{port}"


def _block(client: httpx.Client, base: str, n: int, post: bool) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        response = client.post(base + "/echo", content=BODY) if post else client.get(base + "/ping")
        response.raise_for_status()
        out.append(time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=10, help="alternating blocks per server and workload")
    parser.add_argument("--per-block", type=int, default=200, help="requests per block (a fifth of it for POST)")
    args = parser.parse_args()
    servers = {"uvicorn httptools": _serve("httptools"), "limited (defaults)": _serve(uvicorn_http(HttpLimits()))}
    for post in (False, True):
        n = max(1, args.per_block // 5) if post else args.per_block
        times: dict[str, list[float]] = {name: [] for name in servers}
        clients = {name: httpx.Client(timeout=30) for name in servers}
        for name, (_, base) in servers.items():
            _block(clients[name], base, 10, post)  # warm-up, connection opened
        for _ in range(args.blocks):
            for name, (_, base) in servers.items():
                times[name] += _block(clients[name], base, n, post)
        label = "POST /echo 1 MiB" if post else "GET /ping"
        for name, values in times.items():
            values.sort()
            p99 = values[min(len(values) - 1, round(0.99 * (len(values) - 1)))]
            print(
                f"{label:<17} {name:<19} n={len(values):>5}  p50 {statistics.median(values) * 1000:7.3f} ms"
                f"  p99 {p99 * 1000:7.3f} ms",
                flush=True,
            )
    for server, _ in servers.values():
        server.should_exit = True


if __name__ == "__main__":
    main()
