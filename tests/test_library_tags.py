"""Zero-shot tags, plumbing only: the shipped bilingual vocabulary, text embeddings cached once per model,
per-tag calibrated thresholds (the math on constructed embeddings; the library path recomputed here with
numpy), overrides, tags stored per item, facets and the search filter, over the library and over HTTP. The
tiny CLIP test models have random weights, so which tags an image gets means nothing here; quality is not
claimed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest

from ai_service.models.tagging.calibration import read_overrides, robust_stats, robust_thresholds
from library import tags
from library.filters import ItemFilters
from library.service import Library
from tests.library_support import distinct_images, library_env, library_server, settings_from
from tests.servers import free_port

CJK = re.compile(r"[\u4e00-\u9fff]")


def test_the_vocabulary_has_over_1000_concepts_in_chinese_and_english() -> None:
    vocabulary = tags.vocabulary()
    assert len(vocabulary) >= 1000
    assert len({t.key for t in vocabulary}) == len(vocabulary)
    assert all(t.en.strip() and t.zh.strip() for t in vocabulary)
    assert sum(bool(CJK.search(t.zh)) for t in vocabulary) >= 0.99 * len(vocabulary)
    names = {t.en: t.zh for t in vocabulary}
    assert names["giant panda"] == "大熊猫" and names["dumplings"] == "饺子" and names["cat"] == "猫"


def test_tags_from_the_clip_vector(
    postgres_uri: str, tmp_path: Path, clip_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AI_SERVICE_MODEL_DIR", str(clip_model_dir))
    env = library_env(
        postgres_uri,
        tmp_path / "data",
        LIBRARY_CLIP_MODEL="test-cn-clip-tiny",
        LIBRARY_TAGS_ENABLED="true",
        LIBRARY_TAGS_TOP_K="3",
        LIBRARY_TAGS_MIN_SCORE="-1",
    )
    images = distinct_images(4)
    lib = Library(settings_from(env))
    try:
        ids = [lib.ingestor.add_bytes(d, source="upload", location="x").item_id for d in images[:3]]
        lib.pipeline.run_until_idle()
        with lib.db.conn() as conn:
            cached = conn.execute("SELECT count(*), min(prompt) FROM tag_text").fetchone()
            per_item = {i: tags.item_tags(conn, i) for i in ids}
            facets = tags.facets(conn, 5000)
        assert cached == (len(tags.vocabulary()), "一张{}的照片。")
        for found in per_item.values():
            assert len(found) == 3 and [t["score"] for t in found] == sorted((t["score"] for t in found), reverse=True)
            assert all(t["zh"] == tags.by_key()[t["tag"]].zh for t in found)
        assert sum(f["count"] for f in facets) == 9
        first = per_item[ids[0]][0]["tag"]
        having = [i for i, found in per_item.items() if first in {t["tag"] for t in found}]
        hits = lib.search_text("猫", "clip", 10, ItemFilters(tag=first))
        assert sorted(h.item.id for h in hits) == sorted(having)
    finally:
        lib.close()
    # A new process (empty in-memory cache) reuses the cached text embeddings: no row is added or changed.
    lib = Library(settings_from(env))
    try:
        with lib.db.conn() as conn:
            before = conn.execute("SELECT md5(string_agg(embedding::text, ',' ORDER BY tag)) FROM tag_text").fetchone()
        added = lib.ingestor.add_bytes(images[3], source="upload", location="x").item_id
        lib.pipeline.run_until_idle()
        with lib.db.conn() as conn:
            after = conn.execute("SELECT md5(string_agg(embedding::text, ',' ORDER BY tag)) FROM tag_text").fetchone()
            assert len(tags.item_tags(conn, added)) == 3
        assert before == after
    finally:
        lib.close()
    port = free_port()
    with (
        library_server(env, tmp_path / "server.log", port),
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as api,
    ):
        item_tags = api.get(f"/api/items/{added}/tags").json()
        assert len(item_tags) == 3 and set(item_tags[0]) == {"tag", "en", "zh", "score"}
        facet_list = api.get("/api/tags", params={"limit": 2}).json()["tags"]
        assert len(facet_list) == 2 and facet_list[0]["count"] >= facet_list[1]["count"]
        assert all(f["name"] == f["zh"] for f in facet_list)
        english = api.get("/api/tags", params={"limit": 2, "lang": "en"}).json()["tags"]
        assert [f["name"] for f in english] == [f["en"] for f in facet_list]
        assert api.get("/api/tags", params={"lang": "fr"}).status_code == 422
        # Facets over a search's results: the tag filter keeps the items having that tag, so its count is theirs.
        top = facet_list[0]
        scoped = api.get("/api/tags", params={"q": "猫", "mode": "clip", "tag": top["tag"], "limit": 5000}).json()
        counts = {f["tag"]: f["count"] for f in scoped["tags"]}
        assert scoped["items"] == top["count"] and counts[top["tag"]] == top["count"]
        assert all(n <= top["count"] for n in counts.values())
        assert api.get("/api/items/999999/tags").status_code == 404
        filtered = api.get("/api/search/text", params={"q": "猫", "mode": "clip", "tag": item_tags[0]["tag"]}).json()
        assert added in [r["id"] for r in filtered["results"]]


def test_calibration_math_on_constructed_embeddings() -> None:
    """Tags 0, 1, 2 are basis vectors, so an image's score for each is one coordinate, drawn here: tag 0 at
    0.2 +- 0.01, tag 1 at 0.3 +- 0.05 with 10 % of the images showing it (0.8), tag 2 constant. The robust
    statistics must recover each tag's own "absent" distribution, untouched by the images that show it."""
    rng = np.random.default_rng(7)
    n, dim = 4000, 64
    shows = rng.random(n) < 0.1
    coords = np.stack(
        [rng.normal(0.2, 0.01, n), np.where(shows, 0.8, rng.normal(0.3, 0.05, n)), np.full(n, 0.1)], axis=1
    )
    rest = rng.normal(size=(n, dim - 3))
    rest *= np.sqrt(1 - (coords**2).sum(axis=1, keepdims=True)) / np.linalg.norm(rest, axis=1, keepdims=True)
    reference = np.concatenate([coords, rest], axis=1)
    assert np.allclose(np.linalg.norm(reference, axis=1), 1)
    texts = np.eye(dim)[:3]
    median, spread = robust_stats(texts, reference)
    assert median[0] == pytest.approx(0.2, abs=0.002) and spread[0] == pytest.approx(0.01, rel=0.1)
    assert median[1] == pytest.approx(0.3, abs=0.015) and spread[1] == pytest.approx(0.05, rel=0.2)
    assert (median[2], spread[2]) == pytest.approx((0.1, 0.0), abs=1e-6)
    thresholds = robust_thresholds(texts, reference, 3.0)
    assert thresholds == pytest.approx(median + 3 * spread, abs=1e-6)
    # Mean + 3 std would be dragged up by the images showing tag 1 (and miss most of them); the robust one is not.
    naive = coords[:, 1].mean() + 3 * coords[:, 1].std()
    assert 0.4 < thresholds[1] < 0.5 < naive
    assert (coords[shows, 1] >= thresholds[1]).all() and (coords[~shows, 1] >= thresholds[1]).mean() < 0.01
    with pytest.raises(ValueError, match="two reference"):
        robust_stats(texts, reference[:1])
    with pytest.raises(ValueError, match="dimensions"):
        robust_stats(texts[:, :10], reference)


def test_override_file_format() -> None:
    assert read_overrides("# comment\ncat\t0.31\n\ngiant panda\t-0.5\n") == {"cat": 0.31, "giant panda": -0.5}
    for bad, where in (("cat 0.3", "line 1"), ("cat\tx", "line 1"), ("ok\t0.1\ncat\t2", "line 2")):
        with pytest.raises(ValueError, match=where):
            read_overrides(bad)


def _expected_tags(
    conn: psycopg.Connection[Any], ids: list[int], sample: list[int], k: float, top_k: int, overrides: dict[str, float]
) -> tuple[dict[int, list[str]], dict[str, float]]:
    """Per item, the tags the calibration must give, recomputed with numpy from what the database holds:
    text embeddings, the items' CLIP embeddings, and median + k * 1.4826 * MAD over ``sample``'s scores."""

    def vectors(query: str) -> tuple[list[Any], np.ndarray]:
        rows = conn.execute(query).fetchall()
        return [r[0] for r in rows], np.array([[float(v) for v in r[1].strip("[]").split(",")] for r in rows])

    keys, texts = vectors("SELECT tag, embedding::text FROM tag_text ORDER BY tag")
    item_ids, images = vectors("SELECT item_id, embedding::text FROM clip ORDER BY item_id")
    scores = images @ texts.T
    reference = scores[[item_ids.index(i) for i in sample]]
    median = np.median(reference, axis=0)
    limits = median + k * 1.4826 * np.median(np.abs(reference - median), axis=0)
    for n, key in enumerate(keys):
        limits[n] = overrides.get(str(key), limits[n])
    expected: dict[int, list[str]] = {}
    for row, item_id in zip(scores, item_ids, strict=True):
        order = np.argsort(-row, kind="stable")
        expected[item_id] = [str(keys[i]) for i in order if row[i] >= limits[i]][:top_k]
    assert sorted(expected) == sorted(ids)
    return expected, dict(zip(map(str, keys), median, strict=True))


def test_calibrated_thresholds_in_the_library(
    postgres_uri: str, tmp_path: Path, clip_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The calibration runs once enough photos have an embedding, is stored beside the text embeddings, and
    re-tags the photos tagged before it; the override file wins; `python -m library calibrate-tags`
    recomputes it."""
    monkeypatch.setenv("AI_SERVICE_MODEL_DIR", str(clip_model_dir))
    k, top_k = 0.5, 3
    env = library_env(
        postgres_uri,
        tmp_path / "data",
        LIBRARY_CLIP_MODEL="test-cn-clip-tiny",
        LIBRARY_TAGS_ENABLED="true",
        LIBRARY_TAGS_TOP_K=str(top_k),
        LIBRARY_TAGS_CALIBRATION_K=str(k),
        LIBRARY_TAGS_CALIBRATION_MIN_IMAGES="4",
    )
    lib = Library(settings_from(env))
    try:
        ids = []
        for n, data in enumerate(distinct_images(6)):
            ids.append(lib.ingestor.add_bytes(data, source="upload", location="x").item_id)
            lib.pipeline.run_until_idle()
            with lib.db.conn() as conn:
                tagged = conn.execute("SELECT count(*) FROM item_tag").fetchone()[0]
                calibrated = conn.execute("SELECT count(*), min(sample), max(sample) FROM tag_calibration").fetchone()
            if n < 3:  # uncalibrated: LIBRARY_TAGS_MIN_SCORE 0.2, which this random model's cosines never reach
                assert (tagged, calibrated[0]) == (0, 0)
        assert calibrated == (len(tags.vocabulary()), 4, 4)
        with lib.db.conn() as conn:
            expected, medians = _expected_tags(conn, ids, ids[:4], k, top_k, {})
            stored = {i: [t["tag"] for t in tags.item_tags(conn, i)] for i in ids}
            db_medians = dict(conn.execute("SELECT tag, median FROM tag_calibration").fetchall())
        assert all(db_medians[key] == pytest.approx(m, abs=1e-4) for key, m in medians.items())
        assert {i: set(t) for i, t in stored.items()} == {i: set(t) for i, t in expected.items()}
        assert sum(map(len, stored.values())) >= 6  # thresholds at the median: photos do get tags
    finally:
        lib.close()
    # The override file wins over the calibration: the most used tag is switched off, another always passes.
    first = max(expected.items(), key=lambda e: len(e[1]))[1][0]  # a tag the calibration does give
    overrides = tmp_path / "thresholds.tsv"
    overrides.write_text(f"# test\n{first}\t1.0\ngiant panda\t-1\n", encoding="utf-8")
    env["LIBRARY_TAGS_THRESHOLDS_FILE"] = str(overrides)
    env["LIBRARY_TAGS_TOP_K"] = "100"
    env["LIBRARY_TAGS_CALIBRATION_K"] = "2"  # k is applied when tagging: no recalibration needed for it
    done = subprocess.run(
        [sys.executable, "-m", "library", "calibrate-tags"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"retagged": 6}  # the sample: all six photos
    lib = Library(settings_from(env))
    try:
        with lib.db.conn() as conn:
            expected, _ = _expected_tags(conn, ids, ids, 2.0, 100, {first: 1.0, "giant panda": -1.0})
            stored = {i: [t["tag"] for t in tags.item_tags(conn, i)] for i in ids}
            assert conn.execute("SELECT min(sample) FROM tag_calibration").fetchone()[0] == 6
        assert {i: set(t) for i, t in stored.items()} == {i: set(t) for i, t in expected.items()}
        assert all(first not in t and "giant panda" in t and len(t) < 100 for t in stored.values())
    finally:
        lib.close()
