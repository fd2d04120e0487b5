"""The service core: turns a request (entries + image bytes or text) into Immich's response dict.

Both HTTP protocols and the gateway's in-process backend call this class, so model resolution,
decoding, thresholds and the response shape are written once. Blocking work (decode, load,
inference) runs in one thread-pool call per request: a single hop off the event loop keeps
service overhead small next to model time.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from ai_service.errors import InputTooLarge, InvalidInput, TimedOut
from ai_service.imaging import DecodedImage, decode_image
from ai_service.models.base import (
    ClipTextualModel,
    ClipVisualModel,
    ModelError,
    ModelNotInstalledError,
    TextLines,
)
from ai_service.models.cache import ModelCache
from ai_service.models.downloads import ModelDownloader
from ai_service.models.install import pull_model
from ai_service.models.registry import ModelRef, ModelRegistry
from ai_service.models.store import ModelStore
from ai_service.protocol.immich import (
    DEFAULT_OCR_MAX_RESOLUTION,
    DEFAULT_OCR_MIN_DETECTION_SCORE,
    DEFAULT_OCR_MIN_RECOGNITION_SCORE,
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    ModelTask,
    ModelType,
    PipelineEntry,
    query_text_problem,
)
from ai_service.runtime.heap import call_then_release, note_decoded
from ai_service.runtime.onnx import choose_providers
from ai_service.settings import AIServiceSettings
from ai_service.tasks import PredictResponse, check_dependencies, input_problem, task_for
from ai_service.tasks.faces import FaceResult, detect_faces
from ai_service.tasks.ocr import read_text

__all__ = ["FaceResult", "InferenceService"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def build_registry(settings: AIServiceSettings) -> ModelRegistry:
    # Imported here so that importing the protocol layer does not load every model family.
    from ai_service.models.clip import ClipFamily
    from ai_service.models.faces import FaceFamily
    from ai_service.models.nsfw import NsfwFamily
    from ai_service.models.ocr import OcrFamily
    from ai_service.models.tagging.family import TaggingFamily

    store = ModelStore(settings.model_dir)
    options = settings.session_options()
    clip = ClipFamily(store, options, settings)
    return ModelRegistry(
        [
            clip,
            FaceFamily(store, options, settings),
            OcrFamily(store, options, settings),
            NsfwFamily(store, options, settings),
            TaggingFamily(store, options, clip),
        ],
        store,
    )


def batching_on(settings: AIServiceSettings) -> bool:
    """Whether models will batch: as configured, or (auto) when sessions will run on a GPU provider."""
    if settings.batch_enabled is not None:
        return settings.batch_enabled and settings.batch_max_size > 1
    try:
        first = choose_providers(tuple(settings.providers) if settings.providers else None)[0]
    except RuntimeError:  # no requested provider exists: sessions will fail to open anyway
        return False
    return first != "CPUExecutionProvider" and settings.batch_max_size > 1


def request_threads(settings: AIServiceSettings) -> int:
    """Requests the service decodes and runs at once."""
    if settings.request_threads:
        return settings.request_threads
    cores = os.cpu_count() or 1
    if batching_on(settings):
        # A request waiting for its batch holds a pool thread without using a core; with only one thread
        # per core, no more than that many requests could ever meet in a batch.
        return max(cores, settings.batch_max_size)
    return cores


class InferenceService:
    def __init__(self, settings: AIServiceSettings, registry: ModelRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or build_registry(settings)
        self.cache = ModelCache(self.registry, settings.model_ttl)
        store = ModelStore(settings.model_dir)
        self.downloader = ModelDownloader(
            store,
            lambda name, task: pull_model(store, settings, name, task),
            source=settings.hf_endpoint,
            retry_s=settings.auto_pull_retry_s,
        )
        self.executor = ThreadPoolExecutor(max_workers=request_threads(settings), thread_name_prefix="inference")
        self._reaper: asyncio.Task[None] | None = None

    # ---- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.run_blocking(self.log_models)
        await self.preload()
        if self.settings.model_ttl > 0:
            self._reaper = asyncio.create_task(self._reap_idle_models(), name="idle-model-reaper")

    async def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        # Waiting for in-flight inference must not block the event loop that is still finishing responses.
        await asyncio.to_thread(self.executor.shutdown, wait=True, cancel_futures=False)
        self.downloader.close()
        self.cache.unload_all()

    def suggested_model(self, task: ModelTask) -> str:
        """The model to tell a user to install first for ``task``: a preload, else what MT Photos serves."""
        pre = self.settings.preload
        preloads = {
            ModelTask.CLIP: [*pre.clip_visual, *pre.clip_textual],
            ModelTask.FACIAL_RECOGNITION: pre.facial_recognition,
            ModelTask.OCR: pre.ocr,
        }.get(task, [])
        defaults = {
            ModelTask.CLIP: self.settings.mtphotos_clip_model,
            ModelTask.FACIAL_RECOGNITION: self.settings.mtphotos_face_model,
            ModelTask.OCR: self.settings.mtphotos_ocr_model,
        }
        if preloads:
            return preloads[0]
        known = self.registry.family(task).known()
        return defaults.get(task) or (known[0] if known else "")

    def log_models(self) -> dict[str, list[str]]:
        """Log, per task, what is installed and, where nothing is, the command that installs a model.

        Models are not baked into the images, so a first start on an empty model volume must say exactly
        what to run; the model is picked up by the next request, without a restart."""
        installed: dict[str, list[str]] = {}
        for task, family in self.registry.families.items():
            names = family.installed()
            installed[str(task)] = names
            if names:
                log.info("%s models installed in %s: %s", task, self.settings.model_dir, ", ".join(names))
                continue
            name = self.suggested_model(task)
            if self.settings.auto_pull and family.downloadable(name):
                log.info(
                    "no %s model is installed in %s yet; the first request for one downloads it from %s "
                    "(AI_SERVICE_AUTO_PULL), e.g. %s",
                    task,
                    self.settings.model_dir,
                    self.settings.hf_endpoint,
                    name,
                )
                continue
            log.log(
                logging.WARNING if task_for(task).used_by_immich else logging.INFO,
                "no %s model is installed in %s (AI_SERVICE_MODEL_DIR); %s requests fail until one is. "
                "For %s: %s Run it where this service runs (in Docker: docker compose exec ai-service <command>); "
                "no restart is needed.",
                task,
                self.settings.model_dir,
                task,
                name,
                family.install_hint(name),
            )
        return installed

    async def _reap_idle_models(self) -> None:
        while True:
            await asyncio.sleep(self.settings.model_ttl_poll_s)
            await asyncio.get_running_loop().run_in_executor(self.executor, self.cache.unload_idle)

    async def preload(self) -> None:
        pre = self.settings.preload
        wanted: list[tuple[ModelTask, ModelType, str]] = [
            *((ModelTask.CLIP, ModelType.VISUAL, n) for n in pre.clip_visual),
            *((ModelTask.CLIP, ModelType.TEXTUAL, n) for n in pre.clip_textual),
            *((ModelTask.FACIAL_RECOGNITION, ModelType.DETECTION, n) for n in pre.facial_recognition),
            *((ModelTask.FACIAL_RECOGNITION, ModelType.RECOGNITION, n) for n in pre.facial_recognition),
            *((ModelTask.OCR, ModelType.DETECTION, n) for n in pre.ocr),
        ]
        for task, type_, name in wanted:
            try:
                ref = await self.resolve(task, type_, name)
                await self.run_blocking(self.cache.get, ref)
            except ModelError as exc:
                # A missing preload must not keep the service down: it still serves everything else.
                log.error("preload of %s/%s/%s failed: %s", task, type_, name, exc)

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        # Large decoded images leave freed memory in the heap: call_then_release hands it back.
        future = loop.run_in_executor(self.executor, call_then_release, fn, *args)
        try:
            return await asyncio.wait_for(future, timeout=self.settings.request_timeout_s)
        except TimeoutError:
            raise TimedOut(
                f"inference took longer than {self.settings.request_timeout_s:g}s (AI_SERVICE_REQUEST_TIMEOUT_S)"
            ) from None

    # ---- model lookup ------------------------------------------------------------------------------

    async def resolve(self, task: ModelTask, type_: ModelType, name: str) -> ModelRef:
        """The installed model for a request, downloading it first when it is missing and may be fetched
        (``AI_SERVICE_AUTO_PULL``); waits at most ``AI_SERVICE_AUTO_PULL_WAIT_S``."""
        try:
            return self.registry.resolve(task, type_, name)
        except ModelNotInstalledError as exc:
            if not (self.settings.auto_pull and exc.downloadable and exc.name):
                raise
            await self.downloader.fetch(task, exc.name, self.settings.auto_pull_wait_s)
        return self.registry.resolve(task, type_, name)

    async def prepare(
        self, entries: dict[ModelTask, dict[ModelType, PipelineEntry]]
    ) -> dict[tuple[ModelTask, ModelType], ModelRef]:
        """Every model a request names, resolved (and downloaded if needed)."""
        return {
            (task, type_): await self.resolve(task, type_, entry.model_name)
            for task, types in entries.items()
            for type_, entry in types.items()
        }

    # ---- Immich /predict --------------------------------------------------------------------------

    async def predict(
        self,
        entries: dict[ModelTask, dict[ModelType, PipelineEntry]],
        image: bytes | None,
        text: str | None,
        refs: dict[tuple[ModelTask, ModelType], ModelRef] | None = None,
    ) -> PredictResponse:
        """Immich's /predict; ``refs`` from :meth:`prepare` when the caller resolved the models already.

        Checks the request (dependency rule, image or text, the query text) and runs it (:meth:`run`)."""
        check_dependencies(entries)
        if image is None and text is None:
            raise InvalidInput("Either image or text must be provided")
        problem = input_problem(entries, image is not None)
        if problem is not None:
            raise InvalidInput(problem)
        if image is None:
            assert text is not None
            problem = query_text_problem(text)
            if problem is not None:
                raise InvalidInput(problem)
        return await self.run(entries, image, text, refs)

    async def run(
        self,
        entries: dict[ModelTask, dict[ModelType, PipelineEntry]],
        image: bytes | None,
        text: str | None,
        refs: dict[tuple[ModelTask, ModelType], ModelRef] | None = None,
    ) -> PredictResponse:
        """A request already checked as :meth:`predict` does (the gateway checks before its local backend):
        only the service's own limits (image and text size) are applied here."""
        if refs is None:
            refs = await self.prepare(entries)
        if image is not None:
            return await self.run_blocking(self._predict_image, entries, refs, image)
        assert text is not None
        self._check_text_size(text)
        return await self.run_blocking(self._predict_text, entries, refs, text)

    def check_text(self, text: str) -> None:
        """A query text as MT Photos' text endpoint gets it: usable (not blank or invisible) and within the limit."""
        problem = query_text_problem(text)
        if problem is not None:
            raise InvalidInput(problem)
        self._check_text_size(text)

    def _check_text_size(self, text: str) -> None:
        if len(text) > self.settings.max_text_chars:
            raise InputTooLarge(f"'text' has {len(text)} characters; the limit is {self.settings.max_text_chars}")

    def _models(self, task: ModelTask, refs: dict[tuple[ModelTask, ModelType], ModelRef]) -> dict[ModelType, object]:
        return {type_: self.cache.get(ref) for (t, type_), ref in refs.items() if t == task}

    def _predict_text(
        self,
        entries: dict[ModelTask, dict[ModelType, PipelineEntry]],
        refs: dict[tuple[ModelTask, ModelType], ModelRef],
        text: str,
    ) -> PredictResponse:
        response: dict[str, Any] = {
            task.value: task_for(task).run_text(self._models(task, refs), types, text)
            for task, types in entries.items()
        }
        return response  # type: ignore[return-value]

    def _predict_image(
        self,
        entries: dict[ModelTask, dict[ModelType, PipelineEntry]],
        refs: dict[tuple[ModelTask, ModelType], ModelRef],
        data: bytes,
    ) -> PredictResponse:
        models = {task: self._models(task, refs) for task in entries}
        # One task alone may let the decoder downscale in JPEG draft mode (CLIP needs only its input size).
        min_side = None
        if len(entries) == 1:
            [only] = entries
            min_side = task_for(only).min_side(models[only])
        decoded = self.decode(data, min_side=min_side)
        response: dict[str, Any] = {
            task.value: task_for(task).run_image(models[task], types, decoded) for task, types in entries.items()
        }
        response[IMAGE_HEIGHT] = decoded.height
        response[IMAGE_WIDTH] = decoded.width
        return response  # type: ignore[return-value]

    # ---- building blocks (also used by the MT Photos API) ----------------------------------------

    def decode(self, data: bytes, *, min_side: int | None = None) -> DecodedImage:
        """Raises ImageError / ImageTooLargeError, answered (400 / 413) at the app's edge."""
        decoded = decode_image(data, max_pixels=self.settings.max_image_pixels, min_side=min_side)
        note_decoded(decoded.rgb.shape[0] * decoded.rgb.shape[1])
        return decoded

    def encode_text(self, ref: ModelRef, text: str, language: str | None) -> np.ndarray:
        model = self.cache.get(ref)
        assert isinstance(model, ClipTextualModel)
        return model.encode_text(text, language)

    def encode_image(self, ref: ModelRef, data: bytes) -> tuple[np.ndarray, DecodedImage]:
        model = self.cache.get(ref)
        assert isinstance(model, ClipVisualModel)
        decoded = self.decode(data, min_side=model.input_size)
        return model.encode_image(decoded.rgb), decoded

    def faces(
        self, detector: ModelRef, recognizer: ModelRef, data: bytes, min_score: float
    ) -> tuple[FaceResult, DecodedImage]:
        det, rec = self.cache.get(detector), self.cache.get(recognizer)
        decoded = self.decode(data)
        return detect_faces(det, rec, decoded.rgb, min_score), decoded

    def ocr(self, ref: ModelRef, data: bytes) -> tuple[TextLines, DecodedImage]:
        engine = self.cache.get(ref)
        decoded = self.decode(data)
        lines = read_text(
            engine,
            decoded.rgb,
            DEFAULT_OCR_MIN_DETECTION_SCORE,
            DEFAULT_OCR_MAX_RESOLUTION,
            DEFAULT_OCR_MIN_RECOGNITION_SCORE,
        )
        return lines, decoded
