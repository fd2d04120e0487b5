"""The zero-shot CLIP tagger of the AI service: the image's CLIP embedding against the text embeddings of the
shipped bilingual vocabulary (:mod:`ai_service.models.tagging.vocabulary`).

Served under the CLIP model's own name (``{"tagging": {"visual": {"modelName": "ViT-B-16__cn-clip"}}}``).
The vocabulary's text embeddings are computed when the tagger loads and kept in
``<model_dir>/tagging/.zero-shot/`` (one file per CLIP model, prompt language and vocabulary version), so a
restart does not recompute them; a read-only model folder only costs the recomputation.

Thresholds: one cut-off for every tag (``ZERO_SHOT_MIN_SCORE``, or the request's ``minScore``). The
per-tag calibrated thresholds (:mod:`ai_service.models.tagging.calibration`) need a reference set of
image embeddings, which the library has (its own photos) and this service does not.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from ai_service.models.base import ClipTextualModel, ClipVisualModel
from ai_service.models.tagging.vocabulary import fingerprint, vocabulary

log = logging.getLogger(__name__)

PROMPTS = {"zh": "一张{}的照片。", "en": "a photo of a {}."}
ZERO_SHOT_MIN_SCORE = 0.2  # cosine; a guess that suits no model well, which is why the library calibrates
CACHE_DIR = ".zero-shot"


def prompt_language(clip_name: str) -> str:
    """Chinese names for Chinese-CLIP models (their text tower reads Chinese), English ones otherwise."""
    return "zh" if "cn-clip" in clip_name else "en"


class ZeroShotTagger:
    def __init__(self, name: str, visual: ClipVisualModel, textual: ClipTextualModel, cache_dir: Path | None) -> None:
        self.name = name
        self.visual = visual
        self.input_size = visual.input_size
        tags = vocabulary()
        self.names: list[tuple[str, str]] = [(t.en, t.zh) for t in tags]
        language = prompt_language(name)
        self.texts = self._load(textual, language, cache_dir)
        self.thresholds = np.full(len(tags), ZERO_SHOT_MIN_SCORE, np.float32)

    def _load(self, textual: ClipTextualModel, language: str, cache_dir: Path | None) -> np.ndarray:
        path = cache_dir / f"{self.name}-{language}-{fingerprint()}.npy" if cache_dir is not None else None
        if path is not None and path.is_file():
            try:
                cached = np.load(path, allow_pickle=False)
                if cached.shape == (len(self.names), textual.embedding_size):
                    return cached.astype(np.float32)
            except (OSError, ValueError):
                pass  # a damaged cache is recomputed
        prompt = PROMPTS[language]
        names = [zh if language == "zh" else en for en, zh in self.names]
        encode_many = getattr(textual, "encode_texts", None)
        if encode_many is not None:
            texts = np.asarray(encode_many([prompt.format(n) for n in names]), np.float32)
        else:
            texts = np.stack([textual.encode_text(prompt.format(n)) for n in names]).astype(np.float32)
        if path is not None:
            self._store(path, texts)
        return texts

    @staticmethod
    def _store(path: Path, texts: np.ndarray) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
                np.save(tmp, texts, allow_pickle=False)
            os.replace(tmp.name, path)  # atomic: a concurrent reader sees the old file or the new one
        except OSError as exc:
            log.warning("cannot cache zero-shot tag embeddings in %s: %s", path.parent, exc)

    def scores(self, rgb: np.ndarray) -> np.ndarray:
        """One image -> one cosine similarity per vocabulary tag."""
        return self.texts @ self.visual.encode_image(rgb)
