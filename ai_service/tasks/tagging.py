"""Tagging (this project's task; Immich has none): an image -> tags with English and Chinese names and scores.

Request: ``{"tagging": {"visual": {"modelName": <name>, "options": {"minScore": 0.5}}}}`` with an image. The
name is a RAM++-layout tagger installed under ``<model_dir>/tagging/<name>/`` or an installed CLIP model
(zero-shot tags over the shipped vocabulary); see ``ai_service/models/tagging/``. A tag is kept when its
score reaches its threshold (the model's per-tag thresholds, or ``minScore`` for all tags when the
request gives one); at most :data:`MAX_TAGS`, best first. Scores are the model's own: sigmoid
probabilities for RAM++, cosine similarities for zero-shot CLIP, so they compare only within one model.

MT Photos' API has no tagging endpoint, so an MT Photos backend never serves this task (the gateway skips
it, and refuses a GATEWAY_ROUTES__TAGGING that names one); a stock Immich ML does not know the task either
and answers 422, so a gateway in front of one routes tagging to this project's services.
"""

from __future__ import annotations

from typing import Any, Protocol, TypedDict

import numpy as np

from ai_service.imaging import DecodedImage
from ai_service.protocol.immich import ModelTask, ModelType
from ai_service.tasks.base import Entries, InvalidReply, Models, MtPhotosCall, Task, is_number, option

MAX_TAGS = 50  # a reply lists at most this many tags
_MAX_NAME = 200


class TagScore(TypedDict):
    tag: str  # the English name (the key)
    zh: str  # the Chinese name
    score: float


TaggingOutput = list[TagScore]
"""The reply value: the image's tags, highest score first."""


class Tagger(Protocol):
    names: list[tuple[str, str]]  # (English, Chinese) per tag
    thresholds: np.ndarray  # one per tag
    input_size: int

    def scores(self, rgb: np.ndarray) -> np.ndarray: ...


def choose(tagger: Tagger, scores: np.ndarray, min_score: float | None) -> TaggingOutput:
    """The tags whose score reaches their threshold (``min_score`` for all when given), best first."""
    cut = tagger.thresholds if min_score is None else np.full(len(scores), min_score, np.float32)
    kept = np.flatnonzero(scores >= cut)
    kept = kept[np.argsort(-scores[kept], kind="stable")][:MAX_TAGS]
    return [TagScore(tag=tagger.names[i][0], zh=tagger.names[i][1], score=float(scores[i])) for i in kept]


class Tagging(Task):
    name = ModelTask.TAGGING
    types = frozenset({ModelType.VISUAL})
    timeout_s = 60.0
    used_by_immich = False
    on_mtphotos = False

    def min_side(self, models: Models) -> int | None:
        tagger = models.get(ModelType.VISUAL)
        return getattr(tagger, "input_size", None)

    def run_image(self, models: Models, entries: Entries, image: DecodedImage) -> TaggingOutput:
        tagger: Tagger = models[ModelType.VISUAL]  # type: ignore[assignment]
        return choose(tagger, tagger.scores(image.rgb), option(entries, ModelType.VISUAL, "min_score", None))

    def check_reply(self, value: object, entries: Entries, expected_dim: int | None) -> TaggingOutput:
        if not isinstance(value, list):
            raise InvalidReply(f"tagging reply must be a list, got {type(value).__name__}")
        if len(value) > MAX_TAGS:
            raise InvalidReply(f"tagging reply lists {len(value)} tags, at most {MAX_TAGS} expected")
        return [self._check_tag(item, n) for n, item in enumerate(value)]

    @staticmethod
    def _check_tag(item: Any, n: int) -> TagScore:
        if not isinstance(item, dict):
            raise InvalidReply(f"tag {n} is not an object")
        tag, zh, score = item.get("tag"), item.get("zh", item.get("tag")), item.get("score")
        for what, text in (("tag", tag), ("zh", zh)):
            if not isinstance(text, str) or not text.strip() or len(text) > _MAX_NAME:
                raise InvalidReply(f"tag {n}: '{what}' must be a non-empty string of at most {_MAX_NAME} characters")
        if not is_number(score):
            raise InvalidReply(f"tag {n}: 'score' must be a finite number")
        return TagScore(tag=tag, zh=zh, score=float(score))  # type: ignore[arg-type]

    def mtphotos_call(self, entries: Entries, image: bytes | None, text: str | None) -> MtPhotosCall:
        raise InvalidReply("MT Photos' API has no tagging endpoint")

    def from_mtphotos(self, data: dict[str, Any], entries: Entries, size: tuple[int, int] | None) -> Any:
        raise InvalidReply("MT Photos' API has no tagging endpoint")


TAGGING = Tagging()
