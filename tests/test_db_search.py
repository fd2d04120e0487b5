"""OCR and hybrid search on a real PostgreSQL with Immich 3.1's tables: Chinese / English / mixed text,
ranking on corpora whose right answer is known, Immich's scope and filters, paging, hostile input."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from uuid import UUID

import psycopg
import pytest

from db.connection import connect_async
from db.immich_writer import write_clip_embedding
from db.migrate import migrate
from db.search import (
    UNSET,
    SearchContext,
    SearchFilters,
    SearchPage,
    build_queries,
    explain_search,
    search_hybrid,
    search_ocr,
)
from db.settings import DbSearchSettings
from db.testing import (
    add_partner,
    fresh_database,
    insert_asset,
    insert_embedding,
    insert_ocr_rows,
    insert_user,
    load_immich_schema,
)

pytestmark = pytest.mark.anyio

DIM = 512


def vec_with_similarity(similarity: float, axis: int) -> list[float]:
    """A unit vector whose cosine similarity with the query vector e0 is exactly ``similarity``; ``axis``
    (>= 1) picks the orthogonal direction, so different assets never coincide."""
    v = [0.0] * DIM
    v[0] = similarity
    v[axis] = math.sqrt(max(0.0, 1.0 - similarity * similarity))
    return v


QUERY_VEC = vec_with_similarity(1.0, 1)  # = e0


@dataclass
class Corpus:
    uri: str
    a: UUID  # the searching user
    b: UUID  # a stranger
    c: UUID  # a partner of a (inTimeline)
    ids: dict[str, UUID] = field(default_factory=dict)
    album: UUID | None = None
    person: UUID | None = None

    def names(self, page: SearchPage) -> list[str]:
        reverse = {v: k for k, v in self.ids.items()}
        return [reverse.get(h.asset_id, str(h.asset_id)) for h in page.items]


@pytest.fixture(scope="module")
def corpus(postgres_uri: str) -> Iterator[Corpus]:
    with fresh_database(postgres_uri) as uri:
        load_immich_schema(uri)
        migrate(DbSearchSettings(url=uri))
        with psycopg.connect(uri, autocommit=True) as conn:
            a, b, c = insert_user(conn), insert_user(conn), insert_user(conn)
            add_partner(conn, c, a, in_timeline=True)
            cp = Corpus(uri, a, b, c)
            axis = iter(range(2, DIM))

            def add(name: str, owner: UUID, ocr: list[str] | None, sim: float | None, **kw: object) -> UUID:
                asset = insert_asset(conn, owner, **kw)  # type: ignore[arg-type]
                if ocr:
                    insert_ocr_rows(conn, asset, ocr)
                if sim is not None:
                    insert_embedding(conn, asset, vec_with_similarity(sim, next(axis)))
                cp.ids[name] = asset
                return asset

            add("invoice", a, ["增值税专用发票", "No.12345"], 0.30)
            add("beijing", a, ["我爱北京天安门"], 0.10)
            add("starbucks", a, ["Welcome to STARBUCKS Coffee"], 0.05)
            add("tokyo", a, ["Tokyo東京タワー 営業時間 10:00"], 0.02)
            add("fullwidth", a, ["ＡＢＣ公司 电话：０１０－１２３４"], 0.01)
            add("trashed", a, ["发票"], 0.99, deleted_at=datetime(2024, 5, 1, tzinfo=UTC))
            add("archived", a, ["发票"], 0.98, visibility="archive")
            add("locked", a, ["发票"], 0.97, visibility="locked")
            hidden = add("hidden", a, ["发票"], 0.96, visibility="hidden", asset_type="VIDEO")
            add("live", a, ["发票 live"], 0.03, live_photo_video_id=hidden)
            add("video", a, ["发票 video"], 0.04, asset_type="VIDEO", taken_at=datetime(2020, 6, 1, tzinfo=UTC))
            add(
                "fav",
                a,
                ["收据 receipt"],
                0.06,
                is_favorite=True,
                taken_at=datetime(2023, 3, 3, tzinfo=UTC),
                exif={"city": "Beijing", "make": "Canon", "model": "EOS R5", "rating": 5},
            )
            add("apple", a, ["收据 receipt"], 0.07, exif={"city": "Shanghai", "make": "Apple", "model": "iPhone"})
            add("nocity", a, ["收据 receipt"], 0.08, exif={"city": None, "make": "Sony"})
            add("stranger", b, ["发票"], 0.999)
            add("partner", c, ["发票"], 0.5)

            album = conn.execute("INSERT INTO album (\"albumName\") VALUES ('trip') RETURNING id").fetchone()
            assert album is not None
            cp.album = album[0]
            conn.execute('INSERT INTO album_asset ("albumId", "assetId") VALUES (%s, %s)', [cp.album, cp.ids["apple"]])
            person = conn.execute('INSERT INTO person ("ownerId", name) VALUES (%s, %s) RETURNING id', [a, "Li"])
            row = person.fetchone()
            assert row is not None
            cp.person = row[0]
            conn.execute('INSERT INTO asset_face ("assetId", "personId") VALUES (%s, %s)', [cp.ids["apple"], cp.person])

            # The ranking corpus (user e): the right order is known by construction.
            e = insert_user(conn)
            cp.ids["user_e"] = e
            add("e_both", e, ["发票"], 0.90)  # both signals
            add("e_clip", e, None, 0.95)  # best CLIP, no text
            add("e_ocr3", e, ["发票 发票 发票"], None)  # OCR only, no embedding
            add("e_ocr_long", e, ["发票 报销 单据 审批 流程 说明"], None)  # weaker OCR, no embedding
            add("e_weak", e, ["天气"], 0.20)  # weak CLIP, unrelated text

            # Paging corpus (user p): 25 matches with deliberate ties.
            p = insert_user(conn)
            cp.ids["user_p"] = p
            for i in range(25):
                add(f"p{i:02d}", p, ["页码 " * (1 + i % 4) + str(i)], (i % 5) / 10)
        yield cp


@pytest.fixture()
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture()
async def conn(corpus: Corpus) -> AsyncIterator[psycopg.AsyncConnection]:
    # db.search has one driver, psycopg's async one (the gateway's); the tests use it too.
    async with await psycopg.AsyncConnection.connect(corpus.uri, autocommit=True) as c:
        yield c


@pytest.fixture()
def setup(corpus: Corpus) -> Iterator[psycopg.Connection]:
    """A plain connection for test data (db.testing and db.immich_writer write synchronously)."""
    with psycopg.connect(corpus.uri, autocommit=True) as c:
        yield c


@pytest.fixture()
async def ctx(conn: psycopg.AsyncConnection, corpus: Corpus) -> SearchContext:
    return await SearchContext.load(conn, DbSearchSettings(url=corpus.uri))


async def ocr(conn: psycopg.AsyncConnection, ctx: SearchContext, users: list[UUID], q: str, **kw: object) -> SearchPage:
    return await search_ocr(conn, context=ctx, user_ids=users, query_text=q, **kw)  # type: ignore[arg-type]


# --- detection ----------------------------------------------------------------------------------------------


async def test_context_detects_fallback_and_hnsw(ctx: SearchContext) -> None:
    assert ctx.segmenter == "bigram-1"
    assert ctx.vector_index == "hnsw"
    assert ctx.embedding_dim == DIM


# --- text matching ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("发票", {"invoice", "live", "video"}),  # inside 增值税专用发票 No.12345
        ("北京", {"beijing"}),  # inside unsegmented 我爱北京天安门
        ("天安门", {"beijing"}),
        ("京", {"beijing", "tokyo"}),  # one character: prefix of a bigram / last character of a run
        ("12345", {"invoice"}),
        ("no.12345", {"invoice"}),
        ("starbucks", {"starbucks"}),  # case-insensitive
        ("Starbuck", {"starbucks"}),  # prefix of a Latin word
        ("welcome coffee", {"starbucks"}),  # several words, anywhere
        ("東京タワー", {"tokyo"}),
        ("tokyo 営業時間", {"tokyo"}),  # mixed scripts
        ("Tokyo東京", {"tokyo"}),
        ("10:00", {"tokyo"}),
        ("ABC公司", {"fullwidth"}),  # full-width letters in the OCR text
        ("０１０－１２３４", {"fullwidth"}),  # full-width query
        ("增值税发票", {"invoice"}),  # fuzzy: all but one bigram
        ("北京大学", set()),  # two of three bigrams missing
        ("receipt 收据", {"fav", "apple", "nocity"}),
    ],
)
async def test_text_queries(
    conn: psycopg.AsyncConnection, ctx: SearchContext, corpus: Corpus, query: str, expected: set[str]
) -> None:
    assert set(corpus.names(await ocr(conn, ctx, [corpus.a], query))) == expected


async def test_exact_matches_rank_above_fuzzy(
    conn: psycopg.AsyncConnection, ctx: SearchContext, corpus: Corpus
) -> None:
    with psycopg.connect(corpus.uri, autocommit=True) as data:
        exact = insert_asset(data, corpus.a)
        insert_ocr_rows(data, exact, ["增值税发票"])
    try:
        page = await ocr(conn, ctx, [corpus.a], "增值税发票")
        assert [h.asset_id for h in page.items] == [exact, corpus.ids["invoice"]]
        assert page.items[0].ocr_exact is True and page.items[1].ocr_exact is False
        assert page.items[0].score >= 0.5 > page.items[1].score
    finally:
        await conn.execute("DELETE FROM asset WHERE id = %s", [exact])


# --- scope and filters --------------------------------------------------------------------------------------


async def test_scope_owner_trash_visibility(conn: psycopg.AsyncConnection, ctx: SearchContext, corpus: Corpus) -> None:
    a, c = corpus.a, corpus.c
    assert set(corpus.names(await ocr(conn, ctx, [a], "发票"))) == {"invoice", "live", "video"}
    assert "stranger" not in corpus.names(await ocr(conn, ctx, [a, c], "发票"))
    assert set(corpus.names(await ocr(conn, ctx, [a, c], "发票"))) == {"invoice", "live", "video", "partner"}
    assert corpus.names(await ocr(conn, ctx, [corpus.b], "发票")) == ["stranger"]
    assert set(corpus.names(await ocr(conn, ctx, [a], "发票", filters=SearchFilters(with_deleted=True)))) == {
        "invoice",
        "live",
        "video",
        "trashed",
    }
    assert corpus.names(await ocr(conn, ctx, [a], "发票", filters=SearchFilters(visibility="archive"))) == ["archived"]
    assert corpus.names(await ocr(conn, ctx, [a], "发票", filters=SearchFilters(visibility="locked"))) == ["locked"]
    assert set(corpus.names(await ocr(conn, ctx, [a], "发票", filters=SearchFilters(visibility=None)))) == {
        "invoice",
        "live",
        "video",
        "archived",
        "hidden",
    }
    assert (await ocr(conn, ctx, [], "发票")).items == []


async def test_scope_applies_to_clip_candidates(
    conn: psycopg.AsyncConnection, ctx: SearchContext, corpus: Corpus
) -> None:
    # the highest similarities belong to other users / trashed / archived / locked / hidden assets
    page = await search_hybrid(
        conn, context=ctx, user_ids=[corpus.a], query_text=None, query_embedding=QUERY_VEC, size=50
    )
    names = corpus.names(page)
    assert names[0] == "invoice"  # 0.30 is the best of a's visible timeline assets
    assert not {"trashed", "archived", "locked", "hidden", "stranger", "partner"} & set(names)
    sims = [h.clip_similarity for h in page.items]
    assert sims == sorted(sims, reverse=True)  # type: ignore[type-var]


@pytest.mark.parametrize(
    ("query", "filters", "expected"),
    [
        ("发票", SearchFilters(taken_after=datetime(2021, 1, 1, tzinfo=UTC)), {"invoice", "live"}),
        ("发票", SearchFilters(taken_before=datetime(2021, 1, 1, tzinfo=UTC)), {"video"}),
        ("发票", SearchFilters(asset_type="VIDEO"), {"video"}),
        ("发票", SearchFilters(asset_type="IMAGE"), {"invoice", "live"}),
        ("发票", SearchFilters(is_motion=True), {"live"}),
        ("发票", SearchFilters(is_motion=False), {"invoice", "video"}),
        ("收据", SearchFilters(is_favorite=True), {"fav"}),
        ("收据", SearchFilters(is_favorite=False), {"apple", "nocity"}),
        ("收据", SearchFilters(city="Beijing"), {"fav"}),
        ("收据", SearchFilters(city=None), {"nocity"}),
        ("收据", SearchFilters(make="Apple", model="iPhone"), {"apple"}),
        ("收据", SearchFilters(lens_model=None), {"fav", "apple", "nocity"}),
        ("收据", SearchFilters(rating=5), {"fav"}),
        ("收据", SearchFilters(with_exif=True), {"fav", "apple", "nocity"}),
        ("发票", SearchFilters(with_exif=True), set()),
        ("收据", SearchFilters(is_not_in_album=True), {"fav", "nocity"}),
        ("收据", SearchFilters(library_id=None), {"fav", "apple", "nocity"}),
        ("收据", SearchFilters(is_offline=True), set()),
        ("收据", SearchFilters(city=UNSET, country=UNSET), {"fav", "apple", "nocity"}),
    ],
)
async def test_filters(
    conn: psycopg.AsyncConnection,
    ctx: SearchContext,
    corpus: Corpus,
    query: str,
    filters: SearchFilters,
    expected: set[str],
) -> None:
    assert set(corpus.names(await ocr(conn, ctx, [corpus.a], query, filters=filters))) == expected
    # the same filters hold on the CLIP side of a hybrid search
    page = await search_hybrid(
        conn, context=ctx, user_ids=[corpus.a], query_text=None, query_embedding=QUERY_VEC, filters=filters, size=100
    )
    clip_names = set(corpus.names(page))
    assert expected <= clip_names or not expected
    assert all(n not in clip_names for n in ("trashed", "stranger"))


async def test_album_and_person_filters(conn: psycopg.AsyncConnection, ctx: SearchContext, corpus: Corpus) -> None:
    assert corpus.album and corpus.person
    assert corpus.names(await ocr(conn, ctx, [corpus.a], "收据", filters=SearchFilters(album_ids=[corpus.album]))) == [
        "apple"
    ]
    assert corpus.names(
        await ocr(conn, ctx, [corpus.a], "收据", filters=SearchFilters(person_ids=[corpus.person]))
    ) == ["apple"]


async def test_filters_combined_with_hybrid(conn: psycopg.AsyncConnection, ctx: SearchContext, corpus: Corpus) -> None:
    filters = SearchFilters(
        taken_after=datetime(2023, 1, 1, tzinfo=UTC),
        taken_before=datetime(2023, 12, 31, tzinfo=UTC),
        asset_type="IMAGE",
        is_favorite=True,
        city="Beijing",
        make="Canon",
    )
    page = await search_hybrid(
        conn, context=ctx, user_ids=[corpus.a], query_text="收据", query_embedding=QUERY_VEC, filters=filters
    )
    assert corpus.names(page) == ["fav"]
    assert page.items[0].clip_similarity is not None and page.items[0].ocr_exact is True


# --- ranking ------------------------------------------------------------------------------------------------


async def _e_search(
    conn: psycopg.AsyncConnection, corpus: Corpus, settings: DbSearchSettings, **kw: object
) -> list[str]:
    ctx = await SearchContext.load(conn, settings)
    page = await search_hybrid(
        conn,
        context=ctx,
        user_ids=[corpus.ids["user_e"]],
        query_text=kw.pop("q", "发票"),  # type: ignore[arg-type]
        query_embedding=kw.pop("emb", QUERY_VEC),
        **kw,  # type: ignore[arg-type]
    )
    return corpus.names(page)


def _tie(corpus: Corpus, *names: str) -> list[str]:
    return sorted(names, key=lambda n: str(corpus.ids[n]))


async def test_ocr_ranking(conn: psycopg.AsyncConnection, ctx: SearchContext, corpus: Corpus) -> None:
    page = await ocr(conn, ctx, [corpus.ids["user_e"]], "发票")
    # ts_rank normalised by document length: the sign that reads just 发票 first, the long text last
    assert corpus.names(page) == ["e_both", "e_ocr3", "e_ocr_long"]
    scores = [h.score for h in page.items]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 3


async def test_hybrid_rrf_ranking(conn: psycopg.AsyncConnection, corpus: Corpus) -> None:
    # RRF with k=60. CLIP ranks: e_clip 1, e_both 2, e_weak 3; OCR ranks: e_both 1, e_ocr3 2, e_ocr_long 3.
    # e_both: 1/62 + 1/61; e_clip 1/61; e_ocr3 1/62; e_weak = e_ocr_long = 1/63 (a tie: asset id decides).
    names = await _e_search(conn, corpus, DbSearchSettings(url=corpus.uri))
    assert names == ["e_both", "e_clip", "e_ocr3", *_tie(corpus, "e_weak", "e_ocr_long")]


async def test_hybrid_weights_are_configurable(conn: psycopg.AsyncConnection, corpus: Corpus) -> None:
    # clip 2 : ocr 1 -> e_both 2/62 + 1/61, e_clip 2/61, e_weak 2/63, e_ocr3 1/62, e_ocr_long 1/63
    names = await _e_search(conn, corpus, DbSearchSettings(url=corpus.uri, clip_weight=2.0, ocr_weight=1.0))
    assert names == ["e_both", "e_clip", "e_weak", "e_ocr3", "e_ocr_long"]


async def test_hybrid_weighted_fusion(conn: psycopg.AsyncConnection, corpus: Corpus) -> None:
    ctx = await SearchContext.load(conn, DbSearchSettings(url=corpus.uri, fusion="weighted"))
    page = await search_hybrid(
        conn, context=ctx, user_ids=[corpus.ids["user_e"]], query_text="发票", query_embedding=QUERY_VEC
    )
    names = corpus.names(page)
    assert names[:2] == ["e_both", "e_clip"]
    assert names[-1] == "e_weak"  # lowest similarity in the pool, no OCR match
    assert all(0.0 <= h.score <= 1.0 for h in page.items)


async def test_single_signal_assets_rank(conn: psycopg.AsyncConnection, corpus: Corpus) -> None:
    ctx = await SearchContext.load(conn, DbSearchSettings(url=corpus.uri))
    page = await search_hybrid(
        conn, context=ctx, user_ids=[corpus.ids["user_e"]], query_text="发票", query_embedding=QUERY_VEC
    )
    by_name = dict(zip(corpus.names(page), page.items, strict=True))
    assert by_name["e_clip"].ocr_relevance is None and by_name["e_clip"].clip_similarity == pytest.approx(0.95)
    assert by_name["e_ocr3"].clip_similarity is None and by_name["e_ocr3"].ocr_exact is True
    assert by_name["e_both"].score == pytest.approx(1.0, abs=0.02)  # first in both lists ~ 1
    # text that matches nothing: CLIP alone still answers; no embedding: OCR alone answers
    assert (await _e_search(conn, corpus, DbSearchSettings(url=corpus.uri), q="!!!"))[:3] == [
        "e_clip",
        "e_both",
        "e_weak",
    ]
    assert await _e_search(conn, corpus, DbSearchSettings(url=corpus.uri), emb=None) == [
        "e_both",
        "e_ocr3",
        "e_ocr_long",
    ]


async def test_clip_only_matches_exact_nearest_neighbours(
    conn: psycopg.AsyncConnection, ctx: SearchContext, corpus: Corpus
) -> None:
    page = await search_hybrid(
        conn, context=ctx, user_ids=[corpus.ids["user_p"]], query_text=None, query_embedding=QUERY_VEC, size=25
    )
    cur = await conn.execute(
        """SELECT s."assetId" FROM smart_search s JOIN asset a ON a.id = s."assetId"
           WHERE a."ownerId" = %s ORDER BY s.embedding <=> %s::real[]::vector, s."assetId" """,
        [corpus.ids["user_p"], QUERY_VEC],
    )
    exact = await cur.fetchall()
    assert [h.asset_id for h in page.items] == [r[0] for r in exact]


# --- paging -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hybrid", [False, True])
async def test_paging_is_complete_and_stable(
    conn: psycopg.AsyncConnection, ctx: SearchContext, corpus: Corpus, hybrid: bool
) -> None:
    user = [corpus.ids["user_p"]]

    async def run(page: int, size: int) -> SearchPage:
        if hybrid:
            return await search_hybrid(
                conn, context=ctx, user_ids=user, query_text="页码", query_embedding=QUERY_VEC, page=page, size=size
            )
        return await ocr(conn, ctx, user, "页码", page=page, size=size)

    everything = await run(1, 100)
    assert len(everything.items) == 25 and everything.next_page is None
    pages = [await run(1, 10), await run(2, 10), await run(3, 10)]
    assert [p.next_page for p in pages] == [2, 3, None]
    assert [len(p.items) for p in pages] == [10, 10, 5]
    assert [h.asset_id for p in pages for h in p.items] == [h.asset_id for h in everything.items]
    assert (await run(4, 10)).items == []
    assert await run(2, 10) == pages[1]  # same answer twice
    keys = [(-h.score, str(h.asset_id)) for h in everything.items]
    assert keys == sorted(keys)  # score DESC, asset id ASC


async def test_exactly_full_page_has_no_next(conn: psycopg.AsyncConnection, ctx: SearchContext, corpus: Corpus) -> None:
    page = await ocr(conn, ctx, [corpus.ids["user_p"]], "页码", size=25)
    assert len(page.items) == 25 and page.next_page is None


async def test_paging_arguments_are_validated(
    conn: psycopg.AsyncConnection, ctx: SearchContext, corpus: Corpus
) -> None:
    for bad in ({"size": 0}, {"size": 1001}, {"page": 0}):
        with pytest.raises(ValueError):
            await ocr(conn, ctx, [corpus.a], "发票", **bad)
    with pytest.raises(ValueError, match="dimensions"):
        await search_hybrid(conn, context=ctx, user_ids=[corpus.a], query_text="x", query_embedding=[0.1] * 3)
    with pytest.raises(ValueError, match="finite"):
        await search_hybrid(conn, context=ctx, user_ids=[corpus.a], query_text="x", query_embedding=[math.nan] * DIM)


# --- hostile input ------------------------------------------------------------------------------------------

HOSTILE = [
    "' or 1=1 --",
    "'; DROP TABLE asset; --",
    "'",
    "''",
    '"',
    "\\",
    "\\'",
    "发票' & !",
    "a & b | !c",
    "<->",
    "a <-> b <2> c",
    "foo:*",
    ":*",
    "(((",
    ")))",
    "!",
    "&|!()<>:*'\"\\",
    "发票 | 北京 & !天安门",
    "😀",
    "👨‍👩‍👧‍👦 发票 🇨🇳",
    "\x00",
    "发\x00票",
    "\ud800",
    "a\udfffb",
    "\u200b\u200d\ufeff",
    "\u3000\u00a0 ",
    "   ",
    "",
    "%s %(x)s {}",
    "$1 $$ $tag$",
    "x" * 10_000,
    "发票" * 5_000,
    "发 " * 5_000,
    "\n\r\t",
    "ℌ℮ℓℓ◎ 𝕨𝕠𝕣𝕝𝕕",
    "ﷺ ﷽",
    "Ａ" * 300,
]


@pytest.mark.parametrize("query", HOSTILE)
async def test_hostile_queries_return_normally(
    conn: psycopg.AsyncConnection, ctx: SearchContext, corpus: Corpus, query: str
) -> None:
    page = await ocr(conn, ctx, [corpus.a], query)
    assert isinstance(page, SearchPage)
    page = await search_hybrid(conn, context=ctx, user_ids=[corpus.a], query_text=query, query_embedding=QUERY_VEC)
    assert isinstance(page, SearchPage) and page.items  # CLIP still answers
    strict, match = await build_queries(conn, ctx, query)
    assert (strict is None) == (match is None)
    assert match is None or match.count("'") <= 2 * (ctx.settings.max_query_tokens * 13)  # bounded size
    # nothing happened to the tables
    cur = await conn.execute("SELECT count(*) FROM asset")
    assert (await cur.fetchone())[0] > 0  # type: ignore[index]


async def test_operators_in_text_are_plain_characters(
    conn: psycopg.AsyncConnection, ctx: SearchContext, corpus: Corpus
) -> None:
    assert set(corpus.names(await ocr(conn, ctx, [corpus.a], "发票' & | !"))) == {"invoice", "live", "video"}
    assert set(corpus.names(await ocr(conn, ctx, [corpus.a], "(北京)"))) == {"beijing"}
    assert set(corpus.names(await ocr(conn, ctx, [corpus.a], "\x00北京\x00"))) == {"beijing"}


async def test_long_query_is_truncated(conn: psycopg.AsyncConnection, corpus: Corpus) -> None:
    settings = DbSearchSettings(url=corpus.uri, max_query_chars=4)
    ctx = await SearchContext.load(conn, settings)
    strict, match = await build_queries(conn, ctx, "北京天安门广场")  # only 北京天安 is used
    assert strict == "'北京' <-> '京天' <-> '天安'"
    assert match is not None and match.startswith(strict + " | ")  # plus the one-missing (fuzzy) branches
    assert corpus.names(await ocr(conn, ctx, [corpus.a], "北京天安门广场" + "x" * 10_000)) == ["beijing"]


# --- plans, connections -------------------------------------------------------------------------------------------


async def test_candidates_come_from_the_indexes(
    conn: psycopg.AsyncConnection, ctx: SearchContext, corpus: Corpus
) -> None:
    # On tables this small the planner rightly prefers scanning the owner's few rows; switching the
    # alternatives off shows that the statements are index-shaped: the CLIP candidates can be read in
    # distance order from clip_index (HNSW), the OCR candidates from the GIN index on our documents. The
    # benchmark shows the planner choosing these indexes by itself at 100 000 assets.
    kw = {
        "context": ctx,
        "user_ids": [corpus.a],
        "query_text": "发票",
        "query_embedding": QUERY_VEC,
        "filters": SearchFilters(taken_after=datetime(2021, 1, 1, tzinfo=UTC)),
    }
    plans = []
    for switches in (("enable_seqscan", "enable_sort"), ("enable_seqscan", "enable_nestloop")):
        for name in switches:
            await conn.execute(f"SET {name} = off")
        try:
            plans.append(await explain_search(conn, **kw))  # type: ignore[arg-type]
        finally:
            await conn.execute("RESET ALL")
    assert "Index Scan using clip_index on smart_search" in plans[0]
    assert "Bitmap Index Scan on ocr_document_doc_idx" in plans[1]
    assert await explain_search(conn, context=ctx, user_ids=[corpus.a], query_text="!!!") == ""


async def test_context_serves_another_connection(corpus: Corpus, ctx: SearchContext) -> None:
    # The gateway loads the context once and searches on whichever pooled connection is free.
    async with await connect_async(ctx.settings) as other:
        hybrid = await search_hybrid(
            other, context=ctx, user_ids=[corpus.ids["user_e"]], query_text="发票", query_embedding=QUERY_VEC
        )
        text = await search_ocr(other, context=ctx, user_ids=[corpus.a], query_text="北京")
    assert corpus.names(hybrid)[0] == "e_both"
    assert corpus.names(text) == ["beijing"]


async def test_search_inside_callers_transaction(
    conn: psycopg.AsyncConnection, ctx: SearchContext, corpus: Corpus
) -> None:
    async with await psycopg.AsyncConnection.connect(corpus.uri) as tx:  # not autocommit: runs in a savepoint
        await tx.execute("SELECT 1")
        assert corpus.names(await search_ocr(tx, context=ctx, user_ids=[corpus.a], query_text="北京")) == ["beijing"]
        await tx.rollback()


async def test_regenerated_embedding_moves_ranking(
    conn: psycopg.AsyncConnection, setup: psycopg.Connection, ctx: SearchContext, corpus: Corpus
) -> None:
    """A regenerate write (db.immich_writer) is visible to the next search."""
    user = [corpus.ids["user_e"]]
    target = corpus.ids["e_weak"]
    write_clip_embedding(setup, target, vec_with_similarity(0.99, 500), settings=ctx.settings)
    try:
        page = await search_hybrid(conn, context=ctx, user_ids=user, query_text=None, query_embedding=QUERY_VEC)
        assert page.items[0].asset_id == target
    finally:
        write_clip_embedding(setup, target, vec_with_similarity(0.20, 501), settings=ctx.settings)
