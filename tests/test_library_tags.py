"""Zero-shot tags, plumbing only: the shipped bilingual vocabulary, text embeddings cached once per model,
tags stored per item, facets and the search filter, over the library and over HTTP. The tiny CLIP test
models have random weights, so which tags an image gets means nothing here; quality is not claimed."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

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
        assert api.get("/api/items/999999/tags").status_code == 404
        filtered = api.get("/api/search/text", params={"q": "猫", "mode": "clip", "tag": item_tags[0]["tag"]}).json()
        assert added in [r["id"] for r in filtered["results"]]
