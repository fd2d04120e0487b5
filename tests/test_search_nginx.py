"""The nginx front (deploy/nginx): a real nginx started from the rendered template, on a free port, in front of
the Immich stub and a real gateway process.

Checked: the search request reaches the gateway and other API requests reach Immich; a websocket upgrade
passes through; large uploads pass; the add-on's script tag lands in Immich's HTML only (also when the client
asks for gzip), never in scripts or JSON; /ai/ is the gateway's; with the gateway down, Immich answers the
search. Also: the shipped immich.conf is exactly the template rendered with its defaults, and nginx accepts it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from db.migrate import migrate
from db.settings import DbSearchSettings
from db.testing import fresh_database, insert_asset, insert_ocr_rows, insert_user, load_immich_schema
from tests.gateway_support import gateway_process
from tests.immich_stub import (
    APP_SCRIPT,
    CANNED_SMART_SEARCH,
    ImmichStub,
    StubUser,
    search_gateway_env,
    wait_search_ready,
)
from tests.servers import REPO, free_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
TEMPLATE = REPO / "deploy" / "nginx" / "templates" / "immich.conf.template"
SHIPPED = REPO / "deploy" / "nginx" / "immich.conf"
SCRIPT_TAG = '<script src="/ai/addon.js" defer></script></head>'
DEFAULTS = {
    "IMMICH_ZH_AI_NGINX_PORT": "2283",
    "IMMICH_ZH_AI_IMMICH_UPSTREAM": "immich-server:2283",
    "IMMICH_ZH_AI_GATEWAY_UPSTREAM": "gateway:3003",
    "IMMICH_ZH_AI_RESOLVER": "127.0.0.11",
}

pytestmark = pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed (apt nginx-light)")


def render(values: dict[str, str]) -> str:
    """What the nginx image's envsubst does with a template: replace ${NAME} for the names given, leave every
    other $ (nginx's own variables) alone."""
    text = TEMPLATE.read_text(encoding="utf-8")
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    leftover = re.findall(r"\$\{[A-Z_]+\}", text)
    assert not leftover, f"template variables without a value: {leftover}"
    return text


def main_conf(tmp: Path, server_conf: Path) -> Path:
    """A complete nginx.conf around a conf.d file: every path (pid, logs, temp files) inside ``tmp``."""
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / sub).mkdir(exist_ok=True)
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"""
{user}
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {server_conf};
}}
""",
        encoding="utf-8",
    )
    return conf


@dataclass
class Nginx:
    base: str
    tmp: Path

    def error_log(self) -> str:
        return (self.tmp / "error.log").read_text(encoding="utf-8", errors="replace")


def wait_port(port: int, proc: subprocess.Popen[bytes], tmp: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {(tmp / 'error.log').read_text(errors='replace')}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/api/server/ping", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise TimeoutError("nginx did not start")


@contextlib.contextmanager
def nginx(tmp: Path, immich_url: str, gateway_url: str) -> Iterator[Nginx]:
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    values = {
        "IMMICH_ZH_AI_NGINX_PORT": f"127.0.0.1:{port}",
        "IMMICH_ZH_AI_IMMICH_UPSTREAM": immich_url.removeprefix("http://"),
        "IMMICH_ZH_AI_GATEWAY_UPSTREAM": gateway_url.removeprefix("http://"),
        "IMMICH_ZH_AI_RESOLVER": "127.0.0.1",  # never asked: the upstreams are IP literals here
    }
    server_conf = tmp / "immich.conf"
    server_conf.write_text(render(values), encoding="utf-8")
    conf = main_conf(tmp, server_conf)
    proc = subprocess.Popen([NGINX, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")])
    try:
        wait_port(port, proc, tmp)
        yield Nginx(f"http://127.0.0.1:{port}", tmp)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Front:
    stub: ImmichStub
    user: StubUser
    gateway: str
    nginx: Nginx


@pytest.fixture(scope="module")
def front(postgres_uri: str, clip_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    with fresh_database(postgres_uri) as uri:
        load_immich_schema(uri)
        migrate(DbSearchSettings(url=uri))
        stub = ImmichStub(uri)
        with psycopg.connect(uri, autocommit=True) as conn:
            user = stub.add_user(StubUser(insert_user(conn, name="a")))
            asset = insert_asset(conn, user.id, exif={})
            insert_ocr_rows(conn, asset, ["我爱北京天安门"])
        tmp = tmp_path_factory.mktemp("front")
        env = search_gateway_env(stub.url, uri, clip_model_dir)
        with stub.running(), gateway_process(env, tmp / "gateway.log") as gw:
            wait_search_ready(gw.base)
            with nginx(tmp / "nginx", stub.url, gw.base) as front_nginx:
                yield Front(stub, user, gw.base, front_nginx)


@pytest.fixture()
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as c:
        yield c


# ---- the files -------------------------------------------------------------------------------------------------


def test_shipped_conf_is_the_rendered_template() -> None:
    assert SHIPPED.read_text(encoding="utf-8") == render(DEFAULTS), (
        "deploy/nginx/immich.conf differs from the template rendered with its defaults; re-render it "
        "(deploy/nginx/README.md)"
    )


def test_nginx_accepts_the_shipped_conf(tmp_path: Path) -> None:
    # Docker names (immich-server, gateway) resolve per request, so the file is valid without them.
    done = subprocess.run(
        [NGINX, "-t", "-p", str(tmp_path), "-c", str(main_conf(tmp_path, SHIPPED)), "-e", str(tmp_path / "e.log")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    # ... and without a warning (a repeated sub_filter_types text/html once made it say 'duplicate MIME type')
    assert "[warn]" not in done.stderr and "duplicate MIME type" not in done.stderr, done.stderr


# ---- routing ---------------------------------------------------------------------------------------------------


def test_search_goes_to_the_gateway(client: httpx.Client, front: Front) -> None:
    before = len(front.stub.recorded("/api/search/smart"))
    reply = client.post(front.nginx.base + "/api/search/smart", json={"query": "ocr:北京"}, headers=front.user.cookie)
    assert reply.status_code == 200 and reply.headers["x-immich-zh-ai-search"] == "ocr"
    assert len(reply.json()["assets"]["items"]) == 1
    assert len(front.stub.recorded("/api/search/smart")) == before, "Immich's own search was not asked"


def test_other_api_requests_go_to_immich(client: httpx.Client, front: Front) -> None:
    reply = client.get(front.nginx.base + "/api/server/ping", headers={"host": "photos.example.test"})
    assert reply.json() == {"res": "pong"}
    seen = front.stub.recorded("/api/server/ping")[-1]
    assert seen.headers["host"] == "photos.example.test" and seen.headers["x-forwarded-proto"] == "http"
    assert seen.headers["x-forwarded-for"] == "127.0.0.1"
    # the gateway never sees them (it would answer 404)
    about = client.get(front.nginx.base + "/api/server/about")
    assert "</head>" in about.json()["note"] and "addon.js" not in about.text


def test_large_uploads_pass(client: httpx.Client, front: Front) -> None:
    body = os.urandom(3 * 1024 * 1024)  # over nginx's default 1 MiB client_max_body_size
    reply = client.post(front.nginx.base + "/api/assets", content=body, headers=front.user.cookie)
    assert reply.status_code == 201 and reply.json() == {"receivedBytes": len(body)}


def test_websocket_upgrade_passes_through(front: Front) -> None:
    from websockets.sync.client import connect

    url = front.nginx.base.replace("http://", "ws://") + "/api/socket.io/?EIO=4&transport=websocket"
    with connect(url, additional_headers=front.user.cookie, open_timeout=10) as ws:
        ws.send("hello")
        assert ws.recv(timeout=10) == "echo:hello"
        ws.send("再见")
        assert ws.recv(timeout=10) == "echo:再见"
    seen = [r for r in front.stub.requests if r.method == "WEBSOCKET"][-1]
    assert seen.query == "EIO=4&transport=websocket" and seen.headers["cookie"] == front.user.cookie["cookie"]
    assert seen.headers["upgrade"].lower() == "websocket"


def test_ai_prefix_goes_to_the_gateway(client: httpx.Client, front: Front) -> None:
    reply = client.post(front.nginx.base + "/ai/assets/00000000-0000-4000-8000-000000000000/ocr")
    assert reply.status_code == 401 and "Authentication required" in reply.json()["detail"]


# ---- the add-on's script tag ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/search?query=%7B%22query%22%3A%22ocr%3A%E5%8F%91%E7%A5%A8%22%7D", "/photos/x"])
@pytest.mark.parametrize("encoding", ["gzip, deflate, br", "identity"])
def test_script_tag_is_injected_into_immichs_html(client: httpx.Client, front: Front, path: str, encoding: str) -> None:
    reply = client.get(front.nginx.base + path, headers={"accept-encoding": encoding})
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/html")
    html = reply.text  # httpx undoes nginx's own gzip
    assert html.count(SCRIPT_TAG) == 1 and html.count("</head>") == 1
    assert html.index(SCRIPT_TAG) < html.index("<body>")
    # nginx asked Immich for an uncompressed page (sub_filter cannot see into gzip)
    assert "accept-encoding" not in front.stub.requests[-1].headers


def test_script_tag_is_not_injected_elsewhere(client: httpx.Client, front: Front) -> None:
    script = client.get(front.nginx.base + "/_app/immutable/app.js", headers={"accept-encoding": "gzip"})
    assert script.text == APP_SCRIPT and "addon.js" not in script.text
    # the bundles keep the client's Accept-Encoding (Immich serves them precompressed)
    assert front.stub.requests[-1].headers.get("accept-encoding") == "gzip"


# ---- the gateway down --------------------------------------------------------------------------------------------


def test_search_falls_back_to_immich_when_the_gateway_is_down(
    client: httpx.Client, front: Front, tmp_path: Path
) -> None:
    dead_gateway = f"http://127.0.0.1:{free_port()}"
    with nginx(tmp_path / "nginx", front.stub.url, dead_gateway) as fallback:
        body = '{"query":"ocr:发票","page":1}'.encode()
        reply = client.post(fallback.base + "/api/search/smart", content=body, headers=front.user.cookie)
        assert reply.status_code == 200 and reply.json() == CANNED_SMART_SEARCH
        assert front.stub.recorded("/api/search/smart")[-1].body == body
        # the rest of Immich is unaffected; /ai/ is an honest 502
        assert client.get(fallback.base + "/api/server/ping").json() == {"res": "pong"}
        assert client.post(fallback.base + "/ai/assets/x/ocr").status_code == 502
