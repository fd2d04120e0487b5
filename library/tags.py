"""Tags per item: zero-shot from the CLIP embedding with per-tag calibrated thresholds, or a tagging model.

Zero-shot (``LIBRARY_TAGS_ENABLED``, the default tagger): the image's CLIP embedding (already computed by the
'clip' step, so tags cost a matrix product) against the text embeddings of the shipped bilingual vocabulary
(:mod:`ai_service.models.tagging.vocabulary`). Text embeddings are computed once per CLIP model and prompt
and cached in ``tag_text``; each process keeps the matrix in memory after the first use.

Thresholds, per tag, first match wins: the per-tag override file (``LIBRARY_TAGS_THRESHOLDS_FILE``), the
global override (``LIBRARY_TAGS_THRESHOLD``), the calibrated threshold, and until the calibration exists
``LIBRARY_TAGS_MIN_SCORE``. The calibration (:mod:`ai_service.models.tagging.calibration`: median + k
robust deviations of the tag's scores over a random sample of the library's own photos) runs once per CLIP
model and prompt, when ``LIBRARY_TAGS_CALIBRATION_MIN_IMAGES`` photos have an embedding; its statistics are
cached in ``tag_calibration`` beside the text embeddings, and every item is then re-tagged from its stored
embedding. It needs no labels, and its quality is not measured here: the tests use random-weight models.

A tagging model (``LIBRARY_TAG_MODEL``, e.g. a RAM++ export) runs as its own 'tags' step through the AI
service's 'tagging' task; its tags are its own list, stored with their Chinese names.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np
import psycopg

from ai_service.models.tagging.calibration import read_overrides, robust_stats
from ai_service.models.tagging.vocabulary import Tag, vocabulary
from ai_service.tasks.tagging import TagScore
from library.inference import LibraryInference
from library.settings import LibrarySettings

__all__ = ["Tag", "TextEmbeddings", "assign", "by_key", "calibrate", "facets", "item_tags", "vocabulary"]

Lang = Literal["zh", "en"]


def by_key() -> dict[str, Tag]:
    return {t.key: t for t in vocabulary()}


def _prompt(settings: LibrarySettings) -> str:
    return settings.tags_prompt_zh if settings.tags_language == "zh" else settings.tags_prompt_en


def _vector(text: str) -> np.ndarray:
    return np.asarray([float(v) for v in text.strip("[]").split(",")], dtype=np.float64)


def load_overrides(path: Path | None) -> dict[str, float]:
    """LIBRARY_TAGS_THRESHOLDS_FILE, read once per process; a broken file is a configuration error."""
    if path is None:
        return {}
    try:
        return read_overrides(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"LIBRARY_TAGS_THRESHOLDS_FILE {path}: {exc}") from None


class TextEmbeddings:
    """The vocabulary's text embeddings and thresholds for the configured model: from ``tag_text`` and
    ``tag_calibration``, the missing ones computed (once, whichever worker gets there first) and stored."""

    def __init__(self, settings: LibrarySettings, inference: LibraryInference) -> None:
        self.settings = settings
        self.inference = inference
        self._lock = threading.Lock()
        self._matrix: tuple[list[str], np.ndarray] | None = None
        self._calibration: tuple[np.ndarray, np.ndarray] | None = None  # median, spread per tag
        self._overrides: dict[str, float] | None = None

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
        cached = {str(tag): _vector(text) for tag, text in rows}
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

    # ---- thresholds ---------------------------------------------------------------------------------

    def thresholds(self, conn: psycopg.Connection[Any]) -> tuple[np.ndarray, bool]:
        """One threshold per vocabulary tag, and whether the calibration was (just now) computed, in which
        case the caller re-tags the library."""
        keys, matrix = self.matrix(conn)
        fresh = False
        with self._lock:
            if self._calibration is None:
                self._calibration = self._cached_calibration(conn, keys)
            if self._calibration is None and self._enough_images(conn):
                self._calibration = self._compute_calibration(conn, keys, matrix)
                fresh = self._calibration is not None
            if self._overrides is None:
                self._overrides = load_overrides(self.settings.tags_thresholds_file)
            calibration, overrides = self._calibration, self._overrides
        if self.settings.tags_threshold is not None:
            base = np.full(len(keys), self.settings.tags_threshold)
        elif calibration is not None:
            median, spread = calibration
            base = median + self.settings.tags_calibration_k * spread
        else:
            base = np.full(len(keys), self.settings.tags_min_score)
        for n, key in enumerate(keys):
            if key in overrides:
                base[n] = overrides[key]
        return base, fresh

    def recalibrate(self, conn: psycopg.Connection[Any]) -> bool:
        """Drop the stored calibration and compute it again from a fresh sample; False with too few photos."""
        keys, matrix = self.matrix(conn)
        conn.execute(
            "DELETE FROM tag_calibration WHERE model = %s AND prompt = %s",
            [str(self.settings.clip_model), _prompt(self.settings)],
        )
        with self._lock:
            self._calibration = self._compute_calibration(conn, keys, matrix) if self._enough_images(conn) else None
            return self._calibration is not None

    def _cached_calibration(
        self, conn: psycopg.Connection[Any], keys: list[str]
    ) -> tuple[np.ndarray, np.ndarray] | None:
        rows = conn.execute(
            "SELECT tag, median, spread FROM tag_calibration WHERE model = %s AND prompt = %s",
            [str(self.settings.clip_model), _prompt(self.settings)],
        ).fetchall()
        stats = {str(tag): (float(m), float(s)) for tag, m, s in rows}
        if any(k not in stats for k in keys):
            return None
        return np.asarray([stats[k][0] for k in keys]), np.asarray([stats[k][1] for k in keys])

    def _enough_images(self, conn: psycopg.Connection[Any]) -> bool:
        # Bounded: reads at most min_images rows, so checking on every tagged photo stays cheap.
        row = conn.execute(
            "SELECT count(*) FROM (SELECT 1 FROM clip WHERE model = %s LIMIT %s) AS c",
            [str(self.settings.clip_model), self.settings.tags_calibration_min_images],
        ).fetchone()
        return row is not None and int(row[0]) >= self.settings.tags_calibration_min_images

    def _compute_calibration(
        self, conn: psycopg.Connection[Any], keys: list[str], matrix: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        model, prompt = str(self.settings.clip_model), _prompt(self.settings)
        rows = conn.execute(
            "SELECT embedding::text FROM clip WHERE model = %s ORDER BY random() LIMIT %s",
            [model, self.settings.tags_calibration_sample],
        ).fetchall()
        if len(rows) < 2:
            return None
        median, spread = robust_stats(matrix, np.stack([_vector(r[0]) for r in rows]))
        with conn.cursor() as cur:
            cur.executemany(
                """INSERT INTO tag_calibration (model, prompt, tag, median, spread, sample)
                   VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING""",
                [
                    (model, prompt, k, float(m), float(s), len(rows))
                    for k, m, s in zip(keys, median, spread, strict=True)
                ],
            )
        # Another worker may have won the race: what is stored is what every worker uses.
        return self._cached_calibration(conn, keys)


# ---- zero-shot assignment ----------------------------------------------------------------------------


def _store(
    conn: psycopg.Connection[Any], item_id: int, model: str, chosen: list[tuple[str, str | None, float]]
) -> None:
    conn.execute("DELETE FROM item_tag WHERE item_id = %s", [item_id])
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO item_tag (item_id, tag, model, score, zh) VALUES (%s, %s, %s, %s, %s)",
            [(item_id, key, model, score, zh) for key, zh, score in chosen],
        )


def choose_tags(
    keys: list[str], matrix: np.ndarray, limits: np.ndarray, image: Any, top_k: int
) -> list[tuple[str, float]]:
    """The best ``top_k`` tags at or above their threshold, highest score first."""
    scores = matrix @ np.asarray(image, dtype=np.float64)
    passing = np.flatnonzero(scores >= limits)
    best = passing[np.argsort(-scores[passing], kind="stable")][:top_k]
    return [(keys[i], float(scores[i])) for i in best]


def assign(
    conn: psycopg.Connection[Any], settings: LibrarySettings, texts: TextEmbeddings, item_id: int, image: Any
) -> list[tuple[str, float]]:
    """Store the item's zero-shot tags: the top LIBRARY_TAGS_TOP_K by cosine similarity (the vectors are unit
    length) at or above each tag's threshold. When this call completed the calibration, every item is
    re-tagged with the calibrated thresholds."""
    keys, matrix = texts.matrix(conn)
    limits, fresh = texts.thresholds(conn)
    chosen = choose_tags(keys, matrix, limits, image, settings.tags_top_k)
    _store(conn, item_id, str(settings.clip_model), [(k, None, s) for k, s in chosen])
    if fresh:
        retag_all(conn, settings, texts)
    return chosen


def retag_all(conn: psycopg.Connection[Any], settings: LibrarySettings, texts: TextEmbeddings) -> int:
    """Re-tag every item with a CLIP embedding of the configured model from that embedding (no inference)."""
    keys, matrix = texts.matrix(conn)
    limits, _ = texts.thresholds(conn)
    done = 0
    # A server-side cursor (the library may not fit in memory), which lives in a transaction: all or nothing.
    with conn.transaction(), conn.cursor(name="retag") as rows:
        rows.execute("SELECT item_id, embedding::text FROM clip WHERE model = %s", [str(settings.clip_model)])
        batch = rows.fetchmany(500)
        while batch:
            for item_id, text in batch:
                chosen = choose_tags(keys, matrix, limits, _vector(text), settings.tags_top_k)
                _store(conn, int(item_id), str(settings.clip_model), [(k, None, s) for k, s in chosen])
                done += 1
            batch = rows.fetchmany(500)
    return done


def calibrate(conn: psycopg.Connection[Any], settings: LibrarySettings, texts: TextEmbeddings) -> int:
    """Recompute the calibration from a fresh sample of the library now and re-tag every item; returns how
    many items were re-tagged (0 with fewer than two photos to sample)."""
    texts.recalibrate(conn)
    return retag_all(conn, settings, texts)


def store_model_tags(
    conn: psycopg.Connection[Any], settings: LibrarySettings, item_id: int, found: list[TagScore]
) -> None:
    """A tagging model's tags (already above its thresholds, best first), the best LIBRARY_TAGS_TOP_K kept."""
    chosen = [(t["tag"], t["zh"], float(t["score"])) for t in found[: settings.tags_top_k]]
    _store(conn, item_id, str(settings.tag_model), chosen)


# ---- reading ------------------------------------------------------------------------------------------


def item_tags(conn: psycopg.Connection[Any], item_id: int) -> list[dict[str, Any]]:
    names = by_key()
    rows = conn.execute("SELECT tag, score, zh FROM item_tag WHERE item_id = %s ORDER BY score DESC", [item_id])
    return [_named(names, str(tag), zh, score=float(score)) for tag, score, zh in rows]


def facets(
    conn: psycopg.Connection[Any], limit: int, lang: Lang = "zh", item_ids: list[int] | None = None
) -> list[dict[str, Any]]:
    """Tags in use with their item counts, most used first (blocked items left out): over the whole library,
    or over ``item_ids`` (a search's results). ``name`` is the tag's name in ``lang``."""
    names = by_key()
    rows = conn.execute(
        """SELECT tag, count(*), max(zh) FROM item_tag AS t
           WHERE NOT EXISTS (SELECT 1 FROM block_hit AS b WHERE b.item_id = t.item_id)
             AND (%s::bigint[] IS NULL OR t.item_id = ANY(%s::bigint[]))
           GROUP BY tag ORDER BY count(*) DESC, tag LIMIT %s""",
        [item_ids, item_ids, limit],
    )
    found = [_named(names, str(tag), zh, count=int(n)) for tag, n, zh in rows]
    for entry in found:
        entry["name"] = entry[lang]
    return found


def _named(names: dict[str, Tag], key: str, zh: str | None = None, **extra: Any) -> dict[str, Any]:
    """A stored Chinese name (a tagging model's own) wins over the vocabulary's."""
    tag = names.get(key)
    return {"tag": key, "en": tag.en if tag else key, "zh": zh or (tag.zh if tag else key), **extra}
