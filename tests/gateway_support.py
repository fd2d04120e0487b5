"""Test helpers for the gateway: Immich's exact multipart, gateway processes, and real stub servers.

* :func:`node_formdata` lays out a form exactly as Node's undici ``FormData`` does (what the Immich
  server sends), written from undici's algorithm, independently of the gateway's own encoder.
* :class:`MtPhotosStub` is an HTTP server reproducing the documented MT Photos AI quirks: numbers as
  strings, ``x/y/width/height`` boxes, un-normalised CLIP vectors, HTTP 200 with ``msg`` on errors.
* :class:`FaultServer` is a raw asyncio HTTP/1.1 server speaking just enough of Immich's ML protocol
  to misbehave on demand: slow, 500, garbage JSON, an empty vector, a connection cut mid-body.

Both run on loopback in a background thread of the test process, so a test can switch their
behaviour between requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from tests.servers import ServerProcess, free_port, module_process

# ---- Immich's request, byte for byte --------------------------------------------------------------------


def immich_entries_json(entries: dict[str, Any]) -> str:
    """JSON.stringify: no spaces, non-ASCII kept as is."""
    return json.dumps(entries, separators=(",", ":"), ensure_ascii=False)


def node_formdata(entries: dict[str, Any], *, image: bytes | None = None, text: str | None = None) -> tuple[str, bytes]:
    """(content-type, body) as undici's FormData serialises ``entries`` then ``image`` (a Blob) or ``text``."""
    boundary = f"----formdata-undici-0{random.randrange(10**11):011d}"
    prefix = f"--{boundary}\r\nContent-Disposition: form-data"

    def normalize(value: str) -> str:
        return value.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")

    body = bytearray()
    body += f'{prefix}; name="entries"\r\n\r\n{normalize(immich_entries_json(entries))}\r\n'.encode()
    if image is not None:
        # new Blob([buffer]) appended to FormData becomes a File named "blob" with an empty type.
        body += f'{prefix}; name="image"; filename="blob"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
        body += image + b"\r\n"
    elif text is not None:
        body += f'{prefix}; name="text"\r\n\r\n{normalize(text)}\r\n'.encode()
    body += f"--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", bytes(body)


def immich_predict(
    client: httpx.Client,
    base: str,
    entries: dict[str, Any],
    *,
    image: bytes | None = None,
    text: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> httpx.Response:
    """POST <base>/predict as the Immich server does: new URL('predict', base) with a FormData body."""
    content_type, body = node_formdata(entries, image=image, text=text)
    url = str(httpx.URL(base if base.endswith("/") else base + "/").join("predict"))
    return client.post(url, content=body, headers={"content-type": content_type, **(headers or {})}, timeout=timeout)


# ---- gateway processes ------------------------------------------------------------------------------


@contextlib.contextmanager
def gateway_process(env: dict[str, str], log: Path, *, ready_timeout: float = 90.0) -> Iterator[GatewayProcess]:
    """``python -m gateway`` on a free loopback port; yields the process handle and base URL."""
    with module_process("gateway", env, log=log, ready_timeout=ready_timeout) as server:
        yield GatewayProcess(proc=server.proc, base=server.base, log=log)


@dataclass
class GatewayProcess(ServerProcess):
    log: Path

    def status(self) -> dict[str, Any]:
        return httpx.get(self.base + "/status", timeout=5).json()


def metric_value(metrics_text: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus sample over the series whose labels include ``labels``."""
    total = 0.0
    for line in metrics_text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        series, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


# ---- threads running servers --------------------------------------------------------------------------


class _ThreadedUvicorn:
    def __init__(self, app: Any, port: int) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("stub server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


# ---- MT Photos AI stub ----------------------------------------------------------------------------------

MT_KEY = "mt-stub-key-0123456789"
MT_DIM = 512


def mt_raw_vector(seed: bytes) -> np.ndarray:
    """Deterministic, deliberately un-normalised 'features' (norm ~ 20), as cn-clip returns them."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(seed).digest()[:8], "little"))
    return rng.standard_normal(MT_DIM) * 0.9


# Lines returned by the stub's /ocr, deliberately out of reading order. Scores as strings ("%.2f").
MT_OCR_LINES: list[tuple[str, str, tuple[str, str, str, str]]] = [
    # Same line as "第二行左" but 4 px higher: reading order must still put it second (left to right).
    ("第二行右", "0.97", ("300.0", "100.0", "200.0", "30.0")),
    ("低分行", "0.79", ("10.0", "300.0", "100.0", "20.0")),  # below Immich's default minScore 0.8
    ("第一行", "0.99", ("10.0", "10.0", "400.0", "40.0")),
    ("刚好0.80", "0.80", ("10.0", "200.0", "100.0", "20.0")),  # == minScore: Immich drops it too
    ("第二行左", "0.95", ("20.0", "104.0", "250.0", "30.0")),
]
MT_FACES: list[dict[str, Any]] = [
    {"facial_area": {"x": 212, "y": 112, "w": 179, "h": 250}, "face_confidence": 0.98},
    {"facial_area": {"x": 20, "y": 30, "w": 40, "h": 50}, "face_confidence": 0.5},  # dropped at minScore 0.7
]


@dataclass
class MtPhotosStub:
    """MT Photos AI API with its quirks. ``mode``: ok | msg (200 with msg) | empty (200, result [])."""

    api_key: str = MT_KEY
    mode: str = "ok"
    calls: Counter[str] = field(default_factory=Counter)
    headers_seen: list[dict[str, str]] = field(default_factory=list)
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _denied(self, request: Request) -> Response | None:
        self.calls[request.url.path] += 1
        self.headers_seen.append(dict(request.headers))
        if request.headers.get("api-key") != self.api_key:
            return JSONResponse({"detail": "Invalid API key"}, status_code=401)
        if self.mode == "msg":
            return JSONResponse({"result": [], "msg": "CUDA out of memory (stub)"})
        if self.mode == "empty":
            return JSONResponse({"result": []})
        return None

    async def check(self, request: Request) -> Response:
        return self._denied(request) or JSONResponse(
            {"result": "pass", "title": "mt-photos-ai服务", "help": "https://mtmt.tech/docs/advanced/ocr_api"}
        )

    async def clip_img(self, request: Request) -> Response:
        denied = self._denied(request)
        if denied:
            return denied
        form = await request.form()
        data = await form["file"].read()  # type: ignore[union-attr]
        return JSONResponse({"result": [f"{v:.16f}" for v in mt_raw_vector(data)]})

    async def clip_txt(self, request: Request) -> Response:
        denied = self._denied(request)
        if denied:
            return denied
        text = (await request.json())["text"]
        return JSONResponse({"result": [f"{v:.16f}" for v in mt_raw_vector(text.encode())]})

    async def ocr(self, request: Request) -> Response:
        denied = self._denied(request)
        if denied:
            return denied
        await request.form()
        return JSONResponse(
            {
                "result": {
                    "texts": [t for t, _, _ in MT_OCR_LINES],
                    "scores": [s for _, s, _ in MT_OCR_LINES],
                    "boxes": [dict(zip(("x", "y", "width", "height"), b, strict=True)) for _, _, b in MT_OCR_LINES],
                }
            }
        )

    async def represent(self, request: Request) -> Response:
        denied = self._denied(request)
        if denied:
            return denied
        form = await request.form()
        data = await form["file"].read()  # type: ignore[union-attr]
        faces = []
        for i, face in enumerate(MT_FACES):
            vector = mt_raw_vector(data + bytes([i]))
            faces.append({**face, "embedding": (vector / np.linalg.norm(vector)).tolist()})
        return JSONResponse({"detector_backend": "insightface", "recognition_model": "buffalo_l", "result": faces})

    async def ping(self, request: Request) -> Response:
        return PlainTextResponse("pong")

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/ping", self.ping, methods=["GET"]),
                Route("/check", self.check, methods=["POST"]),
                Route("/clip/img", self.clip_img, methods=["POST"]),
                Route("/clip/txt", self.clip_txt, methods=["POST"]),
                Route("/ocr", self.ocr, methods=["POST"]),
                Route("/represent", self.represent, methods=["POST"]),
            ]
        )

    @contextlib.contextmanager
    def running(self) -> Iterator[MtPhotosStub]:
        server = _ThreadedUvicorn(self.app(), self.port)
        server.start()
        try:
            yield self
        finally:
            server.stop()


# ---- misbehaving Immich-protocol server -----------------------------------------------------------------

FAULT_DIM = 512


def fault_vector(tag: str) -> str:
    """A valid 512-d embedding string, different per server, so a test sees who answered."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(tag.encode()).digest()[:8], "little"))
    v = rng.standard_normal(FAULT_DIM)
    return json.dumps([round(float(x), 6) for x in v / np.linalg.norm(v)], separators=(",", ":"))


def _reply(status: str, body: bytes, ctype: str = "application/json") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


def form_entries(body: bytes) -> bytes | None:
    """The raw value of a multipart body's 'entries' field (None without one)."""
    marker = b'name="entries"\r\n\r\n'
    start = body.find(marker)
    if start < 0:
        return None
    start += len(marker)
    end = body.find(b"\r\n--", start)
    return body[start : end if end >= 0 else len(body)]


def is_protocol_probe(body: bytes) -> bool:
    """A /predict form whose 'entries' is not JSON: Immich's service refuses it with 422 before any model runs."""
    entries = form_entries(body)
    if entries is None:
        return False
    try:
        json.loads(entries)
    except ValueError:
        return True
    return False


@dataclass
class FaultServer:
    """``mode`` for /predict: ok | 500 | garbage | empty | wrongdim | slow | cut | reset | 400 | hang (accept the
    request, never answer). ``ping_mode``: ok | 500 | slow. ``delay_s``: how long 'slow' sleeps.

    Like Immich's service, a /predict whose 'entries' is not JSON (the gateway's protocol probe) gets 422 whatever
    the mode: form parsing comes before any model. Those probes are kept apart, in ``probes``.
    ``required_query`` (e.g. "token=T"): requests without it get 401, as behind a token-checking proxy.
    ``predict_served`` False: POST answers 405, as a URL that leads to something with a /ping but no /predict."""

    tag: str = "fault"
    mode: str = "ok"
    ping_mode: str = "ok"
    delay_s: float = 5.0
    required_query: str | None = None
    predict_served: bool = True
    port: int = field(default_factory=free_port)
    requests: list[RecordedRequest] = field(default_factory=list)
    probes: list[RecordedRequest] = field(default_factory=list)
    refused: list[RecordedRequest] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, path_suffix: str = "/predict") -> int:
        return sum(1 for r in self.requests if r.path.partition("?")[0].endswith(path_suffix))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                recorded = RecordedRequest(method, path, headers, body)
                route, _, query = path.partition("?")
                if self.required_query is not None and self.required_query not in query.split("&"):
                    self.refused.append(recorded)
                    writer.write(_reply("401 Unauthorized", b'{"detail":"token required"}'))
                elif method == "POST" and not self.predict_served:
                    self.refused.append(recorded)
                    writer.write(_reply("405 Method Not Allowed", b'{"detail":"Method Not Allowed"}'))
                elif method == "POST" and is_protocol_probe(body):
                    self.probes.append(recorded)
                    writer.write(_reply("422 Unprocessable Entity", b'{"detail":"Invalid request format."}'))
                else:
                    self.requests.append(recorded)
                    if not await self._respond(method, route, writer):
                        break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # cancelled: the server is stopping while this request hangs or sleeps
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _respond(self, method: str, path: str, writer: asyncio.StreamWriter) -> bool:
        reply = _reply
        if path.endswith("/ping"):
            if self.ping_mode == "slow":
                await asyncio.sleep(self.delay_s)
            if self.ping_mode == "500":
                writer.write(reply("500 Internal Server Error", b'{"detail":"down"}'))
            else:
                writer.write(reply("200 OK", b"pong", "text/plain; charset=utf-8"))
            await writer.drain()
            return True
        mode = self.mode
        if mode == "hang":
            await asyncio.Event().wait()  # until the server stops (its tasks are cancelled)
        if mode == "slow":
            await asyncio.sleep(self.delay_s)
            mode = "ok"
        if mode == "ok":
            writer.write(reply("200 OK", json.dumps({"clip": fault_vector(self.tag)}).encode()))
        elif mode == "500":
            writer.write(reply("500 Internal Server Error", b'{"detail":"Failed to load model"}'))
        elif mode == "400":
            writer.write(reply("400 Bad Request", b'{"detail":"Image could not be decoded (fault server)"}'))
        elif mode == "garbage":
            writer.write(reply("200 OK", b"<html>this is not json{"))
        elif mode == "empty":
            writer.write(reply("200 OK", b'{"clip":"[]"}'))
        elif mode == "wrongdim":
            writer.write(reply("200 OK", b'{"clip":"[0.6,0.8]"}'))
        elif mode == "cut":
            head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
            writer.write(head + b'{"clip":"[0.1,0.2,')
            await writer.drain()
            return False
        elif mode == "reset":
            return False
        await writer.drain()
        return True

    @contextlib.contextmanager
    def running(self) -> Iterator[FaultServer]:
        loop = asyncio.new_event_loop()
        started = threading.Event()
        server_box: list[asyncio.base_events.Server] = []

        async def serve() -> None:
            server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
            server_box.append(server)
            started.set()

        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        asyncio.run_coroutine_threadsafe(serve(), loop)
        if not started.wait(10):
            raise RuntimeError("fault server did not start")
        try:
            yield self
        finally:

            async def stop() -> None:
                server_box[0].close()
                tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
                for task in tasks:
                    task.cancel()
                # Let them finish before the loop stops (a hung request's handler is still pending otherwise).
                await asyncio.gather(*tasks, return_exceptions=True)

            asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
