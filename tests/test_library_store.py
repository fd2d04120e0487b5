"""Library mode on a real PostgreSQL (pgvector): schema, content addressing, the per-step pipeline
(poisoned images, retries, crash and resume), the CLI, duplicate groups, OCR text search, blocklist."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from PIL import Image, ImageDraw, ImageFont, ImageOps

from db.migrate import discover_migrations
from library import items, search
from library.db import MIGRATIONS_DIR, Database
from library.filters import ItemFilters
from library.service import Library
from tests.library_support import PDQ_DATA, REPO, distinct_images, encode, library_env, photo, settings_from

FONT = Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc")


@pytest.fixture
def env(postgres_uri: str, tmp_path: Path) -> dict[str, str]:
    return library_env(postgres_uri, tmp_path / "data")


@pytest.fixture
def library(env: dict[str, str]) -> Iterator[Library]:
    lib = Library(settings_from(env))
    try:
        yield lib
    finally:
        lib.close()


def run_cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "library", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def steps_of(library: Library, item_id: int) -> dict[str, dict[str, object]]:
    with library.db.conn() as conn:
        return {s["name"]: s for s in items.step_states(conn, item_id)}


# ---- schema -----------------------------------------------------------------------------------------------


def test_migrations_are_idempotent_and_install_the_segmenter(env: dict[str, str]) -> None:
    db = Database(settings_from(env))
    try:
        assert db.migrate() == [m.version for m in discover_migrations(MIGRATIONS_DIR)]
        assert db.migrate() == []
        with db.conn() as conn:
            assert conn.execute("SELECT segmenter_name()").fetchone() in (("bigram-1",), ("zhparser-1",))
            indexes = {
                r[0]
                for r in conn.execute(
                    "SELECT indexname FROM pg_indexes WHERE schemaname = %s", [env["LIBRARY_SCHEMA_NAME"]]
                )
            }
            assert {f"pdq_c{i}_idx" for i in range(16)} <= indexes
            assert {"blocklist_c0_idx", "blocklist_c15_idx", "ocr_doc_idx"} <= indexes
            assert {f"video_frame_c{i}_idx" for i in range(16)} <= indexes
            # No Immich table is needed and none was touched.
            assert conn.execute("SELECT to_regclass('public.asset_ocr')").fetchone() == (None,)
    finally:
        db.close()


# ---- content addressing -----------------------------------------------------------------------------------


def test_same_bytes_are_one_item_whatever_the_route(library: Library, tmp_path: Path) -> None:
    data = encode(photo("coffee"), "JPEG", quality=92)
    (tmp_path / "a.jpg").write_bytes(data)
    (tmp_path / "copy with another name.jpeg").write_bytes(data)
    first = library.ingestor.add_path(tmp_path / "a.jpg")
    again = library.ingestor.add_path(tmp_path / "copy with another name.jpeg")
    uploaded = library.ingestor.add_bytes(data, source="upload", location="upload", hash_now=True)
    assert first.created and not again.created and not uploaded.created
    assert first.item_id == again.item_id == uploaded.item_id
    other = library.ingestor.add_bytes(encode(photo("coffee"), "PNG"), source="upload", location="upload")
    assert other.created and other.item_id != first.item_id
    with library.db.conn() as conn:
        item = items.get_item(conn, first.item_id)
    assert item is not None
    assert (item.width, item.height, item.format, item.source) == (600, 400, "JPEG", "path")


def test_exif_orientation_decides_the_stored_size(library: Library) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    added = library.ingestor.add_bytes(
        encode(photo("coffee"), "JPEG", exif=exif), source="upload", location="upload", hash_now=True
    )
    with library.db.conn() as conn:
        item = items.get_item(conn, added.item_id)
    assert item is not None and (item.width, item.height) == (400, 600)


def test_heic_is_ingested(library: Library) -> None:
    pytest.importorskip("pillow_heif")
    added = library.ingestor.add_bytes(
        encode(photo("astronaut"), "HEIF", quality=90), source="upload", location="upload", hash_now=True
    )
    with library.db.conn() as conn:
        item = items.get_item(conn, added.item_id)
    assert item is not None and item.format == "HEIF"
    assert steps_of(library, added.item_id)["pdq"]["state"] == "done"


# ---- pipeline -----------------------------------------------------------------------------------------------


def test_poisoned_image_fails_only_itself_with_its_reason(library: Library, tmp_path: Path) -> None:
    good = distinct_images(3)
    for n, data in enumerate(good):
        (tmp_path / f"good{n}.png").write_bytes(data)
    jpeg = encode(photo("chelsea"), "JPEG", quality=90)
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # header fine, pixels missing
    added = {p.name: library.ingestor.add_path(p) for p in sorted(tmp_path.iterdir())}
    library.pipeline.run_until_idle()
    for name, a in added.items():
        step = steps_of(library, a.item_id)["pdq"]
        if name == "truncated.jpg":
            assert step["state"] == "failed"
            assert "not a usable image" in str(step["reason"])
            assert step["attempts"] == 1  # the image's fault: no retry
        else:
            assert step["state"] == "done", (name, step)


def test_missing_or_changed_file_fails_permanently(library: Library, tmp_path: Path) -> None:
    a, b = distinct_images(2)
    (tmp_path / "gone.png").write_bytes(a)
    (tmp_path / "edited.png").write_bytes(b)
    gone = library.ingestor.add_path(tmp_path / "gone.png")
    edited = library.ingestor.add_path(tmp_path / "edited.png")
    (tmp_path / "gone.png").unlink()
    (tmp_path / "edited.png").write_bytes(a)
    library.pipeline.run_until_idle()
    assert "file not found" in str(steps_of(library, gone.item_id)["pdq"]["reason"])
    assert "file changed" in str(steps_of(library, edited.item_id)["pdq"]["reason"])


def test_transient_errors_are_retried_with_backoff_then_fail(postgres_uri: str, tmp_path: Path) -> None:
    env = library_env(
        postgres_uri,
        tmp_path / "data",
        LIBRARY_OCR_MODEL="no-such-ocr-model",
        LIBRARY_MAX_ATTEMPTS="3",
        LIBRARY_RETRY_BASE_S="0.2",
    )
    lib = Library(settings_from(env))
    try:
        added = lib.ingestor.add_bytes(distinct_images(1)[0], source="upload", location="upload", hash_now=True)
        lib.pipeline.run_until_idle()
        ocr = steps_of(lib, added.item_id)["ocr"]
        assert ocr["state"] == "pending" and ocr["attempts"] == 1 and ocr["reason"]
        for _ in range(50):
            lib.pipeline.run_until_idle()
            if steps_of(lib, added.item_id)["ocr"]["state"] == "failed":
                break
            time.sleep(0.1)
        ocr = steps_of(lib, added.item_id)["ocr"]
        assert ocr["state"] == "failed" and ocr["attempts"] == 3
        assert "no-such-ocr-model" in str(ocr["reason"])
        assert steps_of(lib, added.item_id)["pdq"]["state"] == "done"  # other steps are unaffected
    finally:
        lib.close()


def test_a_claim_whose_worker_died_is_taken_over(library: Library) -> None:
    added = library.ingestor.add_bytes(distinct_images(1)[0], source="upload", location="upload")
    with library.db.conn() as conn:
        claims = library.pipeline.claim(conn)
        assert [c.item_id for c in claims] == [added.item_id]
        assert library.pipeline.claim(conn) == []  # leased: nobody else takes it
        # The holder is recorded as a process that is gone (a killed worker on this machine).
        conn.execute("UPDATE step SET claimed_by = %s", [f"{os.uname().nodename}:999999:1.000"])
    assert library.pipeline.release_dead_claims() == 1
    library.pipeline.run_until_idle()
    step = steps_of(library, added.item_id)["pdq"]
    assert step["state"] == "done" and step["attempts"] == 2


def test_a_killed_but_unreaped_worker_counts_as_dead(library: Library) -> None:
    """A worker killed with SIGKILL stays a zombie until its parent reaps it (in containers, maybe never):
    its claims must be released all the same, by the next idle worker, without an explicit call."""
    import psutil

    from library.pipeline import _alive

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        identity = f"{os.uname().nodename}:{child.pid}:{psutil.Process(child.pid).create_time():.3f}"
        assert _alive(identity)
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not _alive(identity)
        added = library.ingestor.add_bytes(distinct_images(1)[0], source="upload", location="upload")
        with library.db.conn() as conn:
            assert len(library.pipeline.claim(conn)) == 1
            conn.execute("UPDATE step SET claimed_by = %s", [identity])
        library.pipeline.run_until_idle()  # idle: releases the zombie's claim, then runs it
        assert steps_of(library, added.item_id)["pdq"]["state"] == "done"
    finally:
        child.wait()


def test_cli_add_is_recursive_and_resumes_after_a_kill(env: dict[str, str], tmp_path: Path) -> None:
    images = distinct_images(40, size=640)
    root = tmp_path / "photos"
    for n, data in enumerate(images):
        folder = root / f"album{n % 3}" / ("nested" if n % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img{n:03d}.png").write_bytes(data)
    (root / "notes.txt").write_text("ignored: not an image extension")
    (root / "fake.jpg").write_text("<html>named .jpg</html>")
    env = {**env, "LIBRARY_WORKERS": "1"}
    # First run: the pipeline is killed (SIGKILL) while it processes.
    proc = subprocess.Popen(
        [sys.executable, "-m", "library", "add", str(root)],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    settings = settings_from(env)
    dsn = env["LIBRARY_DATABASE_URL"]
    schema = settings.schema_name
    deadline = time.monotonic() + 120
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            if conn.execute("SELECT to_regclass(%s)", [f"{schema}.step"]).fetchone() != (None,):
                done = conn.execute(f"SELECT count(*) FROM {schema}.step WHERE state = 'done'").fetchone()[0]
        if done >= 5:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    # Second run: everything is there once, nothing is redone, the rest is finished.
    second = run_cli(env, "add", str(root))
    assert second.returncode == 0, second.stderr
    assert "skipped" in second.stderr and "fake.jpg" in second.stderr
    assert "adding" in second.stderr and "processing" in second.stderr  # progress bars
    with psycopg.connect(dsn, autocommit=True) as conn:
        n_items = conn.execute(f"SELECT count(*) FROM {schema}.item").fetchone()[0]
        states = dict(conn.execute(f"SELECT state, count(*) FROM {schema}.step GROUP BY state").fetchall())
        hashed = conn.execute(f"SELECT count(DISTINCT item_id) FROM {schema}.pdq").fetchone()[0]
        tries = conn.execute(f"SELECT max(attempts) FROM {schema}.step").fetchone()[0]
    assert n_items == 40
    assert states == {"done": 40}
    assert hashed == 40
    assert tries <= 2  # at most the step that was running at the kill ran twice


# ---- duplicates, search -------------------------------------------------------------------------------------


def test_duplicate_groups_api_and_cli(library: Library, env: dict[str, str], tmp_path: Path) -> None:
    coffee, chelsea, rocket = photo("coffee"), photo("chelsea"), photo("rocket")
    files = {
        "coffee.png": encode(coffee),
        "coffee-small.jpg": encode(coffee.resize((300, 200)), "JPEG", quality=60),
        "coffee-mirror.png": encode(ImageOps.mirror(coffee)),
        "chelsea.png": encode(chelsea),
        "chelsea-gray.png": encode(ImageOps.grayscale(chelsea)),
        "rocket.png": encode(rocket),
    }
    ids = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        ids[name] = library.ingestor.add_path(tmp_path / name).item_id
    library.pipeline.run_until_idle()
    groups = [sorted(h["id"] for h in g) for g in library.duplicates(None)]
    assert sorted(groups) == sorted(
        [
            sorted([ids["coffee.png"], ids["coffee-small.jpg"], ids["coffee-mirror.png"]]),
            sorted([ids["chelsea.png"], ids["chelsea-gray.png"]]),
        ]
    )
    cli = run_cli(env, "duplicates", "--json")
    assert cli.returncode == 0, cli.stderr
    assert sorted(sorted(h["id"] for h in g) for g in json.loads(cli.stdout)) == sorted(groups)
    # A threshold of 0 keeps only exact hash matches (grayscale of a colour photo hashes the same here).
    strict = [sorted(h["id"] for h in g) for g in library.duplicates(0)]
    assert all(ids["coffee-small.jpg"] not in g for g in strict)


def test_search_by_image_and_by_item(library: Library) -> None:
    ids = {
        name: library.ingestor.add_bytes(encode(photo(name)), source="upload", location=name).item_id
        for name in ("coffee", "chelsea", "astronaut")
    }
    library.pipeline.run_until_idle()
    query = encode(ImageOps.mirror(photo("chelsea")).resize((225, 150)), "JPEG", quality=40)
    threshold, hits = library.search_image(query, "pdq", None, None)
    assert threshold == 31 and [h.item.id for h in hits] == [ids["chelsea"]]
    assert 0 < hits[0].distance <= 31
    _, similar = library.search_item(ids["coffee"], "pdq", 256, 10)
    assert ids["coffee"] not in [h.item.id for h in similar]  # never itself
    assert [h.distance for h in similar] == sorted(h.distance for h in similar)


@pytest.mark.skipif(not FONT.is_file(), reason=f"CJK font {FONT} not installed (apt fonts-wqy-zenhei)")
def test_ocr_step_and_chinese_text_search(postgres_uri: str, tmp_path: Path) -> None:
    env = library_env(postgres_uri, tmp_path / "data", LIBRARY_OCR_MODEL="PP-OCRv6_small")
    lib = Library(settings_from(env))
    try:

        def render(lines: list[str]) -> bytes:
            image = Image.new("RGB", (900, 120 * len(lines) + 40), "white")
            draw = ImageDraw.Draw(image)
            for n, line in enumerate(lines):
                draw.text((40, 40 + 120 * n), line, font=ImageFont.truetype(str(FONT), 56), fill="black")
            return encode(image)

        invoice = lib.ingestor.add_bytes(render(["增值税专用发票", "No. 12345"]), source="upload", location="a")
        welcome = lib.ingestor.add_bytes(render(["北京欢迎你"]), source="upload", location="b")
        lib.pipeline.run_until_idle()
        assert steps_of(lib, invoice.item_id)["ocr"]["state"] == "done"
        assert [h.item.id for h in lib.search_text("发票", "ocr", None)] == [invoice.item_id]
        assert [h.item.id for h in lib.search_text("增值税发票", "ocr", None)] == [invoice.item_id]  # fuzzy
        assert [h.item.id for h in lib.search_text("北京", "ocr", None)] == [welcome.item_id]
        assert lib.search_text("上海", "ocr", None) == []
        assert [h.item.id for h in lib.search_text("发票", "ocr", None, ItemFilters(location_prefix="a"))] == [
            invoice.item_id
        ]
        assert lib.search_text("发票", "ocr", None, ItemFilters(location_prefix="b")) == []
        assert lib.search_text("发票", "ocr", None, ItemFilters(source="path")) == []
        assert lib.search_text("'\\\x00 & | !", "ocr", None) == []  # hostile query text is harmless
    finally:
        lib.close()


def test_clip_plumbing_with_a_tiny_random_model(
    postgres_uri: str, tmp_path: Path, clip_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random weights: this checks the wiring (step, storage, query), never search quality."""
    monkeypatch.setenv("AI_SERVICE_MODEL_DIR", str(clip_model_dir))
    env = library_env(postgres_uri, tmp_path / "data", LIBRARY_CLIP_MODEL="test-cn-clip-tiny")
    lib = Library(settings_from(env))
    try:
        assert lib.default_match_type() == "clip"
        added = [lib.ingestor.add_bytes(d, source="upload", location="x").item_id for d in distinct_images(3)]
        lib.pipeline.run_until_idle()
        assert all(steps_of(lib, i)["clip"]["state"] == "done" for i in added)
        _, hits = lib.search_image(distinct_images(3)[1], "clip", 0.01, 5)
        assert hits and hits[0].item.id == added[1] and hits[0].distance < 1e-3
        _, similar = lib.search_item(added[0], "clip", 2.0, 5)
        assert added[0] not in [h.item.id for h in similar] and len(similar) == 2
        assert [h.item.id for h in lib.search_text("猫", "hybrid", 5)]  # CLIP text side answers
        # Duplicate pairs by CLIP are recorded at the clip step; an exact copy is certainly one.
        copy = lib.ingestor.add_bytes(
            encode(Image.open(io.BytesIO(distinct_images(3)[2])), "BMP"), source="upload", location="copy"
        ).item_id
        lib.pipeline.run_until_idle()
        groups = [sorted(h["id"] for h in g) for g in lib.duplicates(None, "clip")]
        assert any({added[2], copy} <= set(g) for g in groups)
        with pytest.raises(ValueError):
            lib.duplicates(0.5, "clip")  # more than was recorded
        with lib.db.conn() as conn:
            dims = conn.execute("SELECT vector_dims(embedding) FROM clip LIMIT 1").fetchone()[0]
            conn.execute("SET enable_seqscan = off")
            plan = "\n".join(
                r[0]
                for r in conn.execute(
                    f"EXPLAIN SELECT item_id FROM clip WHERE vector_dims(embedding) = {dims} "
                    f"ORDER BY embedding::vector({dims}) <=> %s::vector({dims}) LIMIT 5",
                    [str([0.1] * dims)],
                )
            )
            conn.execute("RESET enable_seqscan")
        assert f"clip_hnsw_{dims}_idx" in plan
    finally:
        lib.close()


def test_faces_step_with_the_bundled_dlib_model(postgres_uri: str, tmp_path: Path) -> None:
    env = library_env(postgres_uri, tmp_path / "data", LIBRARY_FACE_MODEL="dlib")
    lib = Library(settings_from(env))
    try:
        person = lib.ingestor.add_bytes(encode(photo("astronaut")), source="upload", location="p")
        coffee = lib.ingestor.add_bytes(encode(photo("coffee")), source="upload", location="c")
        lib.pipeline.run_until_idle()
        assert steps_of(lib, person.item_id)["faces"]["state"] == "done"
        assert steps_of(lib, coffee.item_id)["faces"]["state"] == "done"
        with lib.db.conn() as conn:
            rows = conn.execute(
                "SELECT item_id, x1, y1, x2, y2, score, vector_dims(embedding) FROM face ORDER BY item_id"
            ).fetchall()
        assert [r[0] for r in rows] == [person.item_id]
        _, x1, y1, x2, y2, score, dims = rows[0]
        assert 150 < x1 < x2 < 300 and 50 < y1 < y2 < 200 and score >= 0.7 and dims > 0  # her face, upper middle
    finally:
        lib.close()


# ---- blocklist ----------------------------------------------------------------------------------------------


def test_blocklist_flags_existing_and_new_items_and_hides_them(
    library: Library, env: dict[str, str], tmp_path: Path
) -> None:
    bridge = (PDQ_DATA / "bridge-mods/aaa-orig.jpg").read_bytes()
    before = library.ingestor.add_bytes(bridge, source="upload", location="bridge", hash_now=True)
    other = library.ingestor.add_bytes(encode(photo("coffee")), source="upload", location="coffee", hash_now=True)
    hash_file = tmp_path / "hashes.txt"
    hash_file.write_text(
        "# ThreatExchange PDQ\nf8f8f0cee0f4a84f06370a22038f63f0b36e2ed596621e1d33e6b39c4e9c9b22,100,bridge\n"
    )
    cli = run_cli(env, "blocklist", str(hash_file))
    assert cli.returncode == 0, cli.stderr
    assert "1 added" in cli.stdout and "1 items flagged" in cli.stdout
    # A mirrored, re-encoded copy added later is flagged at ingest.
    mirrored = encode(ImageOps.mirror(Image.open(PDQ_DATA / "bridge-mods/aaa-orig.jpg")), "JPEG", quality=70)
    after = library.ingestor.add_bytes(mirrored, source="upload", location="mirror", hash_now=True)
    with library.db.conn() as conn:
        flagged = {r[0] for r in conn.execute("SELECT item_id FROM block_hit")}
    assert flagged == {before.item_id, after.item_id}
    # Excluded from search, even by its exact bytes.
    _, hits = library.search_image(bridge, "pdq", 256, 50)
    assert {h.item.id for h in hits} == {other.item_id}
    # On-demand check: matches without storing anything.
    with library.db.conn() as conn:
        n_items = conn.execute("SELECT count(*) FROM item").fetchone()
    found = library.check_blocklist((PDQ_DATA / "bridge-mods/blur-a-lot.jpg").read_bytes())
    assert found is not None and found.label == "bridge" and found.distance <= 31
    assert library.check_blocklist(encode(photo("astronaut"))) is None
    with library.db.conn() as conn:
        assert conn.execute("SELECT count(*) FROM item").fetchone() == n_items
    # Importing the same list again adds nothing.
    assert library.import_blocklist_text(hash_file.read_text(), "again").already_listed == 1


def test_blocklist_from_a_folder_of_images(library: Library, env: dict[str, str], tmp_path: Path) -> None:
    folder = tmp_path / "known"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode(photo("rocket")))
    (folder / "flat.png").write_bytes(encode(Image.new("RGB", (200, 200), "grey")))
    cli = run_cli(env, "blocklist", str(folder))
    assert cli.returncode == 0, cli.stderr
    assert "1 added" in cli.stdout and "quality" in cli.stderr  # the flat image is refused
    copy = library.ingestor.add_bytes(
        encode(photo("rocket").resize((320, 213)), "JPEG", quality=50), source="upload", location="x", hash_now=True
    )
    with library.db.conn() as conn:
        assert conn.execute("SELECT item_id FROM block_hit").fetchall() == [(copy.item_id,)]


def test_pdq_lookup_uses_the_chunk_indexes_and_is_exact(library: Library) -> None:
    rng = random.Random(5)
    stored = ["".join(rng.choice("01") for _ in range(256)) for _ in range(300)]
    with library.db.conn() as conn:
        for n, bits in enumerate(stored):
            item = items.NewItem(
                sha256=n.to_bytes(32, "big"),
                md5="0" * 32,
                byte_size=1,
                width=1,
                height=1,
                format="PNG",
                source="upload",
                location="synthetic",
            )
            item_id, _ = items.insert_item(conn, item, [])
            conn.execute(
                "INSERT INTO pdq (item_id, kind, hash, quality) VALUES (%s, 'plain', %s, 100)",
                [item_id, bits],
            )
        conn.execute("ANALYZE pdq")
        for threshold in (0, 15, 31, 40, 47, 60):
            for target in stored[:20]:
                flipped = list(target)
                for bit in rng.sample(range(256), threshold):
                    flipped[bit] = "1" if flipped[bit] == "0" else "0"
                query = "".join(flipped)
                found = search.pdq_matches(conn, library.settings, [query], threshold=threshold, limit=10)
                exact = sorted((bin(int(s, 2) ^ int(query, 2)).count("1"), i) for i, s in enumerate(stored))
                assert found and found[0].distance == exact[0][0] == threshold
        where, params = search.candidate_filter("p", [stored[0]], 31)
        conn.execute("SET enable_seqscan = off")  # a 300-row table would be scanned anyway
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                psycopg.sql.SQL("EXPLAIN SELECT p.item_id FROM pdq AS p WHERE {}").format(where), params
            )
        )
        conn.execute("RESET enable_seqscan")
    assert "BitmapOr" in plan and "pdq_c15_idx" in plan
    assert search.chunk_probes([stored[0]], 31) is not None and len(search.chunk_probes([stored[0]], 31)[0]) == 17
    assert len(search.chunk_probes([stored[0]], 47)[0]) == 137
    assert search.chunk_probes([stored[0]], 48) is None  # beyond the index: scanned


@pytest.mark.skipif(not FONT.is_file(), reason=f"CJK font {FONT} not installed (apt fonts-wqy-zenhei)")
def test_inference_through_an_ai_service_url(
    postgres_uri: str, tmp_path: Path, clip_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LIBRARY_INFERENCE_URL: CLIP and OCR run on a real ``python -m ai_service`` over Immich's /predict; the
    vectors are the ones the in-process path computes, and a broken image fails its steps for good."""
    from library.inference import LibraryInference
    from tests.servers import module_process

    with module_process("ai_service", {"AI_SERVICE_MODEL_DIR": str(clip_model_dir)}, log=tmp_path / "ai.log") as ai:
        env = library_env(
            postgres_uri,
            tmp_path / "data",
            LIBRARY_INFERENCE_URL=ai.base,
            LIBRARY_CLIP_MODEL="test-cn-clip-tiny",
            LIBRARY_OCR_MODEL="PP-OCRv6_small",
            LIBRARY_FACE_MODEL="dlib",
        )
        lib = Library(settings_from(env))
        try:
            image = Image.new("RGB", (700, 160), "white")
            ImageDraw.Draw(image).text((30, 40), "增值税专用发票", font=ImageFont.truetype(str(FONT), 56), fill="black")
            text_item = lib.ingestor.add_bytes(encode(image), source="upload", location="t")
            jpeg = encode(photo("chelsea"), "JPEG")
            broken = lib.ingestor.add_bytes(jpeg[:3000], source="upload", location="b")
            lib.pipeline.run_until_idle()
            assert {s: v["state"] for s, v in steps_of(lib, text_item.item_id).items()} == {
                "pdq": "done",
                "clip": "done",
                "ocr": "done",
                "faces": "done",
            }
            faces = lib.inference.faces(encode(photo("astronaut")))
            assert len(faces) == 1 and faces[0].score >= 0.7 and 150 < faces[0].box[0] < 300
            assert [h.item.id for h in lib.search_text("发票", "ocr", None)] == [text_item.item_id]
            remote = lib.inference.clip_image(encode(image))
            monkeypatch.setenv("AI_SERVICE_MODEL_DIR", str(clip_model_dir))
            local = LibraryInference(lib.settings.model_copy(update={"inference_url": None}))
            try:
                assert float(remote @ local.clip_image(encode(image))) > 0.999
            finally:
                local.close()
            steps = steps_of(lib, broken.item_id)
            assert steps["clip"]["state"] == "failed" and "inference service" in str(steps["clip"]["reason"])
            assert steps["clip"]["attempts"] == 1
        finally:
            lib.close()


def test_two_workers_storing_the_first_vector_of_a_size_do_not_deadlock(library: Library) -> None:
    """The first CLIP vector of a dimension creates its HNSW index inside the storing transaction. Two workers
    doing that at once used to deadlock in PostgreSQL (one step failed and waited out its lease); creation is
    now serialised. Forced overlap: A creates the index and holds its transaction open while B starts."""
    import threading

    ids = [library.ingestor.add_bytes(data, source="upload", location="upload").item_id for data in distinct_images(2)]
    dims = 37  # a size no other test stores, so the index is created here
    vector = str([0.5] * dims)
    a_created = threading.Event()
    errors: list[BaseException] = []

    def store(item_id: int, before_insert: threading.Event | None, after_ensure: threading.Event | None) -> None:
        try:
            with library.db.conn() as conn, conn.transaction():
                if before_insert is not None:
                    assert before_insert.wait(30)
                search.ensure_clip_index(conn, dims)
                if after_ensure is not None:
                    after_ensure.set()
                    time.sleep(1.5)  # B now runs its ensure while A still holds the new index uncommitted
                conn.execute(
                    "INSERT INTO clip (item_id, model, embedding) VALUES (%s, 'm', %s::vector)", [item_id, vector]
                )
        except BaseException as exc:
            errors.append(exc)

    a = threading.Thread(target=store, args=(ids[0], None, a_created))
    b = threading.Thread(target=store, args=(ids[1], a_created, None))
    a.start()
    b.start()
    a.join(60)
    b.join(60)
    assert errors == []
    with library.db.conn() as conn:
        assert conn.execute("SELECT count(*) FROM clip WHERE vector_dims(embedding) = %s", [dims]).fetchone() == (2,)
        assert conn.execute("SELECT to_regclass(%s)", [f"clip_hnsw_{dims}_idx"]).fetchone() != (None,)
