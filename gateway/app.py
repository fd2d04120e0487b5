"""The gateway's HTTP app: Immich's ML protocol in front, routed backends behind.

The parts it serves with are built once, in :class:`gateway.wiring.Gateway` (``app.state.gateway``);
here are only the routes, the middleware and how errors become answers.

``GET /`` and ``GET /ping`` answer from the event loop alone (no thread pool, no backend), so the
Immich server's 2-second health check passes even while inference saturates the CPU.
``POST /predict`` behaves as the stock service does for bad input (422 for malformed ``entries``,
400 for a missing image/text or a dependency, the image winning over text), then routes each task.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ai_service.api.limits import RequestBodyMiddleware
from ai_service.errors import InvalidInput, ServiceError, http_status
from ai_service.protocol.immich import load_entries_json, query_text_problem
from ai_service.tasks import TASKS, check_dependencies, input_problem, validate_entries
from gateway.backends import ClientInputError
from gateway.dispatch import NoBackendAvailable
from gateway.fastpath import PredictFastPath
from gateway.form import PredictForm
from gateway.logs import REQUEST_ID, go_direct, request_id_from
from gateway.metrics import PrometheusText
from gateway.settings import GatewaySettings, get_settings
from gateway.web import router as web_router
from gateway.wiring import Gateway, gateway_of

log = logging.getLogger("gateway")
access_log = logging.getLogger("gateway.access")

# Health checks arrive every few seconds from Immich and Docker; logging each would drown the rest.
_QUIET_PATHS = frozenset({"/ping", "/metrics"})


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


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    gateway: Gateway = app.state.gateway
    try:
        await gateway.start()
        yield
    finally:
        # Runs after uvicorn let in-flight requests finish (GATEWAY_GRACEFUL_SHUTDOWN_S).
        await gateway.close()
        go_direct()  # no more requests: write the last lines synchronously so none is lost at exit


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    """Build the app; raises routing.ConfigError when the configuration cannot work."""
    settings = settings or get_settings()
    gateway = Gateway.build(settings)
    app = FastAPI(
        title="immich-zh-ai gateway",
        summary="Immich's ML protocol in front of local models, Immich ML services and MT Photos AI services.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.gateway = gateway
    if gateway.search is not None:
        app.include_router(gateway.search.api_router())
    app.include_router(protocol)
    # Browser-facing pieces under /ai/ (gateway/web): the Immich add-on script and the admin status page.
    app.include_router(web_router)
    # Innermost: Immich's /predict without FastAPI's machinery; both paths get the two middlewares around it.
    app.add_middleware(PredictFastPath, serve=serve_predict, error_handlers=ERROR_HANDLERS)
    app.add_middleware(RequestBodyMiddleware, max_bytes=settings.max_body_bytes, setting_name="GATEWAY_MAX_BODY_BYTES")
    app.add_middleware(RequestContextMiddleware)
    for error, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(error, handler)
    return app


# ---- errors: how each becomes an answer ------------------------------------------------------------------


async def _service_error(request: Request, exc: ServiceError) -> Response:
    # Malformed entries, a model name the routing cannot serve (MappingError), a bad image…: the one place
    # they become replies; the kinds and their statuses are in ai_service/errors.py.
    return _json_error(http_status(exc), str(exc))


async def _client_input(request: Request, exc: ClientInputError) -> Response:
    # A remote backend's own verdict on the input, relayed as it answered it.
    return Response(exc.body, status_code=exc.status, media_type=exc.content_type)


async def _no_backend(request: Request, exc: NoBackendAvailable) -> Response:
    headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after else None
    body = orjson.dumps({"detail": str(exc), "backends": exc.attempts})
    return JSONBytes(body, status_code=503, headers=headers)


ERROR_HANDLERS: dict[type[Exception], Callable[[Request, Any], Awaitable[Response]]] = {
    ServiceError: _service_error,
    ClientInputError: _client_input,
    NoBackendAvailable: _no_backend,
}


# ---- Immich's ML protocol, and the gateway's own /metrics and /status ----------------------------------------

protocol = APIRouter()


@protocol.get("/", summary="Service banner (Immich ML compatible)")
async def root() -> dict[str, str]:
    return {"message": "Immich ML"}


@protocol.get("/ping", response_class=PlainTextResponse, summary="Health check used by Immich")
async def ping() -> str:
    return "pong"


@protocol.get("/metrics", response_class=PrometheusText, summary="Prometheus metrics (text exposition format)")
async def prometheus(request: Request) -> Response:
    return PrometheusText(generate_latest(gateway_of(request).metrics.registry))


@protocol.get("/status", summary="Effective routes, model map, backend health and breakers (no secrets)")
async def status(request: Request) -> dict[str, Any]:
    return await gateway_of(request).status()


@protocol.post(
    "/predict",
    summary=f"Run the models of one or more tasks ({', '.join(TASKS)}) on one image or text",
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
    # Immich's requests are served by PredictFastPath; this route answers every other shape of form.
    data = await image.read() if image is not None else None
    return await serve_predict(request.scope, PredictForm(entries=entries, image=data, text=text))


async def serve_predict(scope: Scope, form: PredictForm) -> Response:
    """Immich's reply to one /predict form; raises the errors of ERROR_HANDLERS."""
    gateway: Gateway = scope["app"].state.gateway
    metrics = gateway.metrics
    started = time.perf_counter()
    fields: dict[str, Any] = scope.get("state", {}).get("log_fields", {})
    label = "unknown"
    status = 500
    metrics.in_flight.inc()
    try:
        raw = load_entries_json(form.entries)  # kept as sent: options this gateway does not know pass through
        parsed = validate_entries(raw)
        check_dependencies(parsed)
        label = "+".join(task.value for task, types in parsed.items() if types)
        fields["task"] = label
        data, text = _image_or_text(form.image, form.text)
        if (problem := input_problem(parsed, data is not None)) is not None:  # checked once, for every backend
            raise InvalidInput(problem)
        routed = [
            gateway.router.route_task(task, types, raw.get(task.value) or {}) for task, types in parsed.items() if types
        ]
        fields["model"] = ",".join(r.model.requested for r in routed)
        result, backends = await gateway.dispatcher.dispatch_all(routed, data, text, request_id=REQUEST_ID.get() or "")
        fields["backend"] = ",".join(backends)
        status = 200
        return JSONBytes(orjson.dumps(result))
    except ClientInputError as exc:
        status = exc.status
        raise
    except ServiceError as exc:
        status = http_status(exc)
        raise
    except NoBackendAvailable:
        status = 503
        raise
    finally:
        metrics.in_flight.dec()
        metrics.requests.labels(label, str(status)).inc()
        metrics.latency.labels(label).observe(time.perf_counter() - started)


def _image_or_text(data: bytes | None, text: str | None) -> tuple[bytes | None, str | None]:
    """The input as Immich's service takes it: the image wins over text, and one of them must be there."""
    if data is None and text is None:
        raise InvalidInput("Either image or text must be provided")
    if data is not None:
        return data, None
    if text is not None and (problem := query_text_problem(text)) is not None:
        raise InvalidInput(problem)  # a stock backend would embed it
    return None, text
