"""What the service knows about CLIP models before any file is on disk: names, dimensions, aliases.

Two sources of names:

* Chinese-CLIP (OFA-Sys/Chinese-CLIP), named after Immich's ``<arch>__<pretrained>`` convention as
  ``<cn_clip arch>__cn-clip``. ``models pull`` converts ViT-B-16, ViT-L-14 and ViT-L-14-336 from the
  ONNX exports published for transformers.js (``transformers_js``); ``models export-cn-clip`` exports
  any of them from the official checkpoints (needs torch).
* Immich's own allow-list (``ai_service.protocol.immich_clip_models``, from Immich's server
  ``CLIP_MODEL_INFO``), so ``models list`` can show what ``models pull`` can fetch and the
  dimension each needs in Immich's ``smart_search`` column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ai_service.protocol.immich_clip_models import IMMICH_CLIP_DIMENSIONS, MCLIP_NAMES

ClipSource = Literal["cn-clip", "openclip", "mclip"]

CN_CLIP_SUFFIX = "__cn-clip"


@dataclass(frozen=True, slots=True)
class KnownClipModel:
    name: str
    embed_dim: int
    source: ClipSource


@dataclass(frozen=True, slots=True)
class CnClipArch:
    """Shape facts of one official Chinese-CLIP checkpoint (cn_clip ``_MODEL_INFO`` + model configs)."""

    arch: str  # cn_clip's name, e.g. "ViT-B-16"
    embed_dim: int
    image_size: int
    vision: dict[str, object]
    text: dict[str, object]

    @property
    def name(self) -> str:
        return f"{self.arch}{CN_CLIP_SUFFIX}"


# RoBERTa-wwm-ext-base-chinese / -large / RBT3: the text towers of the five official checkpoints.
_ROBERTA_BASE = {"model": "RoBERTa-wwm-ext-base-chinese", "width": 768, "heads": 12, "layers": 12}
_ROBERTA_LARGE = {"model": "RoBERTa-wwm-ext-large-chinese", "width": 1024, "heads": 16, "layers": 24}
_RBT3 = {"model": "RBT3-chinese", "width": 768, "heads": 12, "layers": 3}

CN_CLIP_ARCHS: dict[str, CnClipArch] = {
    a.arch: a
    for a in (
        CnClipArch("ViT-B-16", 512, 224, {"width": 768, "layers": 12, "patch_size": 16}, _ROBERTA_BASE),
        CnClipArch("ViT-L-14", 768, 224, {"width": 1024, "layers": 24, "patch_size": 14}, _ROBERTA_BASE),
        CnClipArch("ViT-L-14-336", 768, 336, {"width": 1024, "layers": 24, "patch_size": 14}, _ROBERTA_BASE),
        CnClipArch("ViT-H-14", 1024, 224, {"width": 1280, "layers": 32, "patch_size": 14}, _ROBERTA_LARGE),
        CnClipArch("RN50", 1024, 224, {"width": 64, "layers": [3, 4, 6, 3]}, _RBT3),
    )
}

# cn-clip's fixed text settings (cn_clip.clip.tokenize defaults; every official checkpoint uses them).
CN_CLIP_CONTEXT_LENGTH = 52
CN_CLIP_VOCAB_SIZE = 21128
# cn-clip normalises with OpenAI CLIP's statistics (cn_clip.clip.utils.image_transform).
CN_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CN_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

KNOWN_CLIP_MODELS: dict[str, KnownClipModel] = {
    **{a.name: KnownClipModel(a.name, a.embed_dim, "cn-clip") for a in CN_CLIP_ARCHS.values()},
    **{
        name: KnownClipModel(name, dim, "mclip" if name in MCLIP_NAMES else "openclip")
        for name, dim in IMMICH_CLIP_DIMENSIONS.items()
    },
}

# Other spellings users meet for the Chinese-CLIP checkpoints: the Hugging Face model cards
# (OFA-Sys/chinese-clip-vit-base-patch16 -> cleaned to the last path part), cn_clip's bare arch names
# as MT Photos' CLIP_MODEL uses them, and "_" for "-" in the suffix. Keys are lower case.
_CN_CLIP_ALIASES: dict[str, str] = {
    "chinese-clip-vit-base-patch16": "ViT-B-16__cn-clip",
    "chinese-clip-vit-large-patch14": "ViT-L-14__cn-clip",
    "chinese-clip-vit-large-patch14-336px": "ViT-L-14-336__cn-clip",
    "chinese-clip-vit-huge-patch14": "ViT-H-14__cn-clip",
    "chinese-clip-rn50": "RN50__cn-clip",
}
for _arch in CN_CLIP_ARCHS.values():
    for _spelling in (_arch.arch, f"{_arch.arch}__cn_clip", f"{_arch.arch}__chinese-clip", f"cn-clip-{_arch.arch}"):
        _CN_CLIP_ALIASES[_spelling.lower()] = _arch.name
    _CN_CLIP_ALIASES[_arch.name.lower()] = _arch.name


def canonical_clip_name(name: str) -> str:
    """The on-disk name for an alias of a Chinese-CLIP checkpoint; ``name`` itself otherwise.

    Immich's names are case-sensitive and pass through unchanged."""
    if name in KNOWN_CLIP_MODELS:
        return name
    return _CN_CLIP_ALIASES.get(name.lower(), name)


def cn_clip_arch(name: str) -> CnClipArch | None:
    """The Chinese-CLIP architecture behind a canonical ``<arch>__cn-clip`` name."""
    if not name.endswith(CN_CLIP_SUFFIX):
        return None
    return CN_CLIP_ARCHS.get(name.removesuffix(CN_CLIP_SUFFIX))


# Immich's WEBLATE_TO_FLORES200 (immich_ml/models/constants.py): UI locale -> NLLB language code.
WEBLATE_TO_FLORES200: dict[str, str] = {
    "af": "afr_Latn",
    "ar": "arb_Arab",
    "az": "azj_Latn",
    "be": "bel_Cyrl",
    "bg": "bul_Cyrl",
    "ca": "cat_Latn",
    "cs": "ces_Latn",
    "da": "dan_Latn",
    "de": "deu_Latn",
    "el": "ell_Grek",
    "en": "eng_Latn",
    "es": "spa_Latn",
    "et": "est_Latn",
    "fa": "pes_Arab",
    "fi": "fin_Latn",
    "fr": "fra_Latn",
    "he": "heb_Hebr",
    "hi": "hin_Deva",
    "hr": "hrv_Latn",
    "hu": "hun_Latn",
    "hy": "hye_Armn",
    "id": "ind_Latn",
    "it": "ita_Latn",
    "ja": "jpn_Hira",
    "kmr": "kmr_Latn",
    "ko": "kor_Hang",
    "lb": "ltz_Latn",
    "lt": "lit_Latn",
    "lv": "lav_Latn",
    "mfa": "zsm_Latn",
    "mk": "mkd_Cyrl",
    "mn": "khk_Cyrl",
    "mr": "mar_Deva",
    "ms": "zsm_Latn",
    "nb-NO": "nob_Latn",
    "nn": "nno_Latn",
    "nl": "nld_Latn",
    "pl": "pol_Latn",
    "pt-BR": "por_Latn",
    "pt": "por_Latn",
    "ro": "ron_Latn",
    "ru": "rus_Cyrl",
    "sk": "slk_Latn",
    "sl": "slv_Latn",
    "sr-Cyrl": "srp_Cyrl",
    "sv": "swe_Latn",
    "ta": "tam_Taml",
    "te": "tel_Telu",
    "th": "tha_Thai",
    "tr": "tur_Latn",
    "uk": "ukr_Cyrl",
    "ur": "urd_Arab",
    "vi": "vie_Latn",
    "zh-CN": "zho_Hans",
    "zh-Hans": "zho_Hans",
    "zh-TW": "zho_Hant",
}
DEFAULT_FLORES200 = "eng_Latn"


def flores200_code(language: str | None) -> str:
    """Immich's lookup: exact locale, then without its region, then English.

    Older Immich clients spell locales with ``_`` (``pt_BR``); both spellings are accepted."""
    if not language:
        return DEFAULT_FLORES200
    locale = language.strip().replace("_", "-")
    code = WEBLATE_TO_FLORES200.get(locale)
    if code is None:
        code = WEBLATE_TO_FLORES200.get(locale.split("-")[0])
    return code or DEFAULT_FLORES200
