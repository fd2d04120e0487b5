"""Immich's CLIP model table (server ``CLIP_MODEL_INFO``): model name -> embedding dimension.

Immich validates the configured CLIP name against this table (the part after the last '/', ':' -> '_')
and sizes ``smart_search.embedding`` from it, never from the ML response. Whatever answers a name
must therefore return exactly this many dimensions. Data as of Immich 3.1.
"""

from __future__ import annotations

_BY_DIMENSION: dict[int, tuple[str, ...]] = {
    512: (
        "RN101__openai",
        "RN101__yfcc15m",
        "ViT-B-16__laion400m_e31",
        "ViT-B-16__laion400m_e32",
        "ViT-B-16__openai",
        "ViT-B-32__laion2b-s34b-b79k",
        "ViT-B-32__laion2b_e16",
        "ViT-B-32__laion400m_e31",
        "ViT-B-32__laion400m_e32",
        "ViT-B-32__openai",
        "XLM-Roberta-Base-ViT-B-32__laion5b_s13b_b90k",
        "XLM-Roberta-Large-Vit-B-32",
    ),
    640: (
        "RN50x4__openai",
        "ViT-B-16-plus-240__laion400m_e31",
        "ViT-B-16-plus-240__laion400m_e32",
        "XLM-Roberta-Large-Vit-B-16Plus",
    ),
    768: (
        "LABSE-Vit-L-14",
        "RN50x16__openai",
        "ViT-B-16-SigLIP-256__webli",
        "ViT-B-16-SigLIP-384__webli",
        "ViT-B-16-SigLIP-512__webli",
        "ViT-B-16-SigLIP-i18n-256__webli",
        "ViT-B-16-SigLIP__webli",
        "ViT-B-16-SigLIP2__webli",
        "ViT-B-16-SigLIP2-256__webli",
        "ViT-B-16-SigLIP2-384__webli",
        "ViT-B-16-SigLIP2-512__webli",
        "ViT-B-32-SigLIP2-256__webli",
        "ViT-L-14-336__openai",
        "ViT-L-14-quickgelu__dfn2b",
        "ViT-L-14__laion2b-s32b-b82k",
        "ViT-L-14__laion400m_e31",
        "ViT-L-14__laion400m_e32",
        "ViT-L-14__openai",
        "XLM-Roberta-Large-Vit-L-14",
        "nllb-clip-base-siglip__mrl",
        "nllb-clip-base-siglip__v1",
    ),
    1024: (
        "RN50__cc12m",
        "RN50__openai",
        "RN50__yfcc15m",
        "RN50x64__openai",
        "ViT-H-14-378-quickgelu__dfn5b",
        "ViT-H-14-quickgelu__dfn5b",
        "ViT-H-14__laion2b-s32b-b79k",
        "ViT-L-16-SigLIP-256__webli",
        "ViT-L-16-SigLIP-384__webli",
        "ViT-L-16-SigLIP2-256__webli",
        "ViT-L-16-SigLIP2-384__webli",
        "ViT-L-16-SigLIP2-512__webli",
        "ViT-g-14__laion2b-s12b-b42k",
        "XLM-Roberta-Large-ViT-H-14__frozen_laion5b_s13b_b90k",
    ),
    1152: (
        "ViT-SO400M-14-SigLIP-384__webli",
        "ViT-SO400M-14-SigLIP2__webli",
        "ViT-SO400M-14-SigLIP2-378__webli",
        "ViT-SO400M-16-SigLIP2-256__webli",
        "ViT-SO400M-16-SigLIP2-384__webli",
        "ViT-SO400M-16-SigLIP2-512__webli",
        "nllb-clip-large-siglip__mrl",
        "nllb-clip-large-siglip__v1",
    ),
    1536: (
        "ViT-gopt-16-SigLIP2-256__webli",
        "ViT-gopt-16-SigLIP2-384__webli",
    ),
}

IMMICH_CLIP_DIMENSIONS: dict[str, int] = {name: dim for dim, names in _BY_DIMENSION.items() for name in names}

# M-CLIP names use a different textual encoder class (input_ids + attention_mask).
MCLIP_NAMES: frozenset[str] = frozenset(
    {"LABSE-Vit-L-14", "XLM-Roberta-Large-Vit-B-32", "XLM-Roberta-Large-Vit-B-16Plus", "XLM-Roberta-Large-Vit-L-14"}
)


def immich_clip_dimension(configured_name: str) -> int | None:
    """The dimension Immich derives for a configured CLIP name (prefix routes like 'cn-clip/…' allowed)."""
    return IMMICH_CLIP_DIMENSIONS.get(configured_name.split("/")[-1].replace(":", "_"))
