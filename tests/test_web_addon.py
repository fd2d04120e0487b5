"""The Immich web add-on and the admin status page, end to end in a real browser.

Debian's headless Chromium (driven through its chromedriver by Selenium) loads pages through a real nginx
that injects ``<script src="/ai/addon.js" defer>`` into the HTML and proxies ``/ai/`` to a real gateway
process. The regenerate endpoints are the gateway's real ones: they identify the caller with Immich, read
the asset and its preview as the caller (``tests/immich_stub.py``, Immich's API over a real PostgreSQL with
Immich's tables), run the real OCR model and a tiny CLIP model, and write Immich's tables.

Immich's web app is played by ``tests/web/``: a small single-page app reproducing the asset viewer's ⋮ menu
contract (reference §5.2), SvelteKit-style navigation (history.pushState) and Svelte-style re-rendering.
nginx serves it for HTML routes and sends ``/api/`` to the Immich stub, as one origin.

Screenshots of the open menu (English, Chinese), toasts, the status page and its refusal pages go to
``.artifacts/web/``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import psycopg
import pytest
import uvicorn
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import Route

from db.testing import add_partner, fresh_database, insert_asset, insert_user, load_immich_schema
from tests.browser import CHROMEDRIVER, CHROMIUM, headless_chromium
from tests.immich_stub import ImmichStub, StubUser, render_text_jpeg
from tests.servers import REPO, free_port, python_module_server, wait_for_http

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WEB_FIXTURES = Path(__file__).resolve().parent / "web"
ARTIFACTS = REPO / ".artifacts" / "web"

pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK) and os.access(NGINX, os.X_OK)),
    reason="needs Debian's chromium, chromium-driver and nginx (scripts/bootstrap.sh --test installs them)",
)

ADMIN_TOKEN = "sess-admin-0123456789abcdef0123456789abcdef"
USER_TOKEN = "sess-user-0123456789abcdef0123456789abcdef"
ADMIN_API_KEY = "key-admin-0123456789abcdef0123456789abcdef"

ASSET_TEXT = "11111111-1111-4111-8111-111111111111"  # the admin's, a preview with two lines of text
ASSET_BLANK = "22222222-2222-4222-8222-222222222222"  # the admin's, a blank preview
ASSET_NO_PREVIEW = "33333333-3333-4333-8333-333333333333"  # the admin's, no preview generated yet
ASSET_USERS = "55555555-5555-4555-8555-555555555555"  # the (non-admin) user's own, a blank preview
NOT_FOUND = "99999999-9999-4999-8999-999999999999"  # no such asset: the stand-in renders Immich's error page
UNINSTALLED_CLIP = "ViT-B-32__openai"  # Immich's default CLIP model; not in the test model folder
ALBUM = "44444444-4444-4444-8444-444444444444"
CLIP_MODEL = "test-cn-clip-512"  # tests/builders/clip_models.py: cn-clip layout, 512-d like Immich's column

# Secrets in the gateway's configuration that must never reach a browser.
MT_API_KEY = "mt-secret-api-key-789"
URL_PASSWORD = "url-secret-password-123"
URL_QUERY_TOKEN = "url-secret-query-token-456"

OUR_ITEMS = "li[data-immich-zh-ai]"
INJECTED = '<script src="/ai/addon.js" defer></script>'


# ---- the web app stand-in --------------------------------------------------------------------------------


def web_app() -> Starlette:
    """index.html for every HTML route (Immich's SPA fallback, no-store) and ``/_app/*``, gzip-compressed when
    the client accepts it (as Immich's precompressed files are): nginx must ask for identity to inject."""

    async def shell(request: Request) -> Response:
        return HTMLResponse((WEB_FIXTURES / "index.html").read_text(), headers={"Cache-Control": "no-store"})

    async def static(request: Request) -> Response:
        types = {"spa.js": "text/javascript", "immich-like.css": "text/css"}
        name = request.path_params["name"]
        if name not in types:
            return Response(status_code=404)
        return FileResponse(WEB_FIXTURES / name, media_type=types[name])

    return Starlette(
        routes=[Route("/_app/{name}", static), Route("/{path:path}", shell)],
        middleware=[Middleware(GZipMiddleware, minimum_size=10)],
    )


class ThreadedServer:
    def __init__(self, app: Starlette) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("web app stand-in did not start")
            time.sleep(0.01)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def blank_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1440, 960), "white").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# ---- nginx -----------------------------------------------------------------------------------------------


def nginx_conf(folder: Path, port: int, web: str, immich_api: str, gateway: str) -> str:
    """deploy/nginx/immich.conf's relevant parts: the add-on injected into HTML, /ai/ to the gateway, the rest
    to Immich (here split in two: the web app stand-in, and the Immich API stub under /api/)."""
    user = "user root root;" if os.geteuid() == 0 else ""  # workers as root can read pytest's 0700 folders
    temp = " ".join(
        f"{name}_temp_path {folder / name};" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""
daemon off;
worker_processes 1;
pid {folder / "nginx.pid"};
error_log {folder / "error.log"} warn;
{user}
events {{ worker_connections 256; }}
http {{
    access_log {folder / "access.log"};
    {temp}
    server {{
        listen 127.0.0.1:{port};
        location /ai/ {{
            proxy_pass {gateway};
            proxy_set_header Host $host;
            proxy_read_timeout 300s;
        }}
        location /api/ {{
            proxy_pass {immich_api};
            proxy_set_header Host $host;
        }}
        location / {{
            proxy_pass {web};
            proxy_set_header Host $host;
            # sub_filter only rewrites uncompressed bodies.
            proxy_set_header Accept-Encoding "";
            sub_filter '</head>' '{INJECTED}</head>';
            sub_filter_once on;
        }}
    }}
}}
"""


@contextlib.contextmanager
def nginx(folder: Path, web: str, immich_api: str, gateway: str) -> Iterator[str]:
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = folder / "nginx.conf"
    conf.write_text(nginx_conf(folder, port, web, immich_api, gateway))
    proc = subprocess.Popen([NGINX, "-p", str(folder), "-c", str(conf)], stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(base + "/ai/addon.js", timeout_s=15, proc=proc)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- fixtures --------------------------------------------------------------------------------------------


@dataclass
class Stack:
    base: str  # nginx: what the browser talks to
    gateway: str  # the gateway, directly
    immich: ImmichStub
    db_uri: str
    gateway_log: Path
    immich_config: Path  # Immich's machine-learning settings, as the gateway reads them


def set_clip_model(config: Path, model: str) -> None:
    """Immich's machine-learning settings as an admin would set them (IMMICH_CONFIG_FILE's format).

    maxDistance 1.2 does not fit buffalo_l (what answers Immich's faces): /ai/ must show the warning."""
    config.write_text(
        json.dumps({"machineLearning": {"clip": {"modelName": model}, "facialRecognition": {"maxDistance": 1.2}}})
    )


def wait_for_search_database(gateway: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    search: dict[str, Any] = {}
    while time.monotonic() < deadline:
        search = httpx.get(gateway + "/status", timeout=5, trust_env=False).json().get("search", {})
        if search.get("database_ready"):
            return
        time.sleep(0.2)
    raise TimeoutError(f"the gateway's search database did not become ready: {search}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, postgres_uri: str, clip_model_dir: Path) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("web")
    with fresh_database(postgres_uri, prefix="zh_web") as db_uri:
        load_immich_schema(db_uri)
        with psycopg.connect(db_uri, autocommit=True) as conn:
            admin_id = insert_user(conn, email="admin@example.test", name="Admin")
            user_id = insert_user(conn, email="user@example.test", name="User")
            for asset in (ASSET_TEXT, ASSET_BLANK, ASSET_NO_PREVIEW):
                insert_asset(conn, admin_id, asset_id=UUID(asset))
            insert_asset(conn, user_id, asset_id=UUID(ASSET_USERS))
            # The admin shares their library with the user: the user may view the admin's photos (a partner).
            add_partner(conn, admin_id, user_id, in_timeline=True)
        admin = StubUser(admin_id, "admin@example.test", "Admin", ADMIN_API_KEY, ADMIN_TOKEN, is_admin=True)
        user = StubUser(user_id, "user@example.test", "User", session_token=USER_TOKEN)
        immich = ImmichStub(db_uri, [admin, user])
        immich.previews[UUID(ASSET_TEXT)] = render_text_jpeg(["发票 2024", "Invoice 42"])
        immich.previews[UUID(ASSET_BLANK)] = blank_jpeg()
        immich.previews[UUID(ASSET_USERS)] = blank_jpeg()
        # Immich's machine-learning settings as an admin would set them (IMMICH_CONFIG_FILE's format).
        config = folder / "immich-config.json"
        set_clip_model(config, CLIP_MODEL)
        backends = {
            "local": {"kind": "local"},
            # Never contacted (health checks off, only a face failover, no face requests): it is there to carry
            # secrets into /status.
            "mt": {
                "kind": "mtphotos",
                "url": f"http://admin:{URL_PASSWORD}@127.0.0.1:9/mt?token={URL_QUERY_TOKEN}",
                "api_key": MT_API_KEY,
            },
        }
        env = {
            "GATEWAY_IMMICH__URL": immich.url,
            "GATEWAY_IMMICH__CONFIG_FILE": str(config),
            "GATEWAY_IMMICH__CONFIG_TTL_S": "0",  # a test switches Immich's CLIP model to one not installed
            "DB_SEARCH_URL": db_uri,
            "AI_SERVICE_MODEL_DIR": str(clip_model_dir),
            "GATEWAY_BACKENDS": json.dumps(backends),
            "GATEWAY_ROUTES__CLIP": '["local"]',
            "GATEWAY_ROUTES__OCR": '["local"]',
            "GATEWAY_ROUTES__FACIAL_RECOGNITION": '["local", "mt"]',
            "GATEWAY_HEALTH__INTERVAL_S": "0",
            "GATEWAY_LOG_FORMAT": "text",
        }
        log = folder / "gateway.log"
        with (
            immich.running(),
            ThreadedServer(web_app()) as web_url,
            python_module_server("gateway", env, log=log) as gateway_url,
            nginx(folder / "nginx", web_url, immich.url, gateway_url) as base,
        ):
            wait_for_search_database(gateway_url)
            yield Stack(base, gateway_url, immich, db_uri, log, config)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    profile = tmp_path_factory.mktemp("chromium-profile")
    with headless_chromium(profile, window="1280,1100", flags=("--lang=en-US",)) as driver:
        yield driver


# ---- browser helpers -------------------------------------------------------------------------------------


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], Any], timeout: float = 8.0) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def console(driver: WebDriver) -> list[dict[str, Any]]:
    """Browser console entries since the last call (chromedriver hands each out once)."""
    return list(driver.get_log("browser"))


def problems(entries: list[dict[str, Any]], allow: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    return [e for e in entries if e["level"] in ("SEVERE", "WARNING") and not any(a in e["message"] for a in allow)]


def open_page(
    driver: WebDriver, stack: Stack, path: str, *, lang: str | None = "en", token: str | None = ADMIN_TOKEN
) -> None:
    """Sign in (the session cookie, as Immich sets it), choose the UI language (Immich's localStorage 'lang'),
    then load ``path`` through nginx."""
    driver.get(stack.base + "/auth/login")  # any page of the origin, to reach its cookies and storage
    driver.delete_all_cookies()
    if token:
        driver.add_cookie({"name": "immich_access_token", "value": token, "path": "/", "httpOnly": True})
    driver.execute_script("localStorage.clear(); if (arguments[0]) localStorage.setItem('lang', arguments[0]);", lang)
    console(driver)  # drop what the set-up page logged
    driver.get(stack.base + path)


def wait_for_items(driver: WebDriver, asset_id: str, count: int = 3) -> None:
    """Until the viewer shows ``asset_id`` with ``count`` items of ours (3 for the owner, 1 for a viewer)."""
    wait_for(
        driver,
        lambda d: d.execute_script(
            "return !!document.querySelector(`.photo[data-asset='${arguments[0]}']`)"
            " && document.querySelectorAll(arguments[1]).length === arguments[2]",
            asset_id,
            OUR_ITEMS,
            count,
        ),
    )


MENU_STATE_JS = """
const button = document.querySelector('[data-testid="asset-viewer-navbar-actions"] button[aria-haspopup="true"]');
const list = document.getElementById(button.getAttribute('aria-controls'));
const items = [...list.children].filter((el) => el.tagName === 'LI');
const ours = [...document.querySelectorAll('li[data-immich-zh-ai]')];
return {
  expanded: button.getAttribute('aria-expanded'),
  labels: items.map((li) => li.textContent.trim()),
  ours: ours.map((li) => ({
    kind: li.dataset.immichZhAi, id: li.id, label: li.textContent.trim(), cls: li.className,
    role: li.getAttribute('role'), inList: li.parentElement === list, icon: !!li.querySelector('svg path'),
  })),
  lastThree: [...list.children].slice(-3).map((el) => el.dataset.immichZhAi || null),
  nativeClass: items.find((li) => !li.dataset.immichZhAi).className,
  ids: [...document.querySelectorAll('[id]')].map((el) => el.id),
};
"""


def menu_state(driver: WebDriver) -> dict[str, Any]:
    return driver.execute_script(MENU_STATE_JS)  # type: ignore[no-any-return]


def open_menu(driver: WebDriver) -> None:
    driver.execute_script(
        "document.querySelector('[data-testid=\"asset-viewer-navbar-actions\"] button[aria-haspopup]').click()"
    )
    wait_for(driver, lambda d: menu_state(d)["expanded"] == "true")


def click_item(driver: WebDriver, kind: str) -> None:
    open_menu(driver)
    # A real pointer click at the item's position: the menu must be open and the item visible to receive it.
    driver.find_element("css selector", f'li[data-immich-zh-ai="{kind}"]').click()


TOASTS_JS = """
const host = document.querySelector('[data-immich-zh-ai="toasts"]');
if (!host) return [];
return [...host.shadowRoot.querySelectorAll('.toast')].map((t) => ({
  state: t.dataset.state, text: t.querySelector('.msg').textContent,
  buttons: [...t.querySelectorAll('button')].map((b) => b.className),
}));
"""


def last_toast(driver: WebDriver) -> dict[str, Any]:
    def settled(d: WebDriver) -> dict[str, Any] | None:
        toasts = d.execute_script(TOASTS_JS)
        return toasts[-1] if toasts and toasts[-1]["state"] != "busy" else None

    return wait_for(driver, settled)  # type: ignore[no-any-return]


def screenshot(driver: WebDriver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    return path


# ---- serving ---------------------------------------------------------------------------------------------


def test_addon_is_served_with_cache_validators_and_injected_once(stack: Stack) -> None:
    with httpx.Client(trust_env=False) as client:
        script = client.get(stack.base + "/ai/addon.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
        assert script.headers["cache-control"] == "public, max-age=300"
        etag = script.headers["etag"]
        assert etag.startswith('"') and len(etag) > 10
        again = client.get(stack.base + "/ai/addon.js", headers={"If-None-Match": f'W/"stale", {etag}'})
        assert again.status_code == 304 and not again.content
        assert client.get(stack.base + "/ai/addon.js", headers={"If-None-Match": '"stale"'}).status_code == 200
        # The HTML, asked for compressed as browsers do, still gets the script exactly once.
        page = client.get(stack.base + "/photos/" + ASSET_TEXT, headers={"Accept-Encoding": "gzip, br"})
        assert page.text.count(INJECTED) == 1
        assert page.text.index(INJECTED) < page.text.index("</head>")


# ---- the menu --------------------------------------------------------------------------------------------


def test_items_are_added_once_in_english_styled_like_immichs(stack: Stack, browser: WebDriver) -> None:
    open_page(browser, stack, f"/photos/{ASSET_TEXT}", lang="en")
    wait_for_items(browser, ASSET_TEXT)
    state = menu_state(browser)
    assert [i["label"] for i in state["ours"]] == ["Regenerate OCR", "Regenerate smart search", "Find similar"]
    assert state["lastThree"] == ["ocr", "clip", "similar"]  # after Immich's own "Refresh …" items
    for item in state["ours"]:
        assert item["inList"] and item["role"] == "menuitem" and item["icon"]
        assert item["cls"] == state["nativeClass"]  # a copy of Immich's item, not a style of our own
    assert len(state["ids"]) == len(set(state["ids"]))  # ids stay unique (keyboard navigation uses them)
    assert state["expanded"] == "false"  # inserted while the menu is closed; it stays closed
    open_menu(browser)
    shot = screenshot(browser, "menu-en.png")
    assert shot.stat().st_size > 5000
    assert problems(console(browser)) == []


def test_items_follow_immichs_chinese_language_setting(stack: Stack, browser: WebDriver) -> None:
    open_page(browser, stack, f"/albums/{ALBUM}/photos/{ASSET_TEXT}", lang="zh-CN")
    wait_for_items(browser, ASSET_TEXT)
    state = menu_state(browser)
    assert "幻灯片放映" in state["labels"]  # the stand-in itself renders in Chinese
    assert [i["label"] for i in state["ours"]] == ["重新识别文字 (OCR)", "重新生成智能搜索", "查找相似照片"]
    assert browser.execute_script("return window.__immichZhAi.assetId()") == ASSET_TEXT
    open_menu(browser)
    screenshot(browser, "menu-zh.png")
    assert problems(console(browser)) == []


def test_language_codes_and_a_change_of_language(stack: Stack, browser: WebDriver) -> None:
    open_page(browser, stack, f"/photos/{ASSET_TEXT}", lang="en")
    wait_for_items(browser, ASSET_TEXT)
    chinese = [
        "zh-CN",
        "zh-TW",
        "zh-Hans",
        "zh-Hant",
        "zh_SIMPLIFIED",
        "zh-SIMPLIFIED",
        "zh",
        "ZH-cn",
        "yue-Hant",
        '"zh-CN"',
    ]
    english = ["en", "en-US", "de", "ja", "fr-CA", "", "zhx", "chinese"]
    verdicts = browser.execute_script(
        "return arguments[0].map((c) => window.__immichZhAi.languageOf(c))", chinese + english
    )
    assert verdicts == ["zh"] * len(chinese) + ["en"] * len(english)
    # Switching Immich's language re-renders text in place: opening the menu relabels our items.
    browser.execute_script("localStorage.setItem('lang', 'zh-TW')")
    open_menu(browser)
    wait_for(
        browser,
        lambda d: (
            [i["label"] for i in menu_state(d)["ours"]] == ["重新识别文字 (OCR)", "重新生成智能搜索", "查找相似照片"]
        ),
    )
    # Without a setting, the browser's language decides (this browser runs with --lang=en-US).
    browser.execute_script("localStorage.removeItem('lang')")
    assert browser.execute_script("return window.__immichZhAi.language()") == "en"


def test_items_survive_rerenders_and_navigation_without_duplicates(stack: Stack, browser: WebDriver) -> None:
    open_page(browser, stack, f"/photos/{ASSET_TEXT}", lang="en")
    wait_for_items(browser, ASSET_TEXT)
    first_ids = [i["id"] for i in menu_state(browser)["ours"]]
    for _ in range(3):  # Svelte re-renders the menu's own items (e.g. after favouriting)
        browser.execute_script("window.stubApp.rerenderItems()")
        time.sleep(0.05)
        state = menu_state(browser)
        assert [i["kind"] for i in state["ours"]] == ["ocr", "clip", "similar"]
        assert [i["id"] for i in state["ours"]] == first_ids  # kept, not re-created
        assert state["lastThree"] == ["ocr", "clip", "similar"]
    # Client-side navigation to the next asset: the viewer is destroyed and rendered again.
    browser.execute_script("document.getElementById('next-asset').click()")
    wait_for_items(browser, ASSET_BLANK)
    assert browser.current_url.endswith(f"/photos/{ASSET_BLANK}")
    assert browser.execute_script("return window.__immichZhAi.assetId()") == ASSET_BLANK
    assert [i["kind"] for i in menu_state(browser)["ours"]] == ["ocr", "clip", "similar"]
    browser.back()  # popstate
    wait_for_items(browser, ASSET_TEXT)
    assert [i["kind"] for i in menu_state(browser)["ours"]] == ["ocr", "clip", "similar"]
    # A second copy of the script (e.g. injected by two proxies) adds nothing.
    browser.execute_script(
        "const s = document.createElement('script'); s.src = '/ai/addon.js?again'; document.head.append(s);"
    )
    time.sleep(0.3)
    browser.execute_script("window.stubApp.rerender()")
    wait_for_items(browser, ASSET_TEXT)
    assert len(menu_state(browser)["ours"]) == 3
    assert problems(console(browser)) == []


# ---- clicking --------------------------------------------------------------------------------------------


def immich_calls(stack: Stack, path: str) -> list[str | None]:
    """The credential the gateway presented to Immich on each call to ``path`` (it forwards the caller's own)."""
    return [r.headers.get("x-immich-user-token") or r.headers.get("x-api-key") for r in stack.immich.recorded(path)]


def db_rows(stack: Stack, query: str, asset_id: str) -> int:
    with psycopg.connect(stack.db_uri, autocommit=True) as conn:
        row = conn.execute(query, [UUID(asset_id)]).fetchone()
    assert row is not None
    return int(row[0])


def test_regenerate_ocr_runs_as_the_signed_in_user_and_reports_lines(stack: Stack, browser: WebDriver) -> None:
    open_page(browser, stack, f"/photos/{ASSET_TEXT}", lang="en")
    wait_for_items(browser, ASSET_TEXT)
    previews_before = len(immich_calls(stack, f"/api/assets/{ASSET_TEXT}/thumbnail"))
    click_item(browser, "ocr")
    toast = last_toast(browser)
    screenshot(browser, "toast-en.png")
    assert toast["state"] == "ok", toast
    found = re.fullmatch(r"OCR done: (\d+) lines? of text found\. Reload the page to see the new text\.", toast["text"])
    assert found, toast["text"]
    assert "reload" in toast["buttons"]
    # The gateway wrote what it reported into Immich's table, and read the preview as the signed-in user: the
    # browser's httpOnly session cookie is the only credential there is.
    lines = int(found.group(1))
    assert lines >= 2
    assert db_rows(stack, 'SELECT count(*) FROM asset_ocr WHERE "assetId" = %s', ASSET_TEXT) == lines
    previews = immich_calls(stack, f"/api/assets/{ASSET_TEXT}/thumbnail")
    assert previews[previews_before:] == [ADMIN_TOKEN]
    wait_for(browser, lambda d: menu_state(d)["expanded"] == "false")  # the menu closed
    assert browser.execute_script("return window.stubApp.clicked") == []  # no Immich item was triggered
    # The toast's Reload action reloads the page, which is what shows the new OCR text.
    browser.execute_script("window.__beforeReload = true")
    browser.execute_script(
        "document.querySelector('[data-immich-zh-ai=\"toasts\"]').shadowRoot.querySelector('button.reload').click()"
    )
    wait_for(browser, lambda d: d.execute_script("return window.__beforeReload === undefined"))
    wait_for_items(browser, ASSET_TEXT)
    assert problems(console(browser)) == []


def test_regenerate_reports_no_text_in_chinese_and_smart_search(stack: Stack, browser: WebDriver) -> None:
    open_page(browser, stack, f"/photos/{ASSET_BLANK}", lang="zh-CN")
    wait_for_items(browser, ASSET_BLANK)
    click_item(browser, "ocr")
    toast = last_toast(browser)
    assert toast["state"] == "info" and toast["text"] == "文字识别完成：未发现文字。", toast
    # A double click starts one regeneration, not two.
    previews_before = len(immich_calls(stack, f"/api/assets/{ASSET_BLANK}/thumbnail"))
    browser.execute_script(
        "const li = document.querySelector('li[data-immich-zh-ai=\"clip\"]'); li.click(); li.click();"
    )
    wait_for(browser, lambda d: len(d.execute_script(TOASTS_JS)) == 2)
    toast = last_toast(browser)
    assert toast["state"] == "ok", toast
    assert toast["text"] == f"智能搜索已重新生成（{CLIP_MODEL}，512 维）。"
    assert len(immich_calls(stack, f"/api/assets/{ASSET_BLANK}/thumbnail")) == previews_before + 1
    assert db_rows(stack, 'SELECT count(*) FROM smart_search WHERE "assetId" = %s', ASSET_BLANK) == 1
    assert problems(console(browser)) == []


def test_only_find_similar_on_a_partners_photo(stack: Stack, browser: WebDriver) -> None:
    """Immich offers its per-photo jobs only to the owner; a partner viewing the photo gets ours neither, only
    the search by the photo, which is theirs to run."""
    asked = len(stack.immich.recorded(f"/api/assets/{ASSET_TEXT}"))
    open_page(browser, stack, f"/photos/{ASSET_TEXT}", lang="en", token=USER_TOKEN)
    wait_for(browser, lambda d: d.execute_script("return !!document.querySelector('ul[role=menu] li')"))
    # The add-on asked Immich, as the signed-in user, whose photo this is (Immich shows it to the partner) ...
    wait_for(browser, lambda d: len(stack.immich.recorded(f"/api/assets/{ASSET_TEXT}")) > asked)
    for path in (f"/api/assets/{ASSET_TEXT}", "/api/users/me"):
        # straight from the browser (nginx sends /api/ to Immich): the session cookie
        assert f"immich_access_token={USER_TOKEN}" in stack.immich.recorded(path)[-1].headers.get("cookie", "")
    time.sleep(0.5)
    browser.execute_script("window.stubApp.rerenderItems()")
    time.sleep(0.3)
    # ... and added only "Find similar": the photo is the admin's.
    wait_for_items(browser, ASSET_TEXT, count=1)
    assert [i["kind"] for i in menu_state(browser)["ours"]] == ["similar"]
    # The same user's own photo gets every item.
    open_page(browser, stack, f"/photos/{ASSET_USERS}", lang="en", token=USER_TOKEN)
    wait_for_items(browser, ASSET_USERS)
    assert problems(console(browser)) == []


def test_no_find_similar_while_immichs_smart_search_is_off(stack: Stack, browser: WebDriver) -> None:
    """Immich's search page ignores queryAssetId without smart search (it would list every photo): no item."""
    stack.immich.smart_search_enabled = False
    try:
        open_page(browser, stack, f"/photos/{ASSET_TEXT}", lang="en")
        wait_for_items(browser, ASSET_TEXT, count=2)
        assert [i["kind"] for i in menu_state(browser)["ours"]] == ["ocr", "clip"]
        asked = len(stack.immich.recorded(f"/api/assets/{ASSET_TEXT}"))
        open_page(browser, stack, f"/photos/{ASSET_TEXT}", lang="en", token=USER_TOKEN)  # a partner: nothing
        wait_for(browser, lambda d: len(stack.immich.recorded(f"/api/assets/{ASSET_TEXT}")) > asked)
        time.sleep(0.5)
        browser.execute_script("window.stubApp.rerenderItems()")
        time.sleep(0.3)
        assert browser.execute_script("return document.querySelectorAll('li[data-immich-zh-ai]').length") == 0
    finally:
        stack.immich.smart_search_enabled = True
    assert problems(console(browser)) == []


def test_find_similar_opens_immichs_search_by_this_photo(stack: Stack, browser: WebDriver) -> None:
    """Immich 3.1's web searches by a photo at /search?query={"queryAssetId": …} (its own "View similar
    photos" goes there); the item opens that page for the photo in the viewer, for a partner too."""
    for token, count in ((ADMIN_TOKEN, 3), (USER_TOKEN, 1)):
        open_page(browser, stack, f"/albums/{ALBUM}/photos/{ASSET_TEXT}", lang="zh-CN", token=token)
        wait_for_items(browser, ASSET_TEXT, count=count)
        label = next(i["label"] for i in menu_state(browser)["ours"] if i["kind"] == "similar")
        assert label == "查找相似照片"
        click_item(browser, "similar")
        wait_for(browser, lambda d: "/search?" in d.current_url)
        url = httpx.URL(browser.current_url)
        assert url.path == "/search"
        assert json.loads(url.params["query"]) == {"queryAssetId": ASSET_TEXT}
    assert problems(console(browser)) == []


def toast_link(driver: WebDriver) -> str | None:
    return driver.execute_script(  # type: ignore[no-any-return]
        "const a = document.querySelector('[data-immich-zh-ai=\"toasts\"]').shadowRoot"
        ".querySelector('.toast:last-child a.details'); return a ? a.getAttribute('href') : null;"
    )


DEVELOPER_TEXT = ("503", "local", "models pull", "huggingface", "Hugging Face", "backend", "Immich's", "HTTP")


def test_failures_are_short_localized_and_detailed_for_admins_on_the_status_page(
    stack: Stack, browser: WebDriver
) -> None:
    # The owner, on a photo whose preview Immich has not generated yet: what happened, in the UI's language.
    open_page(browser, stack, f"/photos/{ASSET_NO_PREVIEW}", lang="zh-CN")
    wait_for_items(browser, ASSET_NO_PREVIEW)
    click_item(browser, "clip")
    toast = last_toast(browser)
    assert toast["state"] == "error" and "close" in toast["buttons"]
    assert toast["text"] == "重新生成智能搜索失败：找不到这张照片，或它还没有预览图。"

    # Immich's CLIP model is set to one no backend has: the gateway answers 503 with a developer's reason.
    set_clip_model(stack.immich_config, UNINSTALLED_CLIP)
    try:
        open_page(browser, stack, f"/photos/{ASSET_BLANK}", lang="zh-CN")
        wait_for_items(browser, ASSET_BLANK)
        click_item(browser, "clip")
        toast = last_toast(browser)
        screenshot(browser, "toast-zh-unavailable.png")
        assert toast["text"] == "重新生成智能搜索失败：AI 服务暂时不可用，请稍后再试。 AI 状态页面有详细信息。"
        assert not [w for w in DEVELOPER_TEXT if w in toast["text"]]
        assert toast_link(browser) == "/ai/#failures"  # the admin gets the way to the details
        # A user who is not an admin is told to ask one, in English here, with no link.
        open_page(browser, stack, f"/photos/{ASSET_USERS}", lang="en", token=USER_TOKEN)
        wait_for_items(browser, ASSET_USERS)
        click_item(browser, "clip")
        toast = last_toast(browser)
        assert toast["text"] == (
            "Regenerate smart search failed: the AI service is not available right now. Try again later. "
            "If this keeps happening, tell your Immich administrator."
        )
        assert toast_link(browser) is None
    finally:
        set_clip_model(stack.immich_config, CLIP_MODEL)
    # Chrome itself logs the failed responses; nothing else may complain.
    assert problems(console(browser), allow=("/ai/assets/",)) == []

    # The details are on the admins' status page: which photo, when, and the gateway's full reason.
    open_page(browser, stack, "/ai/#failures", lang="zh-CN")
    wait_for(browser, lambda d: d.execute_script("return document.body.dataset.loaded === 'true'"))
    rows = browser.execute_script("return [...document.querySelectorAll('#failed tbody tr')].map((r) => r.textContent)")
    mine = [r for r in rows if ASSET_BLANK in r]
    assert mine and "503" in mine[0] and UNINSTALLED_CLIP in mine[0] and "models pull" in mine[0], rows
    assert "年" in mine[0]  # the time in the UI language's format (2026年12月6日 …)
    screenshot(browser, "status-zh-failures.png")


# ---- pages it must leave alone ---------------------------------------------------------------------------


def test_shared_link_pages_get_nothing(stack: Stack, browser: WebDriver) -> None:
    # The stand-in renders the menu on shared links too (Immich does not), so the add-on's own check is tested.
    open_page(browser, stack, f"/share/SomeSharedLinkKey123/photos/{ASSET_TEXT}", lang="en", token=None)
    wait_for(browser, lambda d: d.execute_script("return !!document.querySelector('ul[role=menu] li')"))
    browser.execute_script("window.stubApp.rerenderItems()")
    time.sleep(0.3)
    assert browser.execute_script("return document.querySelectorAll('[data-immich-zh-ai]').length") == 0
    assert browser.execute_script("return window.__immichZhAi.assetId()") is None
    assert [e for e in console(browser) if "immich-zh-ai" in e["message"] or e["level"] == "SEVERE"] == []


def test_a_page_without_the_contract_is_left_unharmed(stack: Stack, browser: WebDriver) -> None:
    open_page(browser, stack, f"/changed/photos/{ASSET_TEXT}", lang="en")
    wait_for(browser, lambda d: d.execute_script("return !!document.querySelector('.photo')"))
    before = browser.execute_script("return document.body.outerHTML")
    # After the grace period the add-on says once, quietly, that it found nothing; more mutations say nothing.
    deadline = time.monotonic() + 6
    entries: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not any("immich-zh-ai" in e["message"] for e in entries):
        entries += console(browser)
        time.sleep(0.1)
    assert browser.execute_script("return document.body.outerHTML") == before  # DOM untouched
    for _ in range(3):
        browser.execute_script("window.stubApp.rerenderItems()")
    time.sleep(0.3)
    entries += console(browser)
    ours = [e for e in entries if "immich-zh-ai" in e["message"]]
    assert len(ours) == 1 and ours[0]["level"] == "INFO"
    assert "menu was not found" in ours[0]["message"]
    assert problems(entries) == []
    assert browser.execute_script("return document.querySelectorAll('[data-immich-zh-ai]').length") == 0
    # Immich's "not found" page at a viewer address (a deleted photo): no viewer, nothing missing, nothing said.
    open_page(browser, stack, f"/photos/{NOT_FOUND}", lang="en")
    wait_for(browser, lambda d: d.execute_script("return !!document.querySelector('main.error')"))
    time.sleep(3.5)  # past the add-on's grace period for a menu to appear
    assert [e for e in console(browser) if "immich-zh-ai" in e["message"] or e["level"] == "SEVERE"] == []
    # A plain page (no viewer) is not a broken contract: nothing is said at all.
    open_page(browser, stack, "/photos", lang="en")
    wait_for(browser, lambda d: d.execute_script("return !!document.querySelector('main.timeline')"))
    time.sleep(0.3)
    assert [e for e in console(browser) if "immich-zh-ai" in e["message"] or e["level"] == "SEVERE"] == []


def test_the_only_global_is_the_namespace(stack: Stack, browser: WebDriver) -> None:
    open_page(browser, stack, "/photos", lang="en")
    added = browser.execute_script(
        """
        return new Promise((resolve) => {
          // A fresh window (an empty frame) before and after the script runs in it: the page's own copy
          // of the add-on would otherwise hide what a first copy adds.
          const frame = document.createElement('iframe');
          frame.srcdoc = '<html><head></head><body></body></html>';
          frame.onload = () => {
            const w = frame.contentWindow;
            const base = new Set(Object.getOwnPropertyNames(w));
            const s = w.document.createElement('script');
            s.src = location.origin + '/ai/addon.js?isolated';
            s.onload = () => resolve(Object.getOwnPropertyNames(w).filter((n) => !base.has(n)));
            w.document.head.append(s);
          };
          document.body.append(frame);
        });
        """
    )
    assert added == ["__immichZhAi"]


# ---- the status page -------------------------------------------------------------------------------------


def test_status_page_is_for_immich_admins_only(stack: Stack) -> None:
    def session(token: str) -> dict[str, str]:
        return {"Cookie": f"immich_is_authenticated=true; immich_access_token={token}"}

    with httpx.Client(trust_env=False) as client:
        anonymous = client.get(stack.base + "/ai/")
        assert anonymous.status_code == 401 and "Sign in" in anonymous.text
        # A page like the status page, in both languages (its script shows Immich's), leading back to Immich.
        assert 'href="/auth/login"' in anonymous.text and 'href="/"' in anonymous.text
        assert "请先登录 Immich" in anonymous.text and "<style>" in anonymous.text
        assert "script-src 'sha256-" in anonymous.headers["content-security-policy"]
        chinese = client.get(stack.base + "/ai/", headers={**session(USER_TOKEN), "Accept-Language": "zh-CN,zh"})
        assert chinese.status_code == 403 and '<html lang="zh-CN">' in chinese.text
        assert '<div lang="en" hidden>' in chinese.text and "只有 Immich 管理员可以查看 AI 状态" in chinese.text
        assert client.get(stack.base + "/ai/", headers=session(USER_TOKEN)).status_code == 403
        assert client.get(stack.base + "/ai/status.json", headers=session(USER_TOKEN)).status_code == 403
        stale = client.get(stack.base + "/ai/status.json", headers=session("sess-expired"))
        assert stale.status_code == 401 and "sign in again" in stale.json()["detail"]
        shared = client.get(stack.base + "/ai/status.json?key=abc", headers=session(ADMIN_TOKEN))
        assert shared.status_code == 403  # a shared-link key wins over the session, as in Immich

        page = client.get(stack.base + "/ai/", headers=session(ADMIN_TOKEN))
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.headers["cache-control"] == "no-store"
        assert "script-src 'sha256-" in page.headers["content-security-policy"]

        # An admin's API key needs user.read (GET /api/users/me says who it is and whether they are an admin).
        admin = next(u for u in stack.immich.users if u.is_admin)
        for permissions, status in ((("asset.read",), 403), (("user.read",), 200), (("all",), 200)):
            key = stack.immich.add_api_key(admin, *permissions)
            reply = client.get(stack.base + "/ai/status.json", headers={"x-api-key": key})
            assert reply.status_code == status, (permissions, reply.text)
            if status == 403:
                assert reply.json()["detail"].endswith("Missing required permission: user.read")

        by_key = client.get(stack.base + "/ai/status.json", headers={"x-api-key": ADMIN_API_KEY})
        assert by_key.status_code == 200
        data = by_key.json()
        direct = client.get(stack.gateway + "/status").json()
        assert set(data) == {*direct, "installed_models", "regenerate_failures"}
        assert "regenerate_failures" not in direct  # the reasons are for admins only
        assert data["routes"] == direct["routes"] and data["search"]["enabled"] is True
        assert data["warnings"] == direct["warnings"] and any("is 1.2" in w for w in data["warnings"])
        assert set(data["backends"]) == {"local", "mt"} and data["breakers"].keys() == direct["breakers"].keys()
        installed = data["installed_models"]["local"]
        assert "PP-OCRv6_small" in installed["ocr"] and CLIP_MODEL in installed["clip"]
        for secret in (MT_API_KEY, URL_PASSWORD, URL_QUERY_TOKEN):
            assert secret not in by_key.text
    # Credentials never reach the gateway's log.
    logged = stack.gateway_log.read_text()
    for secret in (ADMIN_TOKEN, USER_TOKEN, ADMIN_API_KEY, MT_API_KEY):
        assert secret not in logged


WORDS_BROKEN_JS = """
// Cells holding one word or a state ("local", "断开"): each text in them must sit on one line.
const broken = [];
for (const td of document.querySelectorAll('td.nowrap')) {
  const walker = document.createTreeWalker(td, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (!node.nodeValue.trim()) continue;
    const range = document.createRange();
    range.selectNodeContents(node);
    const tops = new Set([...range.getClientRects()].filter((r) => r.width > 0).map((r) => Math.round(r.top)));
    if (tops.size > 1) broken.push([node.nodeValue, tops.size]);
  }
}
return broken;
"""


def test_status_page_keeps_words_whole_in_a_narrow_window(stack: Stack, browser: WebDriver) -> None:
    browser.set_window_size(560, 1100)
    try:
        open_page(browser, stack, "/ai/", lang="zh-CN")
        wait_for(browser, lambda d: d.execute_script("return document.body.dataset.loaded === 'true'"))
        assert browser.execute_script("return document.querySelectorAll('td.nowrap').length") > 10
        assert browser.execute_script(WORDS_BROKEN_JS) == []
        screenshot(browser, "status-zh-narrow.png")
    finally:
        browser.set_window_size(1280, 1100)


def test_refusal_pages_are_localized_and_lead_back(stack: Stack, browser: WebDriver) -> None:
    open_page(browser, stack, "/ai/", lang="zh-CN", token=USER_TOKEN)
    wait_for(browser, lambda d: d.execute_script("return document.documentElement.lang") == "zh-CN")
    shown = browser.execute_script(
        "return [...document.querySelectorAll('main > div[lang]')].filter((d) => !d.hidden).map((d) => d.innerText)"
    )
    assert len(shown) == 1 and "只有 Immich 管理员可以查看 AI 状态。" in shown[0] and "返回 Immich" in shown[0]
    screenshot(browser, "denied-zh.png")
    open_page(browser, stack, "/ai/", lang="en", token=None)
    wait_for(browser, lambda d: d.execute_script("return document.documentElement.lang") == "en")
    links = browser.execute_script(
        "return [...document.querySelectorAll('main > div:not([hidden]) a')]"
        ".map((a) => [a.textContent, a.getAttribute('href')])"
    )
    assert links == [["Sign in", "/auth/login"], ["Back to Immich", "/"]]
    screenshot(browser, "denied-en.png")
    # The inline script and style ran under the page's hash-pinned CSP (else the Chinese block stays hidden).
    assert problems(console(browser), allow=("/ai/ - Failed to load resource",)) == []
    browser.find_element("link text", "Back to Immich").click()
    wait_for(browser, lambda d: d.current_url == stack.base + "/")


def test_status_page_renders_in_the_browser(stack: Stack, browser: WebDriver) -> None:
    open_page(browser, stack, "/ai/", lang="zh-CN")
    wait_for(browser, lambda d: d.execute_script("return document.body.dataset.loaded === 'true'"))
    rows = browser.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('table')].map((t) =>"
        " [t.id, [...t.querySelectorAll('tbody tr')].map((r) => r.textContent)]))"
    )
    assert any(r.startswith("local") and "正常" in r for r in rows["backends"])
    assert any("PP-OCRv6_small" in r for r in rows["models"]) and any(CLIP_MODEL in r for r in rows["models"])
    assert {r.split("local")[0] for r in rows["routes"]} >= {"clip", "ocr"}
    assert browser.execute_script("return document.querySelector('h1').textContent") == "AI 状态"
    # Model downloads of the in-process backend (download on first use) have their own table.
    heading = browser.execute_script("return document.querySelector('h2[data-t=downloads]').textContent")
    assert heading == "模型下载" and rows["downloads"], rows["downloads"]
    # The clock is in the UI language's format, not the browser's (this one runs with --lang=en-US).
    updated = browser.execute_script("return document.getElementById('updated').textContent")
    assert updated.startswith("更新于 ") and "年" in updated and "M" not in updated, updated
    warnings = browser.execute_script(
        "const box = document.getElementById('warnings');"
        " return [getComputedStyle(box).display, box.querySelector('h2').textContent,"
        " [...box.querySelectorAll('li')].map((li) => li.textContent)]"
    )
    assert warnings[:2] == ["block", "警告"]
    assert any("facialRecognition.maxDistance) is 1.2" in w for w in warnings[2]), warnings
    screenshot(browser, "status-zh.png")
    # The inline script and style ran under the page's hash-pinned CSP: no violation was logged.
    assert problems(console(browser)) == []
