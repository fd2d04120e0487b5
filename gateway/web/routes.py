"""The gateway's web pieces under ``/ai/`` (reached through the nginx front, same origin as Immich).

* ``GET /ai/addon.js`` - the script nginx injects into Immich's HTML: adds *Regenerate OCR* and
  *Regenerate smart search* to the asset viewer's ⋮ menu. Public (it also loads on Immich's login page),
  holds nothing secret, cached briefly and revalidated by ETag so an upgrade reaches browsers quickly.
* ``GET /ai/`` - a read-only status page (backend health, installed models, routing) for Immich admins.
* ``GET /ai/status.json`` - what the page shows: ``GET /status`` plus ``installed_models``, admins only.

Who is an admin is Immich's call: the caller's own credential (session cookie ``immich_access_token``, a
bearer token or ``x-api-key``, found as :mod:`gateway.search.credentials` finds it) is presented to
``GET <GATEWAY_IMMICH__URL>/api/users/me`` and ``isAdmin`` must be true. No credential is ever logged; the
search front's identity cache keys on a SHA-256 of it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import logging
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, SecretStr

from ai_service.errors import (
    Forbidden,
    ServiceError,
    Unauthenticated,
    Unavailable,
    http_status,
)
from gateway.backends.local import LocalBackend
from gateway.search.credentials import Credential, SharedLinkRefused, credential_from
from gateway.search.immich import Caller, ImmichClient, ImmichError
from gateway.settings import ImmichSettings
from gateway.wiring import gateway_of

log = logging.getLogger("gateway.web")

WEB_DIR = Path(__file__).resolve().parent

# Browsers re-check the add-on after five minutes (a cheap 304), so a gateway upgrade reaches open tabs soon
# without every Immich page load fetching it again.
ADDON_CACHE_CONTROL = "public, max-age=300"


@dataclass(frozen=True, slots=True)
class StaticAsset:
    body: bytes
    media_type: str
    etag: str

    @classmethod
    def load(cls, name: str, media_type: str) -> StaticAsset:
        body = (WEB_DIR / name).read_bytes()
        return cls(body, media_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')

    def matches(self, if_none_match: str | None) -> bool:
        """RFC 9110 weak comparison against an If-None-Match list."""
        if not if_none_match:
            return False
        tags = [tag.strip() for tag in if_none_match.split(",")]
        return "*" in tags or any(tag.removeprefix("W/") == self.etag for tag in tags)


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


def _inline_blocks(page: str, tag: str) -> list[str]:
    return re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)


ADDON = StaticAsset.load("addon.js", "text/javascript; charset=utf-8")
STATUS_PAGE = (WEB_DIR / "status.html").read_text(encoding="utf-8")
# The page runs only its own inline script and style (pinned by hash) and may only call back home.
STATUS_PAGE_CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src " + " ".join(_csp_hash(s) for s in _inline_blocks(STATUS_PAGE, "script")),
        "style-src " + " ".join(_csp_hash(s) for s in _inline_blocks(STATUS_PAGE, "style")),
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
DENIED_PAGE_SOURCE = (WEB_DIR / "denied.html").read_text(encoding="utf-8")
DENIED_PAGE = string.Template(DENIED_PAGE_SOURCE)
DENIED_CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src " + " ".join(_csp_hash(s) for s in _inline_blocks(DENIED_PAGE_SOURCE, "script")),
        "style-src " + " ".join(_csp_hash(s) for s in _inline_blocks(DENIED_PAGE_SOURCE, "style")),
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Vary": "Cookie, Authorization, X-Api-Key",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(prefix="/ai", tags=["web"])


# ---- the add-on ----------------------------------------------------------------------------------------


class JavaScript(Response):
    media_type = "text/javascript; charset=utf-8"


class HTMLPage(Response):
    media_type = "text/html; charset=utf-8"


class JSONBody(Response):
    media_type = "application/json"


_DETAIL = {"application/json": {"schema": {"type": "object", "properties": {"detail": {"type": "string"}}}}}
_PAGE = {"text/html; charset=utf-8": {"schema": {"type": "string"}}}
_REFUSALS = {
    401: "Not signed in to Immich, or the session is no longer valid",
    403: "Not an Immich administrator, or a shared link",
    502: "Immich failed to say who is signed in",
    503: "GATEWAY_IMMICH__URL is not set, or Immich is unavailable",
    504: "Immich did not answer in time",
}


def _refusals(content: dict[str, Any]) -> dict[int | str, dict[str, Any]]:
    return {status: {"description": text, "content": content} for status, text in _REFUSALS.items()}


@router.api_route(
    "/addon.js",
    methods=["GET", "HEAD"],
    response_class=JavaScript,
    summary="Immich web add-on (injected by the nginx front)",
    responses={304: {"description": "Not modified (If-None-Match matched the ETag)"}},
)
async def addon(request: Request) -> Response:
    headers = {"ETag": ADDON.etag, "Cache-Control": ADDON_CACHE_CONTROL, "X-Content-Type-Options": "nosniff"}
    if ADDON.matches(request.headers.get("if-none-match")):
        return Response(status_code=304, headers=headers)
    return JavaScript(ADDON.body, headers=headers)


# ---- who is asking -------------------------------------------------------------------------------------


class AccessDenied(Exception):
    """``error``: the kind of refusal, its message the JSON API's ``detail`` (English); ``reason`` picks the
    page's localized sentence."""

    def __init__(self, error: ServiceError, reason: str) -> None:
        super().__init__(str(error))
        self.detail = str(error)
        self.status = http_status(error)  # the one table (ai_service/errors.py)
        self.reason = reason


# What the refusal page says, per reason: (English, Chinese).
DENIED_MESSAGES: dict[str, tuple[str, str]] = {
    "signin": ("Sign in to Immich to see the AI status.", "请先登录 Immich，再查看 AI 状态。"),
    "expired": ("Your Immich session is no longer valid. Sign in again.", "Immich 登录已失效，请重新登录。"),
    "not_admin": ("Only Immich administrators can see the AI status.", "只有 Immich 管理员可以查看 AI 状态。"),
    "shared": ("A shared link cannot open the AI status.", "共享链接不能打开 AI 状态页面。"),
    "refused": ("Immich did not allow checking who is signed in.", "Immich 不允许确认当前登录的用户。"),
    "unavailable": (
        "Immich could not be asked who is signed in. Try again later.",
        "暂时无法向 Immich 确认登录的用户，请稍后再试。",
    ),
    "no_immich": (
        "The gateway does not know where Immich is (GATEWAY_IMMICH__URL is not set).",
        "网关不知道 Immich 的地址（未设置 GATEWAY_IMMICH__URL）。",
    ),
}


async def _who(request: Request, credential: Credential, settings: ImmichSettings) -> Caller:
    search = gateway_of(request).search
    if search is not None:
        # The search front's Immich client: its identity cache spares Immich a call.
        return await search.immich.me(credential)
    # Without a running search front a short-lived client does: this page is rarely opened.
    client = ImmichClient(settings)
    await client.start()
    try:
        return await client.me(credential)
    finally:
        await client.close()


async def require_admin(request: Request) -> None:
    """Return when Immich says the caller is an admin; raise AccessDenied otherwise.

    The caller's credential is found exactly where Immich looks for it (the search package's
    ``credential_from``) and presented to ``GET /api/users/me`` as theirs, so Immich alone decides.
    """
    try:
        credential = credential_from(request)
    except SharedLinkRefused:
        raise AccessDenied(Forbidden("a shared link cannot open the AI status"), "shared") from None
    if credential is None:
        raise AccessDenied(Unauthenticated("sign in to Immich first: this page is for Immich administrators"), "signin")
    settings = gateway_of(request).settings.immich
    if settings.url is None:
        raise AccessDenied(
            Unavailable("GATEWAY_IMMICH__URL is not set, so the gateway cannot ask Immich who is signed in"),
            "no_immich",
        )
    try:
        caller = await _who(request, credential, settings)
    except ImmichError as exc:
        if exc.status == 401:
            raise AccessDenied(
                Unauthenticated("the Immich session is not valid any more: sign in again"), "expired"
            ) from None
        if exc.status == 403:
            raise AccessDenied(Forbidden(f"Immich refused to say who is signed in: {exc.message}"), "refused") from None
        log.warning("Immich session check failed", extra={"fields": {"status": exc.status}})
        # Immich failing is a bad gateway from the browser's point of view; a timeout stays a timeout.
        raise AccessDenied(exc.as_failure(), "unavailable") from None
    if not caller.is_admin:
        raise AccessDenied(Forbidden("only Immich administrators may see the AI status"), "not_admin")


# ---- status data ---------------------------------------------------------------------------------------


def _secret_strings(value: Any, out: set[str]) -> None:
    """Every secret the settings hold: SecretStr values, and user, password and query values of URLs and
    libpq DSNs (a database URL is a SecretStr whose password must not show up on its own either)."""
    if isinstance(value, SecretStr):
        secret = value.get_secret_value()
        out.add(secret)
        _secret_strings(secret, out)
        out.update(re.findall(r"password\s*=\s*'?([^\s']+)", secret))
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            _secret_strings(getattr(value, name), out)
    elif isinstance(value, dict):
        for item in value.values():
            _secret_strings(item, out)
    elif isinstance(value, list | tuple | set):
        for item in value:
            _secret_strings(item, out)
    elif isinstance(value, str) and "://" in value:
        parts = urlsplit(value)
        out.update(p for p in (parts.username, parts.password) if p)
        out.update(v for _, v in parse_qsl(parts.query))


def scrub(value: Any, secrets: list[str]) -> Any:
    """``value`` with every secret replaced by '***' (a second line of defence behind /status's own masking)."""
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "***")
        return value
    if isinstance(value, dict):
        return {scrub(k, secrets): scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v, secrets) for v in value]
    return value


async def installed_models(request: Request) -> dict[str, dict[str, list[str]]]:
    """Per in-process backend, the models on disk by task. Remote backends cannot be asked (no such API)."""
    out: dict[str, dict[str, list[str]]] = {}
    for name, backend in gateway_of(request).backends.items():
        if not isinstance(backend, LocalBackend) or backend.service is None:
            continue
        # Listing walks the model folder: off the event loop, so /ping never waits on a slow disk.
        out[name] = await asyncio.to_thread(backend.service.registry.installed)
    return out


async def status_data(request: Request) -> dict[str, Any]:
    gateway = gateway_of(request)
    data = await gateway.status()  # exactly what GET /status answers: the same function makes both
    data["installed_models"] = await installed_models(request)
    # Why regenerates failed on the server's side: the add-on tells people only that the AI service is
    # unavailable, and links admins here.
    data["regenerate_failures"] = list(gateway.search.recent_failures) if gateway.search is not None else []
    secrets: set[str] = set()
    _secret_strings(gateway.settings, secrets)
    # The search front's database settings (DB_SEARCH_URL / DB_PASSWORD) live outside GatewaySettings.
    _secret_strings(gateway.search.db_settings if gateway.search is not None else None, secrets)
    # Longest first, so a secret containing another is masked whole; very short ones would mangle the text.
    return scrub(data, sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True))


# ---- the page ------------------------------------------------------------------------------------------


def _prefers_chinese(accept_language: str | None) -> bool:
    """The page's language before its script runs (which then follows Immich's own setting)."""
    first = (accept_language or "").split(",")[0].strip().lower()
    return first.startswith(("zh", "yue"))


def _denied_page(request: Request, denied: AccessDenied) -> Response:
    """The refusal as a page like the status page: localized (zh / en), and a way back to Immich."""
    english, chinese = DENIED_MESSAGES[denied.reason]
    zh = _prefers_chinese(request.headers.get("accept-language"))
    signin = denied.status == 401
    body = DENIED_PAGE.safe_substitute(
        html_lang="zh-CN" if zh else "en",
        hide_en="hidden" if zh else "",
        hide_zh="" if zh else "hidden",
        message_en=html.escape(english),
        message_zh=html.escape(chinese),
        signin_en='<a href="/auth/login" class="primary">Sign in</a>' if signin else "",
        signin_zh='<a href="/auth/login" class="primary">登录</a>' if signin else "",
        back_class="" if signin else "primary",
        status=denied.status,
    )
    headers = {
        **PAGE_HEADERS,
        "Vary": PAGE_HEADERS["Vary"] + ", Accept-Language",
        "Content-Security-Policy": DENIED_CSP,
    }
    return HTMLPage(body, status_code=denied.status, headers=headers)


@router.get(
    "/",
    summary="AI status page for Immich admins (read-only)",
    response_class=HTMLPage,
    responses=_refusals(_PAGE),
)
async def status_page(request: Request) -> Response:
    try:
        await require_admin(request)
    except AccessDenied as denied:
        return _denied_page(request, denied)
    headers = {**PAGE_HEADERS, "Content-Security-Policy": STATUS_PAGE_CSP}
    return HTMLPage(STATUS_PAGE, headers=headers)


@router.get(
    "/status.json",
    summary="GET /status plus installed models, for Immich admins",
    response_class=JSONBody,
    responses={
        200: {
            "description": "What GET /status answers, plus installed_models",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        **_refusals(_DETAIL),
    },
)
async def status_json(request: Request) -> Response:
    try:
        await require_admin(request)
    except AccessDenied as denied:
        return JSONBody(orjson.dumps({"detail": denied.detail}), status_code=denied.status, headers=PAGE_HEADERS)
    return JSONBody(orjson.dumps(await status_data(request)), headers=PAGE_HEADERS)
