"""Helpers for the library tests: settings on the session's PostgreSQL with a schema of their own, test
images, and a loopback HTTP server with well-behaved and hostile image URLs."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import skimage.data
from PIL import Image

from library.settings import LibrarySettings

REPO = Path(__file__).resolve().parents[1]
PDQ_DATA = Path(__file__).parent / "data" / "pdq"


def library_env(postgres_uri: str, data_dir: Path, **extra: str) -> dict[str, str]:
    """LIBRARY_* variables for a fresh library in its own schemas of the shared test database."""
    tag = uuid.uuid4().hex[:10]
    env = {
        "LIBRARY_DATABASE_URL": postgres_uri,
        "LIBRARY_SCHEMA_NAME": f"lib_{tag}",
        "LIBRARY_TEXT_SCHEMA_NAME": f"libtext_{tag}",
        "LIBRARY_DATA_DIR": str(data_dir),
        "LIBRARY_RETRY_BASE_S": "0",
    }
    env.update({k.upper() if k.startswith("LIBRARY_") else f"LIBRARY_{k.upper()}": v for k, v in extra.items()})
    return env


def settings_from(env: dict[str, str]) -> LibrarySettings:
    fields: dict[str, Any] = {k.removeprefix("LIBRARY_").lower(): v for k, v in env.items()}
    return LibrarySettings(**fields)


def encode(image: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


def distinct_images(n: int, size: int = 96) -> list[bytes]:
    """``n`` different, detailed PNGs (random blocks at several scales: PDQ quality 100, far apart)."""
    rng = np.random.default_rng(1234)
    out = []
    for _ in range(n):
        blocks = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(blocks).resize((size, size), Image.Resampling.NEAREST)
        out.append(encode(image))
    return out


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header claiming width x height grey pixels, with a tiny (truncated) body."""
    import struct

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = b"\x00" + b"\x00" * width
    body = zlib.compress(row * 64, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


# ---- a loopback HTTP server with hostile routes ------------------------------------------------------------


class ImageServer:
    """Serves ``files`` (path -> bytes) and hostile routes:

    /404, /page.jpg (HTML), /bomb.png, /truncated.jpg, /endless (never-ending body), /drip (one byte a
    second), /loop (redirects to itself), /redirect?to=URL, /short (Content-Length larger than the body).
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.hits: dict[str, int] = {}
        self.hosts: list[str] = []  # Host header of every request
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path, _, query = self.path.partition("?")
                server.hits[path] = server.hits.get(path, 0) + 1
                server.hosts.append(str(self.headers.get("Host")))
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    server.route(self, path, query)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return self.base + path

    def route(self, h: BaseHTTPRequestHandler, path: str, query: str) -> None:
        def send(status: int, body: bytes, ctype: str = "image/jpeg", headers: dict[str, str] | None = None) -> None:
            h.send_response(status)
            h.send_header("Content-Type", ctype)
            h.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(body)

        if path in self.files:
            send(200, self.files[path], "application/octet-stream")
        elif path == "/page.jpg":
            send(200, b"<!doctype html><html><body>not an image</body></html>", "image/jpeg")
        elif path == "/bomb.png":
            send(200, bomb_png(), "image/png")
        elif path == "/truncated.jpg":
            data = encode(photo("astronaut"), "JPEG", quality=90)
            send(200, data[: len(data) // 3], "image/jpeg")
        elif path == "/short":
            h.send_response(200)
            h.send_header("Content-Length", "100000")
            h.end_headers()
            h.wfile.write(b"\xff\xd8\xff" + b"\x00" * 100)
        elif path == "/endless":
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.end_headers()
            chunk = b"\xff" * 65536
            for _ in range(100000):
                h.wfile.write(chunk)
        elif path == "/drip":
            h.send_response(200)
            h.send_header("Content-Type", "image/jpeg")
            h.end_headers()
            for _ in range(120):
                h.wfile.write(b"\xff")
                h.wfile.flush()
                time.sleep(0.5)
        elif path == "/loop":
            send(302, b"", headers={"Location": "/loop"})
        elif path == "/redirect":
            send(302, b"", headers={"Location": query.removeprefix("to=")})
        else:
            send(404, b"not found", "text/plain")

    def __enter__(self) -> ImageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def library_server(env: dict[str, str], log: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m library serve`` on loopback with ``env``; stopped (SIGTERM) at the end."""
    from tests.servers import wait_for_http

    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "library",
                "--log-level",
                "info",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=REPO,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_http(f"http://127.0.0.1:{port}/ping", timeout_s=90, proc=proc)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
