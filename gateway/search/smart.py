"""``POST /api/search/smart`` in front of Immich: ``ocr:`` queries and hybrid ranking, in Immich's own shapes.

What is answered here and what goes to Immich untouched:

* ``query`` starting with ``ocr:`` (trimmed, any case, ASCII or full-width colon): OCR full-text search.
* any other ``query``: hybrid CLIP + OCR ranking when ``DB_SEARCH_HYBRID`` (default), else Immich.
* no ``query`` string, a ``queryAssetId`` ("view similar photos"), a body that is not JSON: Immich.
* a hybrid query that uses a filter the search layer cannot apply (tagIds, ...), or arrives while the
  database is not ready: Immich (its own CLIP search applies everything). An ``ocr:`` query in that situation
  gets a 400 / 503, since Immich would CLIP-encode the literal text "ocr:…".

Who may search is Immich's call (``callers.py``: a session, or an API key with ``asset.read``, checked by
Immich). Scope is Immich's: the caller plus the partners who share
with them and whom they show in their timeline (``partner."inTimeline"``), only the caller for
``visibility: locked`` (which needs a PIN-elevated session, as in Immich). Every hit is then read from Immich
as the caller (``GET /api/assets/{id}``), so Immich's permission check runs a second time and what the apps
render is Immich's own AssetResponseDto; a hit Immich refuses is dropped.
"""

from __future__ import annotations

import logging
import time
from http import HTTPStatus
from typing import Any
from uuid import UUID

import orjson
import psycopg
from starlette.requests import Request
from starlette.responses import Response

from ai_service.errors import http_status
from db.search import SearchPage, search_hybrid, search_ocr
from db.settings import DbSearchSettings
from gateway.search.caller import Callers
from gateway.search.config_source import ConfigFileError, ImmichConfigSource
from gateway.search.credentials import Credential, CredentialKind, SharedLinkRefused, credential_from
from gateway.search.database import DatabaseUnavailable, SearchDatabase, first_line
from gateway.search.dto import DtoError, SmartSearch, load_json, parse_smart_search, split_ocr_prefix
from gateway.search.immich import FORWARDED_MARK, Caller, ImmichClient, ImmichError, Permission
from gateway.search.inference import Inference, InferenceError
from gateway.settings import GatewaySettings

log = logging.getLogger("gateway.search")

# Which path answered (ocr | hybrid | hybrid-ocr-only | immich): for operators and tests, never secret.
MODE_HEADER = "x-immich-zh-ai-search"

# Keys Immich's search results do not carry (mapAsset without owner/tags/stack), removed from the
# GET /api/assets/{id} DTO so a result looks exactly like one of Immich's own.
_NOT_IN_SEARCH_RESULTS = ("owner", "tags", "stack")


def immich_error(status: int, message: str, mode: str | None = None) -> Response:
    """An error in Immich's own shape, which the web and mobile apps know how to show."""
    body = {"message": message, "error": HTTPStatus(status).phrase, "statusCode": status}
    headers = {MODE_HEADER: mode} if mode else None
    return Response(orjson.dumps(body), status_code=status, media_type="application/json", headers=headers)


class _BodyTooLarge(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _BodyTooLarge
    return bytes(body)


def search_item(asset: dict[str, Any], with_exif: bool) -> dict[str, Any]:
    item = {k: v for k, v in asset.items() if k not in _NOT_IN_SEARCH_RESULTS}
    item["people"] = []  # Immich's smart search never loads people
    if not with_exif:
        item.pop("exifInfo", None)
    return item


def search_response(items: list[dict[str, Any]], next_page: int | None) -> dict[str, Any]:
    """Immich's SearchResponseDto (``total`` is deprecated and equals ``count``; ``nextPage`` a string)."""
    return {
        "albums": {"total": 0, "count": 0, "items": [], "facets": []},
        "assets": {
            "total": len(items),
            "count": len(items),
            "items": items,
            "facets": [],
            "nextPage": None if next_page is None else str(next_page),
        },
    }


class SmartSearchService:
    def __init__(
        self,
        settings: GatewaySettings,
        db_settings: DbSearchSettings,
        immich: ImmichClient,
        callers: Callers,
        database: SearchDatabase,
        inference: Inference,
        config: ImmichConfigSource,
    ) -> None:
        self.settings = settings
        self.db_settings = db_settings
        self.immich = immich
        self.callers = callers
        self.database = database
        self.inference = inference
        self.config = config

    async def _forward(self, request: Request, body: bytes, reason: str) -> Response:
        fields: dict[str, Any] = request.scope.get("state", {}).get("log_fields", {})
        fields.update(search="immich", reason=reason)
        try:
            response = await self.immich.forward(request, body)
        except ImmichError as exc:
            return immich_error(exc.status, exc.message, "immich")
        response.headers[MODE_HEADER] = "immich"
        return response

    async def handle(self, request: Request) -> Response:
        if request.headers.get(FORWARDED_MARK):
            return immich_error(
                508,
                "The gateway received its own forwarded search: GATEWAY_IMMICH__URL must point at Immich's server, "
                "not at the proxy in front of it",
            )
        try:
            body = await read_body(request, self.db_settings.max_body_bytes)
        except _BodyTooLarge:
            return immich_error(413, f"Search request body over {self.db_settings.max_body_bytes} bytes")
        try:
            data = load_json(body)
        except ValueError:
            return await self._forward(request, body, "not json")
        if not isinstance(data, dict) or data.get("queryAssetId") is not None or not isinstance(data.get("query"), str):
            return await self._forward(request, body, "not a text query")
        ocr_text = split_ocr_prefix(data["query"])
        if ocr_text is None and not self.db_settings.hybrid:
            return await self._forward(request, body, "hybrid off")
        mode = "ocr" if ocr_text is not None else "hybrid"
        try:
            credential = credential_from(request)
        except SharedLinkRefused:
            return immich_error(403, "Shared links cannot search", mode)
        if credential is None:
            return immich_error(401, "Authentication required", mode)
        try:
            # Whether Immich lets the caller search comes first, as in Immich (its guards run before validation):
            # a bad token is a 401, a key without asset.read a 403, whatever the body says.
            authorized = await self.callers.authorize(credential, Permission.ASSET_READ)
        except ImmichError as exc:
            return immich_error(exc.status, exc.message, mode)
        try:
            dto = parse_smart_search(
                data,
                max_page=self.db_settings.max_page,
                max_size=self.db_settings.max_page_size,
                max_ids=self.db_settings.max_filter_ids,
            )
        except DtoError as exc:
            return immich_error(http_status(exc), str(exc), mode)
        if dto.unsupported:
            if ocr_text is None:
                return await self._forward(request, body, "unsupported filter")
            return immich_error(
                400,
                f"'ocr:' search cannot apply the filter(s) {', '.join(dto.unsupported)}; remove them, or search "
                "without the ocr: prefix",
                mode,
            )
        if not self.database.ready:
            if ocr_text is None:
                log.warning("search database not ready; hybrid search handed to Immich")
                return await self._forward(request, body, "database not ready")
            return immich_error(503, "OCR search is not available yet: the search database is not ready", mode)
        return await self._answer(request, body, credential, authorized, dto, ocr_text)

    async def _answer(
        self,
        request: Request,
        body: bytes,
        credential: Credential,
        authorized: Caller | None,
        dto: SmartSearch,
        ocr_text: str | None,
    ) -> Response:
        """The search's reply, or Immich's / the database's failure as Immich would answer it (a hybrid
        search the database cannot serve goes to Immich instead)."""
        mode = "ocr" if ocr_text is not None else "hybrid"
        try:
            caller = await self.callers.identify(credential, Permission.ASSET_READ, authorized)
            return await self._search(request, credential, caller, dto, ocr_text)
        except ImmichError as exc:
            if exc.status == 401:
                self.callers.forget(credential)
            return immich_error(exc.status, exc.message, mode)
        except psycopg.errors.QueryCanceled:
            return immich_error(503, "The search took too long (DB_SEARCH_STATEMENT_TIMEOUT_MS)", mode)
        except (DatabaseUnavailable, psycopg.OperationalError) as exc:
            # Down, restarting (a pooled connection broke: the pool drops it), or every connection busy.
            # The reason (host, port, server message) goes to the log, not to the user.
            reason = str(exc) if isinstance(exc, DatabaseUnavailable) else first_line(exc)
            log.warning(
                "search database unavailable" + ("; hybrid search handed to Immich" if ocr_text is None else ""),
                extra={"fields": {"error": reason}},
            )
            if ocr_text is None:
                return await self._forward(request, body, "database unavailable")
            return immich_error(503, "OCR search is unavailable right now: the search database cannot be reached", mode)
        except psycopg.Error as exc:
            log.error("search query failed", extra={"fields": {"error": first_line(exc)}})
            return immich_error(503, "The search database failed to answer", mode)

    async def _search(
        self, request: Request, credential: Credential, caller: Caller, dto: SmartSearch, ocr_text: str | None
    ) -> Response:
        started = time.perf_counter()
        fields: dict[str, Any] = request.scope.get("state", {}).get("log_fields", {})
        if dto.filters.visibility == "locked":
            # Only a PIN-elevated session may; an API key never is (Immich asks auth.session, which a key lacks).
            elevated = credential.kind is CredentialKind.SESSION and await self.immich.is_elevated(credential)
            if not elevated:
                return immich_error(401, "Elevated permission is required", "ocr" if ocr_text is not None else "hybrid")
            user_ids = [caller.id]  # Immich: locked assets are only ever the caller's own
        else:
            user_ids = [caller.id, *await self.database.partners_in_timeline(caller.id)]
        page, mode = await self._hits(dto, ocr_text, user_ids)
        assets = await self.immich.assets(
            credential, [hit.asset_id for hit in page.items], self.db_settings.hydrate_concurrency
        )
        items = [search_item(asset, dto.with_exif) for asset in assets if asset is not None]
        fields.update(
            search=mode,
            user_id=str(caller.id),
            query_chars=len(dto.query),
            hits=len(page.items),
            returned=len(items),
            search_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        if len(items) < len(page.items):
            log.info(
                "search hits Immich would not show the caller were dropped",
                extra={"fields": {"dropped": len(page.items) - len(items)}},
            )
        return Response(
            orjson.dumps(search_response(items, page.next_page)),
            media_type="application/json",
            headers={MODE_HEADER: mode},
        )

    async def _hits(self, dto: SmartSearch, ocr_text: str | None, user_ids: list[UUID]) -> tuple[SearchPage, str]:
        """One page of matching asset ids, and the mode that found them: ``ocr``, ``hybrid``, or
        ``hybrid-ocr-only`` when no CLIP embedding of the query could be had."""
        context = await self.database.context()
        if ocr_text is not None:
            async with self.database.connection() as conn:
                page = await search_ocr(
                    conn,
                    context=context,
                    user_ids=user_ids,
                    query_text=ocr_text,
                    filters=dto.filters,
                    page=dto.page,
                    size=dto.size,
                )
            return page, "ocr"
        embedding = await self._query_embedding(dto, context.embedding_dim)
        async with self.database.connection() as conn:
            page = await search_hybrid(
                conn,
                context=context,
                user_ids=user_ids,
                query_text=dto.query,
                query_embedding=embedding,
                filters=dto.filters,
                page=dto.page,
                size=dto.size,
            )
        return page, "hybrid" if embedding is not None else "hybrid-ocr-only"

    async def _query_embedding(self, dto: SmartSearch, dimension: int | None) -> list[float] | None:
        """The CLIP text embedding of the query, or None to rank by OCR alone: CLIP switched off in Immich, no
        model could answer, or the model does not fit the library's vectors (logged; search still answers)."""
        if not dto.query:
            return None
        try:
            config = await self.config.get()
        except ConfigFileError as exc:
            log.warning("Immich's settings unreadable; ranking by OCR only", extra={"fields": {"error": str(exc)}})
            return None
        if not config.clip_enabled:
            return None
        try:
            vector = await self.inference.clip_text(
                config.clip.model_name, dto.query[: self.db_settings.clip_query_max_chars], dto.language
            )
        except InferenceError as exc:
            log.warning("CLIP text encoding failed; ranking by OCR only", extra={"fields": {"error": str(exc)}})
            return None
        if dimension is not None and len(vector) != dimension:
            log.error(
                "CLIP text embedding does not fit smart_search; ranking by OCR only",
                extra={"fields": {"model": config.clip.model_name, "dimension": len(vector), "column": dimension}},
            )
            return None
        return vector
