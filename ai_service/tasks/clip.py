"""CLIP: an image or a text -> one embedding, serialised as a JSON-array string (a pgvector literal).

Immich sizes its ``smart_search.embedding`` column from the model name it sends, so the expected
dimension of a reply comes from the gateway's routing (``expected_dim``), not from this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
from pydantic import ValidationError

from ai_service.imaging import DecodedImage
from ai_service.models.base import ClipTextualModel, ClipVisualModel
from ai_service.protocol.immich import ModelTask, ModelType, embedding_to_str
from ai_service.protocol.mtphotos import ClipResponse, ClipTextRequest
from ai_service.tasks.base import Entries, InvalidReply, Models, MtPhotosCall, Task, check_embedding, finite_number

ClipOutput = str
"""The reply value: an L2-normalised embedding as a JSON array inside a string."""


def unit_vector(values: list[Any], what: str) -> np.ndarray:
    """MT Photos' raw model features (numbers or strings) -> an L2-normalised float32 vector."""
    if not values:
        raise InvalidReply(f"{what} is empty")
    vector = np.array([finite_number(v, what) for v in values], dtype=np.float64)
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:
        raise InvalidReply(f"{what} is all zeros")
    return (vector / norm).astype(np.float32)


class Clip(Task):
    name = ModelTask.CLIP
    types = frozenset({ModelType.VISUAL, ModelType.TEXTUAL})
    text_type = ModelType.TEXTUAL
    timeout_s = 30.0
    # Immich's admin UI accepts 'cn-clip/<512-d Immich name>': answered by the Chinese CLIP ViT-B-16.
    default_model_map: ClassVar[Mapping[str, str]] = {"cn-clip/": "ViT-B-16__cn-clip"}

    def min_side(self, models: Models) -> int | None:
        visual = models.get(ModelType.VISUAL)
        return visual.input_size if isinstance(visual, ClipVisualModel) else None

    def run_image(self, models: Models, entries: Entries, image: DecodedImage) -> ClipOutput:
        visual = models[ModelType.VISUAL]
        assert isinstance(visual, ClipVisualModel)
        return embedding_to_str(visual.encode_image(image.rgb))

    def run_text(self, models: Models, entries: Entries, text: str) -> ClipOutput:
        textual = models[ModelType.TEXTUAL]
        assert isinstance(textual, ClipTextualModel)
        return embedding_to_str(textual.encode_text(text, entries[ModelType.TEXTUAL].options.language))

    def check_reply(self, value: object, entries: Entries, expected_dim: int | None) -> ClipOutput:
        return check_embedding(value, expected_dim, "clip embedding")

    def check_size(self, value: Any, expected_dim: int | None) -> None:
        # A JSON array of numbers: its length is its commas plus one (no parse on the hot path).
        if expected_dim is not None and (size := value.count(",") + 1) != expected_dim:
            raise InvalidReply(f"clip embedding has {size} dimensions, expected {expected_dim}")

    def mtphotos_call(self, entries: Entries, image: bytes | None, text: str | None) -> MtPhotosCall:
        # MT Photos picks the encoder by what it is sent (/clip/img or /clip/txt), not by the entry's type.
        if image is not None:
            return MtPhotosCall("clip/img")
        return MtPhotosCall("clip/txt", json=ClipTextRequest(text=text or "").model_dump_json().encode())

    def from_mtphotos(self, data: dict[str, Any], entries: Entries, size: tuple[int, int] | None) -> ClipOutput:
        try:
            values = ClipResponse.model_validate(data).result
        except ValidationError:
            raise InvalidReply("CLIP reply has no 'result' list of numbers") from None
        return embedding_to_str(unit_vector(values, "CLIP vector"))


CLIP = Clip()
