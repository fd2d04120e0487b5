"""Zero-shot tags: the image's CLIP embedding against the text embeddings of a bilingual vocabulary.

The vocabulary ships in ``library/vocabulary``: ImageNet-1k's 1 000 classes with the Chinese names
published by Chinese-CLIP (OFA-Sys, MIT licence; duplicates dropped), plus everyday photo concepts
ImageNet lacks (``everyday.tsv``). Every entry has an English and a Chinese name; the English name is its
key. Text embeddings are computed once per CLIP model and prompt and cached in ``tag_text``; each
process keeps the matrix in memory after the first use. Thresholds are one global cut-off for now
(LIBRARY_TAGS_MIN_SCORE): per-tag calibration needs labelled photos this project does not ship.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from library.inference import LibraryInference
from library.settings import LibrarySettings

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


def by_key() -> dict[str, Tag]:
    return {t.key: t for t in vocabulary()}


def _prompt(settings: LibrarySettings) -> str:
    return settings.tags_prompt_zh if settings.tags_language == "zh" else settings.tags_prompt_en


class TextEmbeddings:
    """The vocabulary's text embeddings for the configured model: from ``tag_text``, the missing ones
    computed (once, whichever worker gets there first) and stored."""

    def __init__(self, settings: LibrarySettings, inference: LibraryInference) -> None:
        self.settings = settings
        self.inference = inference
        self._lock = threading.Lock()
        self._matrix: tuple[list[str], np.ndarray] | None = None

    def matrix(self, conn: psycopg.Connection[Any]) -> tuple[list[str], np.ndarray]:
        with self._lock:
            if self._matrix is None:
                self._matrix = self._load(conn)
            return self._matrix

    def _load(self, conn: psycopg.Connection[Any]) -> tuple[list[str], np.ndarray]:
        model, prompt = str(self.settings.clip_model), _prompt(self.settings)
        rows = conn.execute(
            "SELECT tag, embedding::text FROM tag_text WHERE model = %s AND prompt = %s", [model, prompt]
        ).fetchall()
        cached = {str(tag): np.asarray([float(v) for v in text.strip("[]").split(",")]) for tag, text in rows}
        for tag in vocabulary():
            if tag.key in cached:
                continue
            name = tag.zh if self.settings.tags_language == "zh" else tag.en
            vector = self.inference.clip_text(prompt.format(name))
            conn.execute(
                """INSERT INTO tag_text (model, prompt, tag, embedding) VALUES (%s, %s, %s, %s::vector)
                   ON CONFLICT DO NOTHING""",
                [model, prompt, tag.key, str(vector.tolist())],
            )
            cached[tag.key] = np.asarray(vector, dtype=np.float64)
        keys = [t.key for t in vocabulary()]
        return keys, np.stack([cached[k] for k in keys])


def assign(
    conn: psycopg.Connection[Any], settings: LibrarySettings, texts: TextEmbeddings, item_id: int, image: np.ndarray
) -> list[tuple[str, float]]:
    """Store the item's tags: the top LIBRARY_TAGS_TOP_K by cosine similarity at or above
    LIBRARY_TAGS_MIN_SCORE (vectors are unit length, so the dot product is the cosine)."""
    keys, matrix = texts.matrix(conn)
    scores = matrix @ np.asarray(image, dtype=np.float64)
    order = np.argsort(-scores)[: settings.tags_top_k]
    chosen = [(keys[i], float(scores[i])) for i in order if scores[i] >= settings.tags_min_score]
    conn.execute("DELETE FROM item_tag WHERE item_id = %s", [item_id])
    for key, score in chosen:
        conn.execute(
            "INSERT INTO item_tag (item_id, tag, model, score) VALUES (%s, %s, %s, %s)",
            [item_id, key, settings.clip_model, score],
        )
    return chosen


def item_tags(conn: psycopg.Connection[Any], item_id: int) -> list[dict[str, Any]]:
    names = by_key()
    rows = conn.execute("SELECT tag, score FROM item_tag WHERE item_id = %s ORDER BY score DESC", [item_id])
    return [_named(names, str(tag), score=float(score)) for tag, score in rows]


def facets(conn: psycopg.Connection[Any], limit: int) -> list[dict[str, Any]]:
    """Tags in use with their item counts, most used first (blocked items left out)."""
    names = by_key()
    rows = conn.execute(
        """SELECT tag, count(*) FROM item_tag AS t
           WHERE NOT EXISTS (SELECT 1 FROM block_hit AS b WHERE b.item_id = t.item_id)
           GROUP BY tag ORDER BY count(*) DESC, tag LIMIT %s""",
        [limit],
    )
    return [_named(names, str(tag), count=int(n)) for tag, n in rows]


def _named(names: dict[str, Tag], key: str, **extra: Any) -> dict[str, Any]:
    tag = names.get(key)
    return {"tag": key, "en": tag.en if tag else key, "zh": tag.zh if tag else key, **extra}
