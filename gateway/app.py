"""The gateway's HTTP app: Immich's ML protocol in front, routed backends behind.

``GET /`` and ``GET /ping`` answer from the event loop alone (no thread pool, no backend), so the
Immich server's 2-second health check passes even while inference saturates the CPU.
``POST /predict`` behaves as the stock service does for bad input (422 for malformed ``entries``,
400 for a missing image/text or a dependency, the image winning over text), then routes each task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ai_service.api.limits import RequestBodyMiddleware
from ai_service.protocol.immich import (
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    DependencyError,
    EntriesError,
    ModelTask,
    load_entries_json,
    query_text_problem,
)
from ai_service.tasks import check_dependencies, input_problem, validate_entries
from gateway.backends import Backend, ClientInputError, build_backends
from gateway.health import Dispatcher, HealthMonitor, NoBackendAvailable
from gateway.logs import REQUEST_ID, go_direct, request_id_from
from gateway.metrics import Metrics, PrometheusText
from gateway.routing import MappingError, RoutedTask, Router
from gateway.search import SearchFeature
from gateway.search.config_source import ConfigFileError
from gateway.search.database import DatabaseUnavailable
from gateway.settings import GatewaySettings, get_settings

log = logging.getLogger("gateway")
access_log = logging.getLogger("gateway.access")

# Health checks arrive every few seconds from Immich and Docker; logging each would drown the rest.
_QUIET_PATHS = frozenset({"/ping", "/metrics"})
STATUS_CONFIG_TIMEOUT_S = 2.0  # longest /status waits for Immich's settings (cached; only a cold read waits)


class JSONBytes(Response):
    media_type = "application/json"


def _json_error(status: int, detail: str, **extra: Any) -> Response:
    return JSONBytes(orjson.dumps({"detail": detail, **extra}), status_code=status)


class RequestContextMiddleware:
    """Request id (``X-Request-ID`` in and out) and one access log line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"x-request-id"), None)
        request_id = request_id_from(incoming)
        token = REQUEST_ID.set(request_id)
        fields: dict[str, Any] = {}
        scope.setdefault("state", {})["log_fields"] = fields
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path = scope.get("path", "")
            if path not in _QUIET_PATHS or status >= 400:
                access_log.info(
                    "request",
                    extra={
                        "fields": {
                            "method": scope.get("method"),
                            "path": path,
                            "status": status,
                            "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                            **fields,
                        }
                    },
                )
            REQUEST_ID.reset(token)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """Build the app; raises routing.ConfigError when the configuration cannot work."""
    settings = settings or get_settings()
    router = Router(settings)
    metrics = Metrics()
    backends: dict[str, Backend] = build_backends(settings)
    dispatcher = Dispatcher(settings, router, backends, metrics)
    monitor = HealthMonitor(settings, backends, dispatcher, metrics)
    # POST /api/search/smart and /ai/assets/{id}/{ocr,clip}; None (routes absent: 404) without GATEWAY_IMMICH__URL.
    search = SearchFeature.from_settings(settings, router, dispatcher)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started: list[Backend] = []
        try:
            for backend in backends.values():
                await backend.start()
                started.append(backend)
            log.info(
                "gateway ready",
                extra={
                    "fields": {
                        "backends": {n: b.describe() for n, b in backends.items()},
                        "routes": router.describe(),
                    }
                },
            )
            for warning in router.startup_warnings():
                log.warning(warning)
            checker = asyncio.create_task(monitor.run(), name="health-checks")
            if search is not None:
                # Never waits for the database: migration runs in the background and /predict serves at once.
                await search.start()
            try:
                yield
            finally:
                checker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await checker
                if search is not None:
                    await search.close()
        finally:
            # Runs after uvicorn let in-flight requests finish (GATEWAY_GRACEFUL_SHUTDOWN_S).
            for backend in reversed(started):
                try:
                    await backend.close()
                except Exception:
                    log.exception("closing backend failed", extra={"fields": {"backend": backend.name}})
            go_direct()  # no more requests: write the last lines synchronously so none is lost at exit

    app = FastAPI(
        title="immich-zh-ai gateway",
        summary="Immich's ML protocol in front of local models, Immich ML services and MT Photos AI services.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.dispatcher = dispatcher
    app.state.monitor = monitor
    app.state.metrics = metrics
    app.state.search = search
    if search is not None:
        app.include_router(search.api_router())
    app.add_middleware(RequestBodyMiddleware, max_bytes=settings.max_body_bytes, setting_name="GATEWAY_MAX_BODY_BYTES")
    app.add_middleware(RequestContextMiddleware)

    @app.exception_handler(EntriesError)
    async def _entries(request: Request, exc: EntriesError) -> Response:
        return _json_error(422, str(exc))

    @app.exception_handler(DependencyError)
    async def _dependency(request: Request, exc: DependencyError) -> Response:
        return _json_error(400, str(exc))

    @app.exception_handler(MappingError)
    async def _mapping(request: Request, exc: MappingError) -> Response:
        # A configuration mismatch between Immich and the gateway: retrying elsewhere cannot help.
        return _json_error(422, str(exc))

    @app.exception_handler(ClientInputError)
    async def _client_input(request: Request, exc: ClientInputError) -> Response:
        return Response(exc.body, status_code=exc.status, media_type=exc.content_type)

    @app.exception_handler(NoBackendAvailable)
    async def _no_backend(request: Request, exc: NoBackendAvailable) -> Response:
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after else None
        body = orjson.dumps({"detail": str(exc), "backends": exc.attempts})
        return JSONBytes(body, status_code=503, headers=headers)

    @app.get("/", summary="Service banner (Immich ML compatible)")
    async def root() -> dict[str, str]:
        return {"message": "Immich ML"}

    @app.get("/ping", response_class=PlainTextResponse, summary="Health check used by Immich")
    async def ping() -> str:
        return "pong"

    @app.get("/metrics", response_class=PrometheusText, summary="Prometheus metrics (text exposition format)")
    async def prometheus() -> Response:
        return PrometheusText(generate_latest(metrics.registry))

    async def warnings() -> list[str]:
        """Configurations that work but are probably not what the admin meant (also logged at start-up)."""
        found = router.startup_warnings()
        if search is not None:
            # Immich's settings unreadable right now: /status still answers, and search.describe says why.
            with contextlib.suppress(TimeoutError, DatabaseUnavailable, ConfigFileError, OSError):
                found += await asyncio.wait_for(search.face_warnings(), timeout=STATUS_CONFIG_TIMEOUT_S)
        return found

    @app.get("/status", summary="Effective routes, model map, backend health and breakers (no secrets)")
    async def status() -> dict[str, Any]:
        return {
            "warnings": await warnings(),
            "routes": router.describe(),
            "backends": {name: {**b.describe(), **monitor.snapshot(name)} for name, b in backends.items()},
            "breakers": {
                task.value: {name: dispatcher.breakers[(name, task)].snapshot() for name in router.backends_for(task)}
                for task in ModelTask
            },
            "search": search.describe() if search is not None else {"enabled": False},
        }

    @app.post(
        "/predict",
        summary="Run CLIP, face or OCR models on one image or text (Immich's ML protocol)",
        responses={
            400: {"description": "Missing image/text, bad image, or a dependent task without its dependency"},
            413: {"description": "Body, image or text over a limit"},
            422: {"description": "'entries' missing or malformed, or a model name the routing cannot serve"},
            503: {"description": "No backend could answer; the body lists why, per backend"},
        },
    )
    async def predict(
        request: Request,
        entries: Annotated[str, Form(description="JSON: {task: {type: {modelName, options}}}")],
        image: Annotated[UploadFile | None, File(description="Encoded image (JPEG, PNG, WebP, …)")] = None,
        text: Annotated[str | None, Form(description="Query text for CLIP textual")] = None,
    ) -> Response:
        started = time.perf_counter()
        fields: dict[str, Any] = request.scope.get("state", {}).get("log_fields", {})
        label = "unknown"
        status = 500
        metrics.in_flight.inc()
        try:
            raw = load_entries_json(entries)  # kept as sent: options this gateway does not know pass through
            parsed = validate_entries(raw)
            check_dependencies(parsed)
            label = "+".join(task.value for task, types in parsed.items() if types)
            fields["task"] = label
            data = await image.read() if image is not None else None
            if data is None and text is None:
                raise ClientInputError(400, orjson.dumps({"detail": "Either image or text must be provided"}))
            if data is not None:
                text = None  # as Immich's service: the image wins over text
            elif text is not None and (problem := query_text_problem(text)) is not None:
                raise ClientInputError(400, orjson.dumps({"detail": problem}))  # a stock backend would embed it
            if (problem := input_problem(parsed, data is not None)) is not None:  # checked once, for every backend
                raise ClientInputError(400, orjson.dumps({"detail": problem}))
            routed = [
                router.route_task(task, types, raw.get(task.value) or {}) for task, types in parsed.items() if types
            ]
            fields["model"] = ",".join(r.model.requested for r in routed)
            result = await _run(dispatcher, routed, data, text, REQUEST_ID.get() or "", fields, settings)
            status = 200
            return JSONBytes(orjson.dumps(result))
        except ClientInputError as exc:
            status = exc.status
            raise
        except (EntriesError, MappingError):
            status = 422
            raise
        except DependencyError:
            status = 400
            raise
        except NoBackendAvailable:
            status = 503
            raise
        finally:
            metrics.in_flight.dec()
            metrics.requests.labels(label, str(status)).inc()
            metrics.latency.labels(label).observe(time.perf_counter() - started)

    # Browser-facing pieces under /ai/ (gateway/web): the Immich add-on script and the admin status page.
    from gateway.web import router as web_router

    app.include_router(web_router)

    return app


async def _run(
    dispatcher: Dispatcher,
    routed: list[RoutedTask],
    image: bytes | None,
    text: str | None,
    request_id: str,
    fields: dict[str, Any],
    settings: GatewaySettings,
) -> dict[str, Any]:
    deadline = time.monotonic() + settings.request_deadline_s
    if len(routed) == 1:
        result, backend = await dispatcher.dispatch(routed[0], image, text, request_id=request_id, deadline=deadline)
        fields["backend"] = backend
        return result
    # Immich sends one task per request, but the protocol allows several: run them side by side.
    try:
        async with asyncio.TaskGroup() as group:
            jobs = [
                group.create_task(dispatcher.dispatch(r, image, text, request_id=request_id, deadline=deadline))
                for r in routed
            ]
    except BaseExceptionGroup as group:
        # One failed task fails the request (as in Immich's service); answer with its own error.
        for error in group.exceptions:
            if isinstance(error, ClientInputError | NoBackendAvailable):
                raise error from None
        raise
    merged: dict[str, Any] = {}
    names: list[str] = []
    for job in jobs:
        result, backend = job.result()
        names.append(backend)
        for key, value in result.items():
            if key in (IMAGE_HEIGHT, IMAGE_WIDTH) and key in merged:
                continue
            merged[key] = value
    fields["backend"] = ",".join(names)
    return merged
