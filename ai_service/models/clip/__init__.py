"""CLIP: Chinese-CLIP and Immich's OpenCLIP / M-CLIP models on ONNX Runtime.

``catalog`` (names, dimensions, aliases), ``preprocess`` (image -> tensor), ``visual`` / ``textual``
(the encoders), ``family`` (layout, hints, loading; what the registry talks to).
"""

from ai_service.models.clip.catalog import KNOWN_CLIP_MODELS, canonical_clip_name, flores200_code
from ai_service.models.clip.family import ClipFamily
from ai_service.models.clip.textual import ClipTextualEncoder, bert_wordpiece_tokenizer
from ai_service.models.clip.visual import ClipVisualEncoder

__all__ = [
    "KNOWN_CLIP_MODELS",
    "ClipFamily",
    "ClipTextualEncoder",
    "ClipVisualEncoder",
    "bert_wordpiece_tokenizer",
    "canonical_clip_name",
    "flores200_code",
]
