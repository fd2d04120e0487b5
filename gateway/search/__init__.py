"""The gateway's search half: ``POST /api/search/smart`` in front of Immich, and per-asset regenerate.

Switched on by ``GATEWAY_IMMICH__URL`` (Immich's server as the gateway reaches it). :class:`SearchFeature`
wires the parts together; ``gateway/wiring.py`` builds it (once, for the app and the CLI) and runs its
start/close, and ``gateway/app.py`` mounts its router.

| module | what |
|---|---|
| ``credentials.py`` | the caller's credential, where and in the order Immich reads it |
| ``caller.py`` | whether Immich lets the caller do it (API-key permissions), and who they are |
| ``immich.py`` | Immich's API as the caller: identity, assets, previews, the untouched pass-through |
| ``immich_config.py``, ``config_source.py`` | Immich's machine-learning settings (models, OCR thresholds) |
| ``database.py`` | the connection pool (psycopg_pool), start-up migration, database errors -> DatabaseUnavailable |
| ``inference.py`` | CLIP / OCR through the gateway's routing and failover |
| ``dto.py`` | SmartSearchDto -> query, filters, paging |
| ``smart.py`` | the search endpoint |
| ``regenerate.py`` | the regenerate flow (endpoints and ``python -m gateway regenerate``) |
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError

from ai_service.errors import Forbidden, ServiceError, http_status
from db.settings import DbSearchSettings
from gateway.backends.http import redact_url
from gateway.dispatch import Dispatcher
from gateway.routing import ConfigError, Router
from gateway.search.caller import Callers
from gateway.search.config_source import ConfigFileError, ImmichConfigSource
from gateway.search.credentials import SharedLinkRefused, credential_from
from gateway.search.database import DatabaseUnavailable, SearchDatabase
from gateway.search.immich import ImmichClient
from gateway.search.inference import Inference
from gateway.search.regenerate import RegenerateKind, Regenerator, parse_asset_id
from gateway.search.smart import SmartSearchService
from gateway.settings import GatewaySettings

__all__ = ["SearchFeature"]

log = logging.getLogger("gateway.search")

RECENT_FAILURES = 20  # regenerate failures kept for the admins' status page


def db_settings_from_env() -> DbSearchSettings:
    """DbSearchSettings from DB_SEARCH_* / Immich's DB_* variables; a bad value is a ConfigError that names the
    variable but never echoes it (DB_SEARCH_URL holds a password)."""
    try:
        return DbSearchSettings()
    except ValidationError as exc:
        where = ", ".join(
            "DB_SEARCH_" + ".".join(str(p) for p in e["loc"]).upper() + f" ({e['msg']})"
            for e in exc.errors(include_input=False, include_url=False)
        )
        raise ConfigError(f"invalid search database settings: {where}") from None


class SearchFeature:
    def __init__(
        self,
        settings: GatewaySettings,
        router: Router,
        dispatcher: Dispatcher,
        db_settings: DbSearchSettings | None = None,
    ) -> None:
        self.settings = settings
        self.router = router
        self._face_check: asyncio.Task[None] | None = None
        self.db_settings = db_settings or db_settings_from_env()
        self.immich = ImmichClient(settings.immich)
        self.database = SearchDatabase(self.db_settings)
        self.callers = Callers(settings.immich, self.immich, self.database)
        self.inference = Inference(
            settings, router, dispatcher, text_cache_size=self.db_settings.text_embedding_cache_size
        )
        self.config = ImmichConfigSource(settings.immich, self.database)
        self.regenerator = Regenerator(self.immich, self.callers, self.database, self.inference, self.config)
        # The last regenerate failures (server side), newest last: shown to admins on /ai/, never on /status.
        self.recent_failures: deque[dict[str, Any]] = deque(maxlen=RECENT_FAILURES)
        self.smart = SmartSearchService(
            settings, self.db_settings, self.immich, self.callers, self.database, self.inference, self.config
        )

    @classmethod
    def from_settings(cls, settings: GatewaySettings, router: Router, dispatcher: Dispatcher) -> SearchFeature | None:
        """The feature, or None when ``GATEWAY_IMMICH__URL`` is unset (the endpoints then do not exist: 404)."""
        if settings.immich.url is None:
            return None
        return cls(settings, router, dispatcher)

    async def start(self, *, bootstrap_database: bool = True) -> None:
        await self.immich.start()
        if bootstrap_database:
            log.info(
                "search front enabled",
                extra={
                    "fields": {
                        "immich": redact_url(self.immich.base),
                        "hybrid": self.db_settings.hybrid,
                        "database": self.db_settings.redacted_conninfo(),
                    }
                },
            )
            self.database.start(migrate_schema=self.db_settings.migrate)
            self._face_check = asyncio.get_running_loop().create_task(self._log_face_warnings(), name="face-check")

    async def face_warnings(self, *, fresh: bool = False) -> list[str]:
        """Immich's face settings checked against the face model that will answer them (see
        ``Router.face_distance_warnings``). Raises DatabaseUnavailable / ConfigFileError when unreadable."""
        config = await self.config.get(fresh=fresh)
        if not config.faces_enabled:
            return []
        return self.router.face_distance_warnings(config.faces.model_name, config.faces.max_distance)

    async def _log_face_warnings(self) -> None:
        """Once at start-up, as soon as Immich's settings can be read (the database may come up later)."""
        while True:
            try:
                warnings = await self.face_warnings(fresh=True)
            except (DatabaseUnavailable, ConfigFileError, OSError):
                await asyncio.sleep(self.db_settings.retry_s)
                continue
            for warning in warnings:
                log.warning(warning)
            return

    async def close(self) -> None:
        if self._face_check is not None:
            self._face_check.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._face_check
        await self.database.close()
        await self.immich.close()

    def remember_failure(self, kind: RegenerateKind, asset_id: str, error: ServiceError) -> None:
        """A regenerate that failed on the server's side, for the admins' status page (``/ai/``): the web add-on
        shows people a short message, and admins find the reason (backend, install command, ...) here."""
        self.recent_failures.append(
            {
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
                "kind": kind.value,
                "asset_id": asset_id,
                "status": http_status(error),
                "detail": error.detail,
            }
        )

    def describe(self) -> dict[str, Any]:
        """For GET /status: whether search is served and why not (no URLs with credentials, no secrets)."""
        return {
            "enabled": True,
            "hybrid": self.db_settings.hybrid,
            "database_ready": self.database.ready,
            "database_error": self.database.last_error,
        }

    async def regenerate(self, kind: RegenerateKind, request: Request, asset_id: str) -> Response:
        """POST /ai/assets/{id}/ocr or /clip: the job's body, or its error with the status its kind has."""
        fields: dict[str, Any] = request.scope.get("state", {}).get("log_fields", {})
        fields["regenerate"] = kind.value
        try:
            try:
                credential = credential_from(request)
            except SharedLinkRefused:
                raise Forbidden("Shared links cannot regenerate") from None
            body = await self.regenerator.run(kind, credential, parse_asset_id(asset_id))
        except ServiceError as exc:
            # The one place a regenerate error becomes a reply (kinds and statuses: ai_service/errors.py).
            status = http_status(exc)
            if status >= 500:
                self.remember_failure(kind, asset_id, exc)
            return _json(status, {"detail": exc.detail})
        return _json(200, body)

    def api_router(self) -> APIRouter:
        api = APIRouter()

        @api.post(
            "/api/search/smart",
            summary="Immich's smart search, with 'ocr:' OCR search and hybrid CLIP + OCR ranking",
            responses=SMART_SEARCH_RESPONSES,
        )
        async def smart_search(request: Request) -> Response:
            return await self.smart.handle(request)

        @api.post(
            "/ai/assets/{asset_id}/ocr",
            summary="Re-run OCR on one photo: {assetId, lines, text}",
            responses=REGENERATE_RESPONSES,
        )
        async def regenerate_ocr(asset_id: str, request: Request) -> Response:
            return await self.regenerate(RegenerateKind.OCR, request, asset_id)

        @api.post(
            "/ai/assets/{asset_id}/clip",
            summary="Re-run CLIP on one photo: {assetId, dimension, model}",
            responses=REGENERATE_RESPONSES,
        )
        async def regenerate_clip(asset_id: str, request: Request) -> Response:
            return await self.regenerate(RegenerateKind.CLIP, request, asset_id)

        return api


SMART_SEARCH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Immich's SearchResponseDto"},
    400: {"description": "Invalid SmartSearchDto field (Immich's error shape)"},
    401: {"description": "No or invalid Immich credentials"},
    403: {"description": "Shared link, or Immich refused the caller (e.g. an API key without asset.read)"},
    413: {"description": "Request body over DB_SEARCH_MAX_BODY_BYTES"},
    502: {"description": "Immich is unreachable or failed"},
    503: {"description": "'ocr:' search while the search database is unavailable"},
    504: {"description": "Immich did not answer in time"},
    508: {"description": "GATEWAY_IMMICH__URL points back at the gateway (a forwarding loop)"},
}

REGENERATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "assetId is not a UUID"},
    401: {"description": "No or invalid Immich credentials"},
    403: {"description": "Not the asset's owner, a shared link, or Immich refused (a missing permission)"},
    404: {"description": "Asset not found or not visible to the caller, or no preview yet"},
    409: {"description": "Hidden asset, task switched off in Immich, or the model changed meanwhile"},
    502: {"description": "Immich failed, or a model refused the preview"},
    503: {"description": "No model available, or the database is unavailable"},
    504: {"description": "Immich did not answer in time"},
}


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")
