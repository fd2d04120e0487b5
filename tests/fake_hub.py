"""A local fake Hugging Face Hub: a real HTTP server on loopback holding repositories in memory.

The server implements what ``huggingface_hub.snapshot_download`` calls (read from its source):

* ``GET /api/models/<owner>/<repo>/revision/<rev>``: ``id``, ``sha`` and ``siblings`` (older
  huggingface_hub versions list files from here);
* ``GET /api/models/<owner>/<repo>/tree/<rev>?recursive=…``: the file list newer versions use;
* ``HEAD|GET /<owner>/<repo>/resolve/<rev>/<path>``: ``X-Repo-Commit`` (required, else "not a Hub
  endpoint"), ``ETag`` (required) and ``Content-Length`` (checked against the bytes received);
* ``X-Error-Code: RepoNotFound`` on unknown repositories.

Faults per file (``Repo.failures``): ``"500"`` answers every GET with 500; ``"truncate"`` cuts the
first GET half-way through the body (the connection drops), later GETs answer 500.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

OWNER = "test-owner"


def files_of(folder: Path) -> dict[str, bytes]:
    """A model folder as repository files: relative path -> bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass
class Repo:
    files: dict[str, bytes]
    sha: str
    # path -> "500" (GET answers 500) or "truncate" (first GET stops half-way, later ones answer 500)
    failures: dict[str, str] = field(default_factory=dict)


class FakeHub:
    """A threaded HTTP server on 127.0.0.1 holding repositories in memory; records every request."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._truncated: set[tuple[str, str]] = set()
        self.file_delay_s = 0.0  # seconds each file download waits before its body: lets requests overlap
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

            def do_GET(self) -> None:
                hub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self._thread.start()

    def add(self, name: str, files: dict[str, bytes], failures: dict[str, str] | None = None) -> Repo:
        digest = hashlib.sha1(b"".join(k.encode() + v for k, v in sorted(files.items()))).hexdigest()
        repo = Repo(files, digest, failures or {})
        self.repos[name] = repo
        return repo

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def file_requests(self) -> list[str]:
        return [path for method, path, _ in self.requests if method == "GET" and "/resolve/" in path]

    # -- request handling ------------------------------------------------------------------------

    def _handle(self, req: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(req.path).path)
        with self._lock:
            self.requests.append(("HEAD" if head else "GET", path, dict(req.headers)))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo_id = f"{parts[2]}/{parts[3]}"
            repo = self.repos.get(repo_id)
            if repo is None:
                return self._send(req, 404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"}, head)
            if parts[4] == "revision":
                body = {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": repo.sha,
                    "private": False,
                    "siblings": [{"rfilename": p} for p in repo.files],
                }
            else:
                body = [
                    {"type": "file", "path": p, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for p, data in repo.files.items()
                ]
            return self._send(req, 200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_id = f"{parts[0]}/{parts[1]}"
            repo = self.repos.get(repo_id)
            file_path = "/".join(parts[4:])
            if repo is None:
                return self._send(req, 404, b"", {"X-Error-Code": "RepoNotFound"}, head)
            data = repo.files.get(file_path)
            if data is None:
                return self._send(req, 404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.sha}, head)
            headers = {
                "X-Repo-Commit": repo.sha,
                "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                "Content-Type": "application/octet-stream",
            }
            failure = repo.failures.get(file_path)
            if not head and failure == "truncate" and (repo_id, file_path) not in self._truncated:
                self._truncated.add((repo_id, file_path))
                req.send_response(200)
                for key, value in headers.items():
                    req.send_header(key, value)
                req.send_header("Content-Length", str(len(data)))
                req.end_headers()
                req.wfile.write(data[: len(data) // 2])
                req.wfile.flush()
                req.close_connection = True  # the connection drops mid-file
                return None
            if not head and failure is not None:
                return self._send(req, 500, b"storage backend failed", {}, head)
            if not head and self.file_delay_s:
                time.sleep(self.file_delay_s)
            return self._send(req, 200, data, headers, head)
        return self._send(req, 404, b"", {}, head)

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str], head: bool) -> None:
        req.send_response(status)
        for key, value in headers.items():
            req.send_header(key, value)
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        if not head:
            req.wfile.write(body)


def isolate_hf(home: Path, monkeypatch: Any) -> None:
    """huggingface_hub must not touch the user's cache or send the user's token (``monkeypatch``: pytest's)."""
    monkeypatch.setenv("HF_HOME", str(home / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hf-home" / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
