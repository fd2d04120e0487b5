"""The AI service's models in this process: no network hop, configured by the ``AI_SERVICE_*`` settings.

Inference runs on the service's own thread pool, never on the event loop and never on the pool
Starlette uses, so ``/ping`` stays instant while models are busy. A timed-out request stops
waiting at once; its thread finishes the model call in the background (ONNX Runtime cannot be
interrupted), which the service's own ``AI_SERVICE_REQUEST_TIMEOUT_S`` bounds.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ai_service.errors import CLIENT_ERRORS, ServiceError, http_status
from ai_service.inference import InferenceService
from ai_service.models.base import ModelError
from ai_service.settings import AIServiceSettings
from ai_service.tasks import InvalidReply, task_for
from gateway.backends.base import Backend, BackendFailure
from gateway.routing import RoutedTask


class LocalBackend(Backend):
    """Requests arrive checked by the gateway (entries, dependency rule, image or text) and replies are
    built by the same typed code (``ai_service/tasks``): neither is checked a second time."""

    kind = "local"
    checked_replies = True

    def __init__(self, name: str, settings: AIServiceSettings | None = None) -> None:
        super().__init__(name)
        self.settings = settings or AIServiceSettings()
        self.service: InferenceService | None = None

    @property
    def has_health_check(self) -> bool:
        return False  # in-process: it is up exactly as long as the gateway is

    async def start(self) -> None:
        self.service = InferenceService(self.settings)
        await self.service.start()

    async def close(self) -> None:
        if self.service is not None:
            await self.service.stop()
            self.service = None

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {"kind": self.kind, "model_dir": str(self.settings.model_dir)}
        if self.service is not None:
            described["downloads"] = self.service.downloader.snapshot()
        return described

    async def predict(
        self, routed: RoutedTask, image: bytes | None, text: str | None, *, timeout_s: float, request_id: str
    ) -> dict[str, Any]:
        if self.service is None:
            raise BackendFailure("not_started", "local models are not loaded")
        entries = {routed.task: routed.entries}
        try:
            # Resolving may download a model on first use; that wait has its own bound
            # (AI_SERVICE_AUTO_PULL_WAIT_S) and must not count against the inference timeout.
            refs = await self.service.prepare(entries)
            async with asyncio.timeout(timeout_s):
                reply = await self.service.run(entries, image, text, refs)
        except TimeoutError:
            raise BackendFailure("timeout", f"no result within {timeout_s:g}s") from None
        except CLIENT_ERRORS:
            raise  # the request's fault (bad image, bad model name…): answered at the gateway's edge
        except ServiceError as exc:
            # 404 unknown model, 503 not installed / failed to load, 504 too slow: another backend may serve.
            status = http_status(exc)
            kind = "model" if isinstance(exc, ModelError) else "http_status"
            raise BackendFailure(kind, f"{status}: {exc}", status) from None
        value = reply[routed.task.value]  # type: ignore[literal-required]
        try:
            task_for(routed.task).check_size(value, routed.model.expected_dim)
        except InvalidReply as exc:
            raise BackendFailure("invalid_response", f"invalid reply: {exc}") from None
        return reply  # type: ignore[return-value]

    async def health(self, timeout_s: float) -> None:
        if self.service is None:
            raise BackendFailure("not_started", "local models are not loaded")
