"""The AI service's models in this process: no network hop, configured by the ``AI_SERVICE_*`` settings.

Inference runs on the service's own thread pool, never on the event loop and never on the pool
Starlette uses, so ``/ping`` stays instant while models are busy. A timed-out request stops
waiting at once; its thread finishes the model call in the background (ONNX Runtime cannot be
interrupted), which the service's own ``AI_SERVICE_REQUEST_TIMEOUT_S`` bounds.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from ai_service.inference import InferenceService, RequestError
from ai_service.models.base import InvalidModelNameError, ModelError
from ai_service.protocol.immich import DependencyError, EntriesError
from ai_service.settings import AIServiceSettings
from ai_service.tasks import InvalidReply, task_for
from gateway.backends.base import CLIENT_INPUT_STATUSES, Backend, BackendFailure, ClientInputError
from gateway.routing import RoutedTask


def _json_error(status: int, detail: str) -> ClientInputError:
    return ClientInputError(status, orjson.dumps({"detail": detail}))


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
        except RequestError as exc:
            if exc.status in CLIENT_INPUT_STATUSES:
                raise _json_error(exc.status, exc.detail) from None
            raise BackendFailure("http_status", f"{exc.status}: {exc.detail}", exc.status) from None
        except InvalidModelNameError as exc:
            raise _json_error(exc.status, str(exc)) from None
        except ModelError as exc:
            # 404 unknown model, 503 not installed / failed to load: another backend may have it.
            raise BackendFailure("model", f"{exc.status}: {exc}", exc.status) from None
        except EntriesError as exc:
            raise _json_error(422, str(exc)) from None
        except DependencyError as exc:
            raise _json_error(400, str(exc)) from None
        value = reply[routed.task.value]  # type: ignore[literal-required]
        try:
            task_for(routed.task).check_size(value, routed.model.expected_dim)
        except InvalidReply as exc:
            raise BackendFailure("invalid_response", f"invalid reply: {exc}") from None
        return reply  # type: ignore[return-value]

    async def health(self, timeout_s: float) -> None:
        if self.service is None:
            raise BackendFailure("not_started", "local models are not loaded")
