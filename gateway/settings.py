"""Configuration of the gateway: one pydantic-settings class, env prefix ``GATEWAY_``, nested delimiter ``__``.

With nothing set, the gateway runs one in-process ``local`` backend (the AI service's models) for
every task, so ``python -m gateway`` answers Immich on a fresh machine. ``python -m gateway settings``
prints every setting with its current value (secrets masked) and its description.

Examples::

    GATEWAY_BACKENDS='{"gpu":{"kind":"immich","url":"http://gpu:3003/"},"local":{"kind":"local"}}'
    GATEWAY_ROUTES__CLIP='["gpu","local"]'
    GATEWAY_MODEL_MAP__CLIP='{"cn-clip/":"ViT-B-16__cn-clip"}'
    GATEWAY_TIMEOUTS__OCR=45
    GATEWAY_IMMICH__URL=http://immich-server:2283   # search front + regenerate (gateway/search/README.md)

Search itself (ranking, limits, the front's pool and start-up) is configured in one place, ``db/settings.py``
(``DB_SEARCH_*``; the former ``GATEWAY_SEARCH__*`` names are still read there).
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ai_service.protocol.immich import ModelTask
from ai_service.runtime.http_limits import HttpLimits
from ai_service.tasks import TASKS, Task, task_for

T = TypeVar("T")


class BackendKind(StrEnum):
    LOCAL = "local"  # the AI service's models, in this process
    IMMICH = "immich"  # anything speaking Immich's ML protocol (stock immich-machine-learning, our ai_service)
    MTPHOTOS = "mtphotos"  # MT Photos AI API (mt-photos-ai, mt-photos-insightface-unofficial, our ai_service)


# What an MT Photos server runs when nothing else is declared: the official image's cn-clip ViT-B-16
# and InsightFace buffalo_l. MT Photos ignores the model name it is sent, so the gateway needs to know.
MTPHOTOS_DEFAULT_MODELS: dict[str, str] = {
    ModelTask.CLIP.value: "ViT-B-16__cn-clip",
    ModelTask.FACIAL_RECOGNITION.value: "buffalo_l",
}


class BackendSettings(BaseModel):
    """One backend the gateway can send requests to."""

    kind: BackendKind = Field(description="local | immich | mtphotos.")
    url: str | None = Field(
        None,
        description=(
            "Base URL of an immich or mtphotos backend, e.g. http://gpu:3003 or http://proxy/ml/ "
            "(a sub-path is kept: '/predict' is appended to it, with or without a trailing slash; a query, "
            "e.g. ?token=…, is kept and sent with every request)."
        ),
    )
    api_key: SecretStr | None = Field(
        None, description="MT Photos 'api-key' header value (mtphotos backends only). Never logged."
    )
    models: dict[ModelTask, str] | None = Field(
        None,
        description=(
            "Model this backend runs per task when it ignores the requested name (MT Photos does). Requests "
            "whose (mapped) model differs skip the backend, so vectors of different models never mix. "
            f"mtphotos default: {MTPHOTOS_DEFAULT_MODELS}; OCR is not checked unless set."
        ),
    )
    max_connections: int = Field(32, ge=1, le=1024, description="Most concurrent HTTP connections to this backend.")
    connect_timeout_s: float = Field(3.0, gt=0, le=60, description="Seconds to wait for a TCP connection.")
    keepalive_s: float = Field(
        4.0,
        ge=0,
        le=300,
        description=(
            "Seconds an idle pooled connection is kept. Keep it below the backend's own keep-alive "
            "(uvicorn: 5 s) so the gateway never reuses a connection the backend is closing."
        ),
    )

    @model_validator(mode="after")
    def _check_kind(self) -> BackendSettings:
        if self.kind is BackendKind.LOCAL:
            if self.url is not None:
                raise ValueError("a 'local' backend runs in-process and takes no url")
        else:
            if not self.url or not self.url.startswith(("http://", "https://")):
                raise ValueError(f"a '{self.kind}' backend needs an http(s) url")
        if self.kind is BackendKind.MTPHOTOS:
            if self.api_key is None or not self.api_key.get_secret_value():
                raise ValueError("an 'mtphotos' backend needs its api_key (the server's API_AUTH_KEY)")
            if self.models is None:
                self.models = {ModelTask(k): v for k, v in MTPHOTOS_DEFAULT_MODELS.items()}
        return self

    def served_model(self, task: ModelTask) -> str | None:
        return (self.models or {}).get(task)


# The per-task settings of GatewaySettings and each task's default (None: no entry, e.g. no fixed route).
_PER_TASK_DEFAULTS: dict[str, Callable[[Task], Any]] = {
    "routes": lambda task: None,
    "model_map": lambda task: dict(task.default_model_map),
    "timeouts": lambda task: task.timeout_s,
}


def _per_task(value: dict[str, T], what: str, default: Callable[[Task], T | None]) -> dict[str, T]:
    """A per-task setting keyed by the task table's setting keys (``clip``, ``facial_recognition``, ``ocr``),
    with each missing task's default from its module. A key that names no task is an error, never ignored."""
    tasks = {task.setting_key: task for task in TASKS.values()}
    given = {key.replace("-", "_"): item for key, item in value.items()}
    unknown = sorted(set(given) - set(tasks))
    if unknown:
        raise ValueError(f"{what}: no task {', '.join(unknown)}; expected {', '.join(tasks)}")
    out: dict[str, T] = {}
    for key, task in tasks.items():
        item = given[key] if key in given else default(task)
        if item is not None:
            out[key] = item
    return out


class BreakerSettings(BaseModel):
    """Circuit breaker per (backend, task)."""

    failure_threshold: int = Field(3, ge=1, le=1000, description="Consecutive failures that open the breaker.")
    cooldown_s: float = Field(
        30.0, gt=0, le=3600, description="Seconds an open breaker skips its backend before one trial request."
    )
    cut_in_flight: bool = Field(
        True,
        description=(
            "When a breaker opens (failures, or failed health checks), attempts still waiting on that backend for "
            "that task are cut and fail over at once if a later backend of their route would take them, instead of "
            "waiting out their timeout: a hung backend otherwise holds every request already sent to it for the "
            "whole task timeout (60 s for OCR)."
        ),
    )


class HealthSettings(BaseModel):
    """Background health checks of remote backends (immich: GET /ping; mtphotos: POST /check)."""

    interval_s: float = Field(10.0, ge=0, le=3600, description="Seconds between health checks (0 disables them).")
    timeout_s: float = Field(2.0, gt=0, le=60, description="Seconds one health check may take.")
    failure_threshold: int = Field(
        2, ge=1, le=100, description="Consecutive failed checks that open all of a backend's breakers."
    )


class ImmichSettings(BaseModel):
    """The Immich server behind the search front (``POST /api/search/smart``) and the regenerate endpoints.

    The gateway calls Immich's API *as the caller* (their cookie, API key or bearer token), so Immich itself
    decides who sees what; nothing here is a credential of the gateway's own.
    """

    url: str | None = Field(
        None,
        description=(
            "Base URL of Immich's server as the gateway reaches it directly, e.g. http://immich-server:2283 "
            "(never the nginx front: a forwarded search would come back to the gateway). Unset: the search "
            "front and the regenerate endpoints are off (404)."
        ),
    )
    timeout_s: float = Field(30.0, gt=0, le=600, description="Seconds one call to Immich's API may take.")
    connect_timeout_s: float = Field(5.0, gt=0, le=60, description="Seconds to wait for a TCP connection to Immich.")
    max_connections: int = Field(
        64, ge=1, le=1024, description="Most concurrent HTTP connections from the gateway to Immich's API."
    )
    keepalive_s: float = Field(
        4.0,
        ge=0,
        le=300,
        description=(
            "Seconds an idle connection to Immich is kept for reuse; below Node's 5 s keep-alive, so a pooled "
            "connection is never reused just as Immich closes it."
        ),
    )
    auth_cache_ttl_s: float = Field(
        30.0,
        ge=0,
        le=3600,
        description=(
            "Seconds a caller's identity (GET /api/users/me) is reused, keyed by a SHA-256 of the credential "
            "(never the credential itself); 0 asks Immich on every request."
        ),
    )
    auth_cache_size: int = Field(1024, ge=1, le=1_000_000, description="Most identities kept in that cache.")
    max_preview_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="Largest preview image read from Immich for a regenerate, in bytes."
    )
    max_response_bytes: int = Field(
        4 * 1024 * 1024,
        gt=0,
        description="Largest JSON reply read from Immich's API (an asset, the caller's user), in bytes.",
    )
    config_ttl_s: float = Field(
        30.0,
        ge=0,
        le=3600,
        description="Seconds Immich's machine-learning settings (system_metadata 'system-config') are reused.",
    )
    config_file: Path | None = Field(
        None,
        description=(
            "Immich's config file, when Immich reads its settings from one (IMMICH_CONFIG_FILE) instead of the "
            "database; mount it read-only into the gateway. Unset: the database, then Immich's defaults."
        ),
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL, e.g. http://immich-server:2283")
        return value.rstrip("/")


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_",
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="ignore",
    )

    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0 or [::] in containers).")
    port: int = Field(3003, ge=1, le=65535, description="TCP port (3003 is Immich's ML port).")
    log_level: str = Field("info", description="Python log level: debug, info, warning, error.")
    log_format: str = Field("json", pattern="^(json|text)$", description="json (one object per line) or text.")
    log_queue_size: int = Field(
        10_000,
        ge=100,
        le=1_000_000,
        description="Log lines buffered for the writer thread; beyond it lines are dropped, never waited for.",
    )

    backends: dict[str, BackendSettings] = Field(
        default_factory=lambda: {"local": BackendSettings(kind=BackendKind.LOCAL)},
        description=(
            'Named backends as JSON, e.g. \'{"gpu":{"kind":"immich","url":"http://gpu:3003"},'
            '"local":{"kind":"local"}}\'. Default: the in-process models only.'
        ),
    )
    routes: dict[str, list[str]] = Field(
        default_factory=dict,
        description=(
            'Ordered backend names per task (GATEWAY_ROUTES__CLIP=\'["gpu","local"]\'); the first healthy one '
            "answers, the next ones are failover. Unset: all backends, config order."
        ),
    )
    model_map: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description=(
            "Immich model name -> backend model name, per task (GATEWAY_MODEL_MAP__CLIP='{...}'). Keys are exact "
            "names, or prefixes ending in '/' that Immich's admin UI accepts as routes (e.g. "
            "'cn-clip/ViT-B-16__openai': Immich sizes its vector column from the part after '/'); exact keys win, "
            "then the longest prefix; unmapped names pass through. Defaults: clip "
            '\'{"cn-clip/":"ViT-B-16__cn-clip"}\', faces and ocr none (buffalo_l is answered by buffalo_l; '
            "answering it with another model, e.g. dlib, is the admin's choice: the library's faces must be "
            "detected again)."
        ),
    )
    clip_dimensions: dict[str, int] = Field(
        default_factory=dict,
        description=(
            "Embedding size of CLIP models the gateway cannot know (custom exports), e.g. '{\"my-clip\":768}'. "
            "Checked at start-up against the dimension Immich derives for each mapped name."
        ),
    )
    timeouts: dict[str, Annotated[float, Field(gt=0, le=290)]] = Field(
        default_factory=dict,
        description=(
            "Seconds one backend may take for one request, per task (GATEWAY_TIMEOUTS__OCR=45), at most 290 "
            "(Immich gives up after ~300 s). Defaults: clip 30, facial_recognition 60, ocr 60, tagging 60."
        ),
    )
    request_deadline_s: float = Field(
        240.0,
        gt=0,
        le=295,
        description="Most seconds one /predict may take across all failover attempts (below Immich's ~300 s).",
    )
    breaker: BreakerSettings = Field(default_factory=BreakerSettings, description="Circuit breaker policy.")
    health: HealthSettings = Field(default_factory=HealthSettings, description="Health checks of remote backends.")

    max_body_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="Largest accepted /predict body, in bytes (413 above it)."
    )
    max_response_bytes: int = Field(
        32 * 1024 * 1024, gt=0, description="Largest backend response read, in bytes (larger is a backend failure)."
    )
    max_image_pixels: int = Field(
        100_000_000,
        gt=0,
        description="Largest image (width x height) the gateway reads the size of for MT Photos backends.",
    )
    immich: ImmichSettings = Field(
        default_factory=ImmichSettings, description="The Immich server behind the search front and regenerate."
    )
    http: HttpLimits = Field(
        default_factory=HttpLimits,
        description="Limits per HTTP connection: header size and count, slow-client timeouts (GATEWAY_HTTP__*).",
    )
    graceful_shutdown_s: float = Field(
        30.0, ge=0, le=600, description="Seconds in-flight requests get to finish on SIGTERM before closing."
    )

    @field_validator("backends")
    @classmethod
    def _check_backends(cls, value: dict[str, BackendSettings]) -> dict[str, BackendSettings]:
        if not value:
            raise ValueError("at least one backend is needed")
        locals_ = [n for n, b in value.items() if b.kind is BackendKind.LOCAL]
        if len(locals_) > 1:
            # Two in-process services would load every model twice in one process.
            raise ValueError(f"at most one 'local' backend (got {', '.join(locals_)})")
        for name in value:
            if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"backend name {name!r}: use 1-64 letters, digits, '-' or '_'")
        return value

    @field_validator("routes", "model_map", "timeouts")
    @classmethod
    def _per_task_defaults(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        assert info.field_name is not None
        return _per_task(value, info.field_name, _PER_TASK_DEFAULTS[info.field_name])

    @classmethod
    def per_task_defaults(cls) -> dict[str, dict[str, Any]]:
        """Per-task settings, set as GATEWAY_<FIELD>__<TASK> (e.g. GATEWAY_TIMEOUTS__OCR): field -> {task key:
        default}. The documentation and the deployment checks list one variable per task from this."""
        return {
            name: {task.setting_key: default(task) for task in TASKS.values()}
            for name, default in _PER_TASK_DEFAULTS.items()
        }

    @model_validator(mode="after")
    def _check_routes(self) -> GatewaySettings:
        for task in ModelTask:
            route = self.routes.get(task_for(task).setting_key)
            if route is None:
                continue
            if not route:
                raise ValueError(f"route for {task} is empty; leave it unset to use every backend")
            unknown = [n for n in route if n not in self.backends]
            if unknown:
                raise ValueError(f"route for {task} names unknown backends {unknown}; known: {list(self.backends)}")
            if len(set(route)) != len(route):
                raise ValueError(f"route for {task} names a backend twice: {route}")
            mtphotos = [n for n in route if self.backends[n].kind is BackendKind.MTPHOTOS]
            if mtphotos and not task_for(task).mtphotos:
                raise ValueError(f"route for {task} names MT Photos backends {mtphotos}: MT Photos cannot serve {task}")
        return self

    def route(self, task: ModelTask) -> list[str]:
        return self.routes.get(task_for(task).setting_key) or list(self.backends)

    def model_map_for(self, task: ModelTask) -> dict[str, str]:
        return self.model_map.get(task_for(task).setting_key, {})

    def timeout(self, task: ModelTask) -> float:
        return self.timeouts[task_for(task).setting_key]


@lru_cache
def get_settings() -> GatewaySettings:
    return GatewaySettings()


def describe_errors(exc: ValidationError) -> str:
    """Where and what, never the offending value: a backend's input holds its API key."""
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "settings"
        lines.append(f"  GATEWAY_{where.upper().replace('.', '__', 1)}: {error['msg']}")
    return "\n".join(lines)
