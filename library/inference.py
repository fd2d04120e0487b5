"""The library's one door to inference: CLIP image/text vectors and OCR lines.

Models run in-process through ``ai_service.inference.InferenceService`` (the same registry, model cache
and decoder as the AI service; models from ``AI_SERVICE_MODEL_DIR``). Every pipeline step and search goes
through this module only, so moving inference elsewhere (a task table, a gateway URL) changes one file.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from ai_service.inference import InferenceService
from ai_service.protocol.immich import ModelTask, ModelType
from ai_service.settings import AIServiceSettings
from library.settings import LibrarySettings


class InferenceUnavailableError(RuntimeError):
    """The requested capability has no model configured."""


@dataclass(frozen=True)
class OcrText:
    lines: list[str]

    @property
    def content(self) -> str:
        return "\n".join(self.lines)


class LibraryInference:
    """Thread-safe (the model cache is); blocking calls, meant for worker threads."""

    def __init__(self, settings: LibrarySettings, ai_settings: AIServiceSettings | None = None) -> None:
        self.settings = settings
        self._ai_settings = ai_settings
        self._service: InferenceService | None = None
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

    @property
    def clip_enabled(self) -> bool:
        return bool(self.settings.clip_model)

    def _clip_name(self) -> str:
        if not self.settings.clip_model:
            raise InferenceUnavailableError("no CLIP model configured (LIBRARY_CLIP_MODEL)")
        return self.settings.clip_model

    def clip_image(self, data: bytes) -> np.ndarray:
        ref = self.service.registry.resolve(ModelTask.CLIP, ModelType.VISUAL, self._clip_name())
        vector, _ = self.service.encode_image(ref, data)
        return _unit(vector)

    def clip_text(self, text: str) -> np.ndarray:
        ref = self.service.registry.resolve(ModelTask.CLIP, ModelType.TEXTUAL, self._clip_name())
        return _unit(self.service.encode_text(ref, text, None))

    def ocr(self, data: bytes) -> OcrText:
        if not self.settings.ocr_model:
            raise InferenceUnavailableError("no OCR model configured (LIBRARY_OCR_MODEL)")
        ref = self.service.registry.resolve(ModelTask.OCR, ModelType.DETECTION, self.settings.ocr_model)
        lines, _ = self.service.ocr(ref, data)
        return OcrText([t for t in lines.texts if t.strip()])

    def close(self) -> None:
        with self._lock:
            if self._service is not None:
                self._service.executor.shutdown(wait=False)
                self._service.cache.unload_all()
                self._service = None


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector
