"""The shipped bilingual tag vocabulary (``vocabulary/``; its README says where each list comes from).

ImageNet-1k's 1 000 classes with the Chinese names published by Chinese-CLIP (OFA-Sys, MIT licence;
duplicates dropped), plus everyday photo concepts ImageNet lacks (``everyday.tsv``). Every entry has an
English and a Chinese name; the English name is its key. The zero-shot taggers of the AI service and of
the library both read it from here.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

VOCABULARY = Path(__file__).with_name("vocabulary")


@dataclass(frozen=True)
class Tag:
    key: str
    en: str
    zh: str


@functools.cache
def vocabulary() -> tuple[Tag, ...]:
    english = (VOCABULARY / "imagenet_en.txt").read_text(encoding="utf-8").splitlines()
    chinese = (VOCABULARY / "imagenet_zh.txt").read_text(encoding="utf-8").splitlines()
    pairs = list(zip(english, chinese, strict=True))
    for line in (VOCABULARY / "everyday.tsv").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            en, zh = line.split("\t")
            pairs.append((en, zh))
    found: dict[str, Tag] = {}
    for en, zh in pairs:
        en, zh = en.strip(), zh.strip()
        if en and zh and en not in found:
            found[en] = Tag(en, en, zh)
    return tuple(found.values())


@functools.cache
def fingerprint() -> str:
    """Changes when the vocabulary does: cached text embeddings keyed on it are recomputed."""
    digest = hashlib.sha256()
    for tag in vocabulary():
        digest.update(f"{tag.key}\t{tag.zh}\n".encode())
    return digest.hexdigest()[:16]
