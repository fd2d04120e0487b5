"""Immich's API, called as the caller: identity, one asset, its preview, and the untouched pass-through.

Every call carries the caller's own credential (:class:`~gateway.search.credentials.Credential`), so Immich's
permission checks decide what the gateway may see or do on their behalf. Replies are read with size bounds,
and no credential, cookie or header is ever logged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from uuid import UUID

import httpx
import orjson
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ai_service.errors import ServiceError, TimedOut, UpstreamFailed
from gateway.search.credentials import Credential
from gateway.settings import ImmichSettings

log = logging.getLogger("gateway.search")

# Marks a request the gateway forwarded: if it ever comes back (GATEWAY_IMMICH__URL pointing at the nginx
# front instead of Immich), the gateway answers 508 instead of forwarding in a loop.
FORWARDED_MARK = "x-immich-zh-ai-forwarded"

# Connection-level headers never forwarded (RFC 9110 §7.6.1), plus Host (httpx sets Immich's) and
# Content-Length (recomputed for the request).
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_NOT_FORWARDED_IN = _HOP_BY_HOP | {"host", "content-length", FORWARDED_MARK}


class ImmichError(Exception):
    """Immich said no, or could not be reached. ``status`` is what Immich answered (502 when unreachable or
    unreadable), a fact about its reply that callers decide on (smart search relays it as Immich's own
    answer); ``message`` is Immich's own message where it sent one, safe to show the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def as_failure(self, prefix: str = "") -> ServiceError:
        """Immich failing (5xx, unreachable) is a bad gateway from our caller's point of view; a timeout
        stays a timeout."""
        message = prefix + self.message
        return TimedOut(message) if self.status == 504 else UpstreamFailed(message)


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated user (Immich's ``GET /api/users/me``, or the owner of the caller's API key)."""

    id: UUID
    is_admin: bool


class Permission(StrEnum):
    """The Immich API-key permissions the gateway's endpoints require (Immich's ``Permission`` values)."""

    ASSET_READ = "asset.read"  # POST /api/search/smart, /search/metadata, GET /api/assets/{id}
    JOB_CREATE = "job.create"  # POST /api/assets/jobs: Immich's own per-photo jobs


# A v4-shaped id no asset has (Immich validates ids as v4 UUIDs): a metadata search for it is an empty page.
PROBE_ASSET_ID = "00000000-0000-4000-8000-000000000000"

# For each permission, a call Immich guards with exactly that permission and that changes nothing: Immich answers
# it 2xx when the caller holds the permission, 403 "Missing required permission: <p>" when an API key lacks it,
# 401 when the credential is not valid. So Immich, not the gateway, decides who may do what.
_PROBES: dict[Permission, tuple[str, dict[str, Any]]] = {
    # Immich's search endpoint next to the smart search, asked for one id that does not exist.
    Permission.ASSET_READ: ("/api/search/metadata", {"id": PROBE_ASSET_ID, "size": 1}),
    # Immich's per-asset job endpoint with no assets: the permission check runs, nothing is queued (204).
    Permission.JOB_CREATE: ("/api/assets/jobs", {"assetIds": [], "name": "refresh-metadata"}),
}


def _immich_message(body: bytes, status: int) -> str:
    """Immich's error bodies are ``{"message": str | [str], "error": ..., "statusCode": ...}``."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        message = data.get("message") or data.get("detail")
        if isinstance(message, list):
            message = "; ".join(str(m) for m in message)
        if isinstance(message, str) and message:
            return message[:500]
    return f"Immich answered HTTP {status}"


class ImmichClient:
    def __init__(self, settings: ImmichSettings) -> None:
        if settings.url is None:
            raise ValueError("GATEWAY_IMMICH__URL is not set")
        self.settings = settings
        self.base = settings.url
        self._client: httpx.AsyncClient | None = None
        self._identities: OrderedDict[str, tuple[float, Caller]] = OrderedDict()

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.settings.timeout_s, connect=self.settings.connect_timeout_s),
            limits=httpx.Limits(
                max_connections=self.settings.max_connections,
                max_keepalive_connections=self.settings.max_connections,
                keepalive_expiry=self.settings.keepalive_s,
            ),
            follow_redirects=False,
            # The gateway's environment (HTTP_PROXY, ...) must not divert calls that carry users' credentials.
            trust_env=False,
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("ImmichClient.start() was not called")
        return self._client

    # ---- plumbing ------------------------------------------------------------------------------------------

    async def _get(
        self, path: str, credential: Credential, *, limit: int, params: dict[str, str] | None = None
    ) -> tuple[int, bytes, str]:
        """(status, body, content type) of a GET as the caller; ImmichError(502) when Immich cannot be read."""
        try:
            async with self.client.stream(
                "GET", self.base + path, headers=credential.headers(), params=params
            ) as reply:
                body = bytearray()
                async for chunk in reply.aiter_bytes():
                    body += chunk
                    if len(body) > limit:
                        raise ImmichError(502, f"Immich's reply is larger than {limit} bytes")
                return reply.status_code, bytes(body), reply.headers.get("content-type", "")
        except httpx.TimeoutException:
            raise ImmichError(504, f"Immich did not answer within {self.settings.timeout_s:g}s") from None
        except httpx.HTTPError as exc:
            raise ImmichError(502, f"Immich is unreachable ({type(exc).__name__})") from None

    async def _post_json(self, path: str, credential: Credential, body: dict[str, Any]) -> tuple[int, bytes]:
        """(status, body) of a JSON POST as the caller; ImmichError(502/504) when Immich cannot be read."""
        reply = await self._json_request("POST", path, credential, body)
        return reply.status_code, reply.content[: self.settings.max_response_bytes]

    async def _json_request(
        self, method: str, path: str, credential: Credential, body: dict[str, Any]
    ) -> httpx.Response:
        """A JSON request as the caller, Immich's reply whatever its status; ImmichError(502/504) when Immich
        cannot be reached or does not answer in time."""
        try:
            return await self.client.request(
                method,
                self.base + path,
                headers={**credential.headers(), "content-type": "application/json"},
                content=orjson.dumps(body),
            )
        except httpx.TimeoutException:
            raise ImmichError(504, f"Immich did not answer within {self.settings.timeout_s:g}s") from None
        except httpx.HTTPError as exc:
            raise ImmichError(502, f"Immich is unreachable ({type(exc).__name__})") from None

    async def _get_json(self, path: str, credential: Credential, params: dict[str, str] | None = None) -> Any:
        status, body, _ = await self._get(path, credential, limit=self.settings.max_response_bytes, params=params)
        if status != 200:
            raise ImmichError(status, _immich_message(body, status))
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ImmichError(502, "Immich's reply is not JSON") from None

    # ---- identity ------------------------------------------------------------------------------------------

    async def me(self, credential: Credential) -> Caller:
        """The caller (``GET /api/users/me``), reused for ``auth_cache_ttl_s``; ImmichError(401/403) if refused."""
        key = credential.cache_key()
        now = time.monotonic()
        cached = self._identities.get(key)
        if cached is not None and cached[0] > now:
            self._identities.move_to_end(key)
            return cached[1]
        data = await self._get_json("/api/users/me", credential)
        try:
            caller = Caller(id=UUID(str(data["id"])), is_admin=bool(data.get("isAdmin", False)))
        except (KeyError, TypeError, ValueError):
            raise ImmichError(502, "Immich's /api/users/me reply has no user id") from None
        if self.settings.auth_cache_ttl_s > 0:
            self._identities[key] = (now + self.settings.auth_cache_ttl_s, caller)
            self._identities.move_to_end(key)
            while len(self._identities) > self.settings.auth_cache_size:
                self._identities.popitem(last=False)
        return caller

    def forget(self, credential: Credential) -> None:
        """Drop a cached identity (Immich refused the credential since it was cached)."""
        self._identities.pop(credential.cache_key(), None)

    async def require(self, credential: Credential, permission: Permission) -> None:
        """Return when Immich lets the caller do what needs ``permission``; ImmichError with Immich's status and
        message otherwise (403 "Missing required permission: job.create", 401 "Invalid API key", ...)."""
        path, body = _PROBES[permission]
        status, reply = await self._post_json(path, credential, body)
        if status >= 300:
            raise ImmichError(status, _immich_message(reply, status))

    async def is_elevated(self, credential: Credential) -> bool:
        """Whether the session is PIN-elevated (may see locked assets): ``GET /api/auth/status``."""
        data = await self._get_json("/api/auth/status", credential)
        return bool(isinstance(data, dict) and data.get("isElevated"))

    # ---- assets --------------------------------------------------------------------------------------------

    async def asset(self, credential: Credential, asset_id: UUID) -> dict[str, Any]:
        """``GET /api/assets/{id}`` as the caller: Immich's AssetResponseDto, or ImmichError with Immich's status
        (400 "Not found or no asset.read access" for assets the caller may not read)."""
        data = await self._get_json(f"/api/assets/{asset_id}", credential)
        if not isinstance(data, dict) or "id" not in data:
            raise ImmichError(502, "Immich's asset reply has no id")
        return data

    async def assets(
        self, credential: Credential, asset_ids: list[UUID], concurrency: int
    ) -> list[dict[str, Any] | None]:
        """Many assets at once (Immich 3.1 has no bulk read), at most ``concurrency`` in flight; None for an asset
        Immich will not show this caller (400/403/404). A refused credential (401) or an Immich failure raises."""
        gate = asyncio.Semaphore(concurrency)

        async def one(asset_id: UUID) -> dict[str, Any] | None:
            async with gate:
                try:
                    return await self.asset(credential, asset_id)
                except ImmichError as exc:
                    if exc.status in (400, 403, 404):
                        return None
                    raise

        try:
            async with asyncio.TaskGroup() as group:
                jobs = [group.create_task(one(asset_id)) for asset_id in asset_ids]
        except BaseExceptionGroup as group:
            # The first failure stops the page (the others were cancelled); callers expect a plain ImmichError.
            for error in group.exceptions:
                if isinstance(error, ImmichError):
                    raise error from None
            raise
        return [job.result() for job in jobs]

    async def preview(self, credential: Credential, asset_id: UUID) -> bytes:
        """The unedited preview (what Immich's own OCR and CLIP jobs read), as the caller."""
        status, body, _ = await self._get(
            f"/api/assets/{asset_id}/thumbnail",
            credential,
            limit=self.settings.max_preview_bytes,
            params={"size": "preview", "edited": "false"},
        )
        if status != 200:
            raise ImmichError(status, _immich_message(body, status))
        if not body:
            raise ImmichError(502, "Immich sent an empty preview")
        return body

    # ---- library bridge (python -m library immich …): listing, duplicate groups, tags ---------------------

    async def _send_json(self, method: str, path: str, credential: Credential, body: dict[str, Any]) -> Any:
        """A JSON call as the caller; Immich's JSON reply (None for 204), ImmichError with Immich's status else."""
        reply = await self._json_request(method, path, credential, body)
        if reply.status_code >= 300:
            raise ImmichError(reply.status_code, _immich_message(reply.content[:65536], reply.status_code))
        if reply.status_code == 204 or not reply.content:
            return None
        if len(reply.content) > self.settings.max_response_bytes:
            raise ImmichError(502, f"Immich's reply is larger than {self.settings.max_response_bytes} bytes")
        try:
            return orjson.loads(reply.content)
        except orjson.JSONDecodeError:
            raise ImmichError(502, "Immich's reply is not JSON") from None

    async def search_assets(
        self, credential: Credential, body: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], int | None]:
        """One page of ``POST /api/search/metadata`` (Immich's search scope for the caller): items and the next
        page number (None on the last page)."""
        data = await self._send_json("POST", "/api/search/metadata", credential, body)
        try:
            assets = data["assets"]
            items = [item for item in assets["items"] if isinstance(item, dict) and "id" in item]
            next_page = int(assets["nextPage"]) if assets.get("nextPage") else None
        except (KeyError, TypeError, ValueError):
            raise ImmichError(502, "Immich's search reply has no assets") from None
        return items, next_page

    async def update_assets(self, credential: Credential, ids: list[UUID], fields: dict[str, Any]) -> None:
        """``PUT /api/assets`` (AssetBulkUpdateDto; Immich requires asset.update and ownership of every id)."""
        await self._send_json("PUT", "/api/assets", credential, {"ids": [str(i) for i in ids], **fields})

    async def tags(self, credential: Credential) -> list[dict[str, Any]]:
        """``GET /api/tags``: the caller's tags (TagResponseDto: id, parentId?, name, value, …)."""
        data = await self._get_json("/api/tags", credential)
        if not isinstance(data, list):
            raise ImmichError(502, "Immich's tag list is not a list")
        return [t for t in data if isinstance(t, dict) and "id" in t]

    async def tag(self, credential: Credential, tag_id: UUID) -> dict[str, Any] | None:
        """``GET /api/tags/{id}``; None when Immich has no such tag for the caller (400 "Not found or no
        tag.read access", as for a deleted tag)."""
        try:
            data = await self._get_json(f"/api/tags/{tag_id}", credential)
        except ImmichError as exc:
            if exc.status in (400, 404):
                return None
            raise
        return data if isinstance(data, dict) and "id" in data else None

    async def create_tag(self, credential: Credential, name: str, parent_id: UUID | None) -> dict[str, Any]:
        """``POST /api/tags`` (TagCreateDto): the new tag; ImmichError(400) when its value already exists."""
        body: dict[str, Any] = {"name": name}
        if parent_id is not None:
            body["parentId"] = str(parent_id)
        data = await self._send_json("POST", "/api/tags", credential, body)
        if not isinstance(data, dict) or "id" not in data:
            raise ImmichError(502, "Immich's tag reply has no id")
        return data

    async def tag_assets(self, credential: Credential, tag_ids: list[UUID], asset_ids: list[UUID]) -> int:
        """``PUT /api/tags/assets`` (TagBulkAssetsDto): how many (tag, asset) links were new."""
        data = await self._send_json(
            "PUT",
            "/api/tags/assets",
            credential,
            {"tagIds": [str(t) for t in tag_ids], "assetIds": [str(a) for a in asset_ids]},
        )
        return int(data.get("count", 0)) if isinstance(data, dict) else 0

    # ---- pass-through --------------------------------------------------------------------------------------

    async def forward(self, request: Request, body: bytes) -> Response:
        """The request as it came (method, path, query, body, the caller's headers) to Immich, and Immich's reply
        as it comes back (status, headers, encoded body), streamed."""
        url = self.base + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in _NOT_FORWARDED_IN]
        headers.append((FORWARDED_MARK.encode(), b"1"))
        outgoing = self.client.build_request(request.method, url, headers=headers, content=body)
        try:
            reply = await self.client.send(outgoing, stream=True)
        except httpx.TimeoutException:
            raise ImmichError(504, f"Immich did not answer within {self.settings.timeout_s:g}s") from None
        except httpx.HTTPError as exc:
            raise ImmichError(502, f"Immich is unreachable ({type(exc).__name__})") from None
        response = StreamingResponse(
            reply.aiter_raw(), status_code=reply.status_code, background=BackgroundTask(reply.aclose)
        )
        response.raw_headers = [(k, v) for k, v in reply.headers.raw if k.decode("latin-1").lower() not in _HOP_BY_HOP]
        return response
