"""NSFW: an image -> one score, P(nsfw) in 0-1 (Yahoo's open_nsfw, ``ai_service/models/nsfw.py``).

Not an Immich task (Immich never sends it): the library's 'nsfw' step asks for it, in-process or on an
AI service / gateway at ``LIBRARY_INFERENCE_URL``. Request and reply::

    entries = {"nsfw": {"classification": {"modelName": "opennsfw"}}}   (with an image)
    reply   = {"nsfw": {"score": 0.03}, "imageHeight": …, "imageWidth": …}

MT Photos has no NSFW endpoint: its backends never get this task (``on_mtphotos``).
"""

from __future__ import annotations

from typing import TypedDict

from ai_service.imaging import DecodedImage
from ai_service.models.base import NsfwModel
from ai_service.protocol.immich import ModelTask, ModelType
from ai_service.tasks.base import Entries, InvalidReply, Models, Task, is_number


class NsfwOutput(TypedDict):
    score: float
    """P(nsfw) in 0-1; 0.5 is open_nsfw's usual cut."""


class Nsfw(Task):
    name = ModelTask.NSFW
    types = frozenset({ModelType.CLASSIFICATION})
    timeout_s = 30.0
    used_by_immich = False
    on_mtphotos = False

    def min_side(self, models: Models) -> int | None:
        model = models.get(ModelType.CLASSIFICATION)
        return model.input_size if isinstance(model, NsfwModel) else None

    def run_image(self, models: Models, entries: Entries, image: DecodedImage) -> NsfwOutput:
        model = models[ModelType.CLASSIFICATION]
        assert isinstance(model, NsfwModel)
        return {"score": model.score(image.rgb)}

    def check_reply(self, value: object, entries: Entries, expected_dim: int | None) -> NsfwOutput:
        if not isinstance(value, dict):
            raise InvalidReply(f"nsfw must be an object, got {type(value).__name__}")
        score = value.get("score")
        if not is_number(score) or not 0.0 <= score <= 1.0:  # type: ignore[operator]
            raise InvalidReply(f"nsfw 'score' must be a number in 0-1, got {score!r}")
        # Fields this gateway does not know pass through: a newer backend may send more.
        return {**value, "score": float(score)}  # type: ignore[typeddict-item, arg-type]


NSFW = Nsfw()
