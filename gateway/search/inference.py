"""Inference for search and regenerate, through the gateway's own routing.

Requests are built exactly as Immich builds them (same ``entries``, the model names from Immich's settings)
and go through the same :class:`~gateway.routing.Router` (model map, CLIP dimension checks) and
:class:`~gateway.dispatch.Dispatcher` (route order, failover, breakers, reply validation) as Immich's own
``/predict`` calls. So a regenerated row holds exactly what Immich's job would have stored, and a search
query is encoded by the same model as the library.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

import orjson

from ai_service.errors import CLIENT_ERRORS, ServiceError, Unavailable, UpstreamFailed, http_status
from ai_service.protocol.immich import EntriesError, ModelTask
from ai_service.tasks import validate_entries
from ai_service.tasks.clip import ClipOutput
from ai_service.tasks.ocr import OcrOutput
from db.immich_writer import OcrLine
from gateway.backends.base import ClientInputError
from gateway.backends.http import snippet
from gateway.dispatch import Dispatcher, NoBackendAvailable
from gateway.logs import REQUEST_ID
from gateway.routing import MappingError, Router
from gateway.search.immich_config import OcrConfig
from gateway.settings import GatewaySettings

log = logging.getLogger("gateway.search")


class InferenceError(ServiceError):
    """No model could answer."""


class NoModel(InferenceError, Unavailable):
    """Nothing available, or Immich's model cannot be served as configured."""


class InputRefused(InferenceError, UpstreamFailed):
    """A backend refused the input Immich gave us (e.g. an undecodable preview)."""


class Inference:
    def __init__(
        self, settings: GatewaySettings, router: Router, dispatcher: Dispatcher, *, text_cache_size: int
    ) -> None:
        self.settings = settings
        self.text_cache_size = text_cache_size
        self.router = router
        self.dispatcher = dispatcher
        self._text_cache: OrderedDict[tuple[str, str, str | None], list[float]] = OrderedDict()

    async def _run(self, task: ModelTask, entries: dict[str, Any], image: bytes | None, text: str | None) -> Any:
        raw = {task.value: entries}
        try:
            parsed = validate_entries(raw)
            routed = self.router.route_task(task, parsed[task], entries)
            result, backend = await self.dispatcher.dispatch(
                routed,
                image,
                text,
                request_id=REQUEST_ID.get() or "",
                deadline=time.monotonic() + self.settings.request_deadline_s,
            )
        except (MappingError, EntriesError) as exc:
            # Immich's configured model cannot be served as configured (e.g. a dimension mismatch): an admin
            # has to change a setting, no retry helps.
            raise NoModel(f"{task} model is misconfigured: {exc}") from None
        except NoBackendAvailable as exc:
            raise NoModel(str(exc)) from None
        except ClientInputError as exc:
            raise InputRefused(f"{task} refused the input (HTTP {exc.status}: {snippet(exc.body)})") from None
        except CLIENT_ERRORS as exc:  # the same verdict from the local backend
            raise InputRefused(f"{task} refused the input (HTTP {http_status(exc)}: {exc})") from None
        log.debug("inference done", extra={"fields": {"task": task.value, "backend": backend}})
        return result

    @staticmethod
    def _vector(result: dict[str, Any]) -> list[float]:
        # Checked by the dispatcher (or built by the local backend): a JSON array of the expected dimension.
        embedding: ClipOutput = result[ModelTask.CLIP.value]
        return [float(x) for x in orjson.loads(embedding)]

    async def clip_text(self, model_name: str, text: str, language: str | None) -> list[float]:
        """CLIP text embedding, as Immich's smart search computes it (cached like Immich's 100-entry LRU)."""
        key = (model_name, text, language)
        cached = self._text_cache.get(key)
        if cached is not None:
            self._text_cache.move_to_end(key)
            return cached
        options: dict[str, Any] = {"language": language} if language else {}
        result = await self._run(ModelTask.CLIP, {"textual": {"modelName": model_name, "options": options}}, None, text)
        vector = self._vector(result)
        limit = self.text_cache_size
        if limit > 0:
            self._text_cache[key] = vector
            while len(self._text_cache) > limit:
                self._text_cache.popitem(last=False)
        return vector

    async def clip_image(self, model_name: str, image: bytes) -> list[float]:
        """CLIP image embedding of a preview, as Immich's SmartSearch job requests it."""
        result = await self._run(ModelTask.CLIP, {"visual": {"modelName": model_name}}, image, None)
        return self._vector(result)

    async def ocr(self, config: OcrConfig, image: bytes) -> list[OcrLine]:
        """OCR lines of a preview, with the options Immich's OCR job sends."""
        entries = {
            "detection": {
                "modelName": config.model_name,
                "options": {"minScore": config.min_detection_score, "maxResolution": config.max_resolution},
            },
            "recognition": {"modelName": config.model_name, "options": {"minScore": config.min_recognition_score}},
        }
        result = await self._run(ModelTask.OCR, entries, image, None)
        ocr: OcrOutput = result[ModelTask.OCR.value]  # checked by the dispatcher (or built by the local backend)
        # Immich's OcrService.parseOcrResults: line i is text[i], box[8i:8i+8], boxScore[i], textScore[i].
        return [
            OcrLine(
                text=str(text),
                box=tuple(float(v) for v in ocr["box"][8 * i : 8 * i + 8]),  # type: ignore[arg-type]
                box_score=float(ocr["boxScore"][i]),
                text_score=float(ocr["textScore"][i]),
            )
            for i, text in enumerate(ocr["text"])
        ]
