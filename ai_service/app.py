"""FastAPI app factory: one inference service, two protocol routers, uniform error bodies."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ai_service.api import immich, mtphotos, status
from ai_service.api.limits import RequestBodyMiddleware
from ai_service.errors import ServiceError, http_status
from ai_service.inference import InferenceService
from ai_service.settings import AIServiceSettings, get_settings

log = logging.getLogger(__name__)

MTPHOTOS_PATHS = frozenset({"/check", "/ocr", "/clip/img", "/clip/txt", "/represent", "/restart", "/restart_v2"})


def error_body(path: str, detail: str) -> dict[str, object]:
    """``detail`` for HTTP clients; on MT Photos routes also its ``result``/``msg``, which its clients read."""
    body: dict[str, object] = {"detail": detail}
    if path in MTPHOTOS_PATHS:
        body |= {"result": [], "msg": detail}
    return body


def _error(request: Request, status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(request.url.path, detail), status_code=status, headers=headers)


def create_app(settings: AIServiceSettings | None = None, service: InferenceService | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        inference = service or InferenceService(settings)
        app.state.inference = inference
        await inference.start()
        try:
            yield
        finally:
            await inference.stop()

    app = FastAPI(
        title="immich-zh-ai AI service",
        summary="Chinese + English CLIP, OCR and faces behind Immich's ML protocol and the MT Photos AI API.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.include_router(immich.router)
    app.include_router(mtphotos.router)
    app.include_router(status.router)
    app.add_middleware(
        RequestBodyMiddleware,
        max_bytes=settings.max_upload_bytes,
        setting_name="AI_SERVICE_MAX_UPLOAD_BYTES",
        error_body=error_body,
    )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI's own handler answers {"detail"} only: an MT Photos client shown a 401 needs 'msg' too.
        if not isinstance(exc.detail, str):  # structured details keep FastAPI's shape
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return _error(request, exc.status_code, exc.detail, headers=exc.headers)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        # The one place a domain error becomes an HTTP reply (the kinds and their statuses: ai_service/errors.py).
        status = http_status(exc)
        if status >= 500:
            log.error("%s %s: %s", request.method, request.url.path, exc)
        return _error(request, status, str(exc))

    return app
