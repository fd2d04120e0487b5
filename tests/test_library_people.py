"""People in library mode with the real dlib face model (tests/data/faces: ten people, 52 faces): the
clusters the pipeline makes against who is really who, incremental assignment (a new photo of a known
person joins that person; a person is only started once enough similar faces exist), a user's decisions
surviving new faces and reclustering, two workers assigning at once, and the HTTP API and CLI on a real
server with PostgreSQL."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from psycopg import sql

from library import people
from library.filters import ItemFilters
from library.service import Library
from tests.assets import astronaut_jpeg, encode_jpeg
from tests.face_photos import FACES_DIR, ONE_PERSON, T1_FACE_CENTRES, read_photo, variants
from tests.library_support import REPO, library_env, library_server, settings_from
from tests.servers import free_port


@dataclass(frozen=True)
class Photo:
    person: str  # who is in it; 't1' for the group photo of six
    variant: str
    data: bytes
    mirrored: bool
    width: int


def face_photos() -> list[Photo]:
    """Every photo of tests/face_photos.py and its variants as JPEG files: 32 photos, 52 faces, ten people."""
    sources = [(name, (FACES_DIR / f).read_bytes()) for name, files in ONE_PERSON.items() for f in files]
    sources += [("collins", astronaut_jpeg()), ("t1", (FACES_DIR / "t1.jpg").read_bytes())]
    out = []
    for name, data in sources:
        rgb = read_photo(data)
        for variant, image, mirrored in variants(rgb):
            out.append(Photo(name, variant, encode_jpeg(image, quality=95), mirrored, rgb.shape[1]))
    return out


PHOTOS = face_photos()


def photos_of(person: str, *variant_names: str) -> list[Photo]:
    return [p for p in PHOTOS if p.person == person and (not variant_names or p.variant in variant_names)]


def who(photo: Photo, box: list[float]) -> str:
    """The person a face box shows (the group photo: the nearest of its six known face centres)."""
    if photo.person != "t1":
        return photo.person
    x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    if photo.mirrored:
        x = photo.width - x
    return f"t1-person{int(np.linalg.norm(T1_FACE_CENTRES - (x, y), axis=1).argmin())}"


def add(lib: Library, photos: list[Photo]) -> dict[int, Photo]:
    added = {}
    for p in photos:
        item = lib.ingestor.add_bytes(p.data, source="upload", location=f"{p.person}-{p.variant}")
        added[item.item_id] = p
    return added


def faces_by_person(lib: Library, added: dict[int, Photo]) -> list[tuple[int, str, int | None]]:
    """(face id, true person, person id) of every stored face."""
    with lib.db.conn() as conn:
        rows = conn.execute("SELECT id, item_id, x1, y1, x2, y2, person_id FROM face ORDER BY id").fetchall()
    return [(int(r[0]), who(added[int(r[1])], [float(v) for v in r[2:6]]), r[6]) for r in rows]


@dataclass(frozen=True)
class Figures:
    faces: int
    people_true: int
    people_found: int
    unassigned: int
    purity: float  # faces in the majority true person of their cluster / assigned faces
    recall: float  # faces in the largest cluster of their true person / all faces
    pair_precision: float
    pair_recall: float


def cluster_figures(faces: list[tuple[int, str, int | None]]) -> Figures:
    assigned = [(truth, person) for _, truth, person in faces if person is not None]
    clusters: dict[int, Counter[str]] = {}
    for truth, person in assigned:
        clusters.setdefault(person, Counter())[truth] += 1
    truths: dict[str, Counter[int | None]] = {}
    for _, truth, person in faces:
        truths.setdefault(truth, Counter())[person] += 1
    majority = sum(c.most_common(1)[0][1] for c in clusters.values())
    largest = sum(max((n for p, n in c.items() if p is not None), default=0) for c in truths.values())
    same_cluster = sum(n * (n - 1) // 2 for c in clusters.values() for n in c.values())
    in_cluster_pairs = sum(sum(c.values()) * (sum(c.values()) - 1) // 2 for c in clusters.values())
    true_pairs = sum(sum(c.values()) * (sum(c.values()) - 1) // 2 for c in truths.values())
    return Figures(
        faces=len(faces),
        people_true=len(truths),
        people_found=len(clusters),
        unassigned=len(faces) - len(assigned),
        purity=majority / max(len(assigned), 1),
        recall=largest / max(len(faces), 1),
        pair_precision=same_cluster / max(in_cluster_pairs, 1),
        pair_recall=same_cluster / max(true_pairs, 1),
    )


@pytest.fixture
def make_library(postgres_uri: str, tmp_path: Path) -> Iterator[object]:
    opened: list[Library] = []

    def make(**extra: str) -> Library:
        env = library_env(postgres_uri, tmp_path / f"data{len(opened)}", LIBRARY_FACE_MODEL="dlib", **extra)
        opened.append(Library(settings_from(env)))
        return opened[-1]

    yield make
    for lib in opened:
        lib.close()


# ---- clustering quality -------------------------------------------------------------------------------------


def test_the_pipeline_clusters_ten_people_as_they_are(make_library) -> None:  # type: ignore[no-untyped-def]
    lib = make_library()
    photos = PHOTOS[:]
    random.Random(13).shuffle(photos)  # arrival order should not matter
    added = add(lib, photos)
    lib.pipeline.run_until_idle()
    figures = cluster_figures(faces_by_person(lib, added))
    print(f"\ndlib, max distance {people.max_distance(lib.settings)}, min faces 3: {figures}")
    assert figures.faces == 52 and figures.people_true == 10
    assert figures.purity == 1.0 and figures.pair_precision == 1.0  # nobody is mixed with anybody
    assert figures.recall == 1.0 and figures.unassigned == 0  # nobody is split or left out
    assert figures.people_found == 10
    with lib.db.conn() as conn:
        total, found = people.list_people(conn, 100, 0)
        assert total == 10 and sum(p.face_count for p in found) == 52
        obama = found[0]  # 16 faces: the most
        assert obama.face_count == 16 and obama.item_count == 16 and obama.cover_item_id is not None
        assert added[obama.cover_item_id].person == "obama"
        # The centroid kept by the triggers is the mean of the person's unit vectors.
        centroid, mean = conn.execute(
            "SELECT p.centroid::real[], avg(l2_normalize(f.embedding))::real[] FROM person AS p "
            "JOIN face AS f ON f.person_id = p.id WHERE p.id = %s GROUP BY p.id",
            [obama.id],
        ).fetchone()
        assert np.allclose(np.array(centroid) / 16, mean, atol=1e-5)
        # The person filter shared by every search.
        clause, params = ItemFilters(person_id=obama.id).clause(sql.SQL("x.id"))
        rows = conn.execute(sql.SQL("SELECT x.id FROM item AS x WHERE {}").format(clause), params).fetchall()
    assert {int(r[0]) for r in rows} == {i for i, p in added.items() if p.person == "obama"}


def test_a_wrong_max_distance_mixes_people_so_the_figures_can_fail(make_library) -> None:  # type: ignore[no-untyped-def]
    lib = make_library(LIBRARY_PEOPLE_MAX_DISTANCE="0.9")
    added = add(lib, photos_of("biden") + photos_of("hanks") + photos_of("collins"))
    lib.pipeline.run_until_idle()
    figures = cluster_figures(faces_by_person(lib, added))
    assert figures.people_found == 1 and figures.purity < 0.5
    # Lowering the distance and reclustering splits the person again; its id stays with one group.
    with lib.db.conn() as conn:
        (person,) = people.list_people(conn, 10, 0)[1]
        result = people.recluster(conn, lib.settings.model_copy(update={"people_max_distance": 0.4}), person.id)
    assert result.kept == 4 and len(result.new_people) == 2 and result.unassigned == 0
    figures = cluster_figures(faces_by_person(lib, added))
    assert figures.people_found == 3 and figures.purity == 1.0 and figures.recall == 1.0


# ---- incremental assignment and a user's decisions --------------------------------------------------------------


def test_new_faces_join_known_people_and_decisions_hold(make_library) -> None:  # type: ignore[no-untyped-def]
    lib = make_library()
    added = add(lib, photos_of("biden", "original", "mirrored"))
    lib.pipeline.run_until_idle()
    with lib.db.conn() as conn:
        assert people.list_people(conn, 10, 0)[0] == 0  # two similar faces: not a person yet (min faces 3)
    added |= add(lib, photos_of("biden", "jpeg20"))
    lib.pipeline.run_until_idle()
    with lib.db.conn() as conn:
        (biden,) = people.list_people(conn, 10, 0)[1]
    assert biden.face_count == 3  # the third face started the person and took the two waiting ones in

    added |= add(lib, [p for p in photos_of("obama") if p.variant in ("original", "mirrored")][:4])
    lib.pipeline.run_until_idle()
    with lib.db.conn() as conn:
        obama = next(p for p in people.list_people(conn, 10, 0)[1] if p.id != biden.id)
        people.rename(conn, obama.id, "  Barack   Obama ")
        # The user takes one Biden face out of the person: clustering must leave it out from now on.
        taken_out = people.person_item_ids(conn, biden.id, 10, 0)[1][0]
        face_id = people.item_faces(conn, taken_out)[0]["id"]
        people.set_face_person(conn, face_id, None)

    # New photos of known people: Obama's other photos and variants, and Biden's last variant.
    added |= add(lib, [p for p in photos_of("obama") if p.data not in {a.data for a in added.values()}])
    added |= add(lib, photos_of("biden", "brighter"))
    lib.pipeline.run_until_idle()
    with lib.db.conn() as conn:
        total, found = people.list_people(conn, 10, 0)
        faces = {f["id"]: f for i in added for f in people.item_faces(conn, i)}
    assert total == 2
    named = next(p for p in found if p.id == obama.id)
    assert named.name == "Barack Obama" and named.face_count == 16
    assert next(p for p in found if p.id == biden.id).face_count == 3  # 4 faces, one taken out
    assert faces[face_id]["person_id"] is None and faces[face_id]["assigned_by"] == "user"
    figures = cluster_figures([(f, who(added[i], b), pid) for f, i, b, pid in _face_rows(lib)])
    assert figures.purity == 1.0 and figures.unassigned == 1


def people_item_ids(lib: Library, person_id: int) -> list[int]:
    with lib.db.conn() as conn:
        return people.person_item_ids(conn, person_id, 1000, 0)[1]


def _face_rows(lib: Library) -> list[tuple[int, int, list[float], int | None]]:
    with lib.db.conn() as conn:
        rows = conn.execute("SELECT id, item_id, x1, y1, x2, y2, person_id FROM face").fetchall()
    return [(int(r[0]), int(r[1]), [float(v) for v in r[2:6]], r[6]) for r in rows]


def test_faces_stored_without_clustering_are_clustered_later(make_library) -> None:  # type: ignore[no-untyped-def]
    lib = make_library(LIBRARY_PEOPLE_ENABLED="false")
    added = add(lib, photos_of("biden") + photos_of("hanks", "original", "mirrored"))
    lib.pipeline.run_until_idle()
    with lib.db.conn() as conn:
        assert people.list_people(conn, 10, 0)[0] == 0
        assert people.cluster_waiting(conn, lib.settings, batch=2) == 4  # Hanks: two faces, not a person yet
        (biden,) = people.list_people(conn, 10, 0)[1]
        assert people.cluster_waiting(conn, lib.settings) == 0
    assert biden.face_count == 4 and {added[i].person for i in people_item_ids(lib, biden.id)} == {"biden"}


def test_two_workers_assigning_at_once_make_one_person(make_library) -> None:  # type: ignore[no-untyped-def]
    """Two transactions each store a face of someone new (two faces already wait); both write their face
    before either clusters it. Without the lock each would see two neighbours and start a person."""
    lib = make_library()
    photos = photos_of("biden")
    found = [lib.inference.faces(p.data) for p in photos]
    ids = list(add(lib, photos))
    with lib.db.conn() as conn, conn.transaction():
        for item_id, faces in zip(ids[:2], found[:2], strict=True):
            people.store_faces(conn, lib.settings, item_id, faces)
    barrier = threading.Barrier(2, timeout=30)
    errors: list[BaseException] = []

    def worker(item_id: int, faces: list) -> None:  # type: ignore[type-arg]
        try:
            with lib.db.pool.connection() as conn, conn.transaction():
                people.insert_faces(conn, lib.settings, item_id, faces)
                barrier.wait()
                people.assign_item(conn, lib.settings, item_id)
                time.sleep(0.3)  # hold the transaction open: the other worker must wait for it
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i, f)) for i, f in zip(ids[2:], found[2:], strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with lib.db.conn() as conn:
        total, persons = people.list_people(conn, 10, 0)
        orphans = conn.execute("SELECT count(*) FROM face WHERE person_id IS NULL").fetchone()
    assert total == 1 and persons[0].face_count == 4 and orphans == (0,)


def test_the_neighbour_search_uses_the_vector_index(make_library) -> None:  # type: ignore[no-untyped-def]
    lib = make_library()
    add(lib, photos_of("hanks"))
    lib.pipeline.run_until_idle()
    with lib.db.conn() as conn, conn.transaction():
        conn.execute("SET LOCAL enable_seqscan = off")
        face_id, vector = conn.execute("SELECT id, embedding::text FROM face LIMIT 1").fetchone()
        query = sql.SQL("EXPLAIN ") + people.neighbour_query(512)
        plan = "\n".join(r[0] for r in conn.execute(query, [vector, "dlib", face_id, vector, 100, 0.4]))
    assert "face_hnsw_512_idx" in plan


# ---- HTTP API and CLI -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(postgres_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, dict]]:  # type: ignore[type-arg]
    tmp = tmp_path_factory.mktemp("library-people")
    env = library_env(postgres_uri, tmp / "data", LIBRARY_FACE_MODEL="dlib", LIBRARY_WORKERS="2")
    port = free_port()
    with (
        library_server(env, tmp / "server.log", port),
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client,
    ):
        yield client, env
    log = (tmp / "server.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]


def upload(api: httpx.Client, photos: list[Photo]) -> list[int]:
    ids = []
    for p in photos:
        response = api.post("/api/items", files={"file": (f"{p.person}.jpg", p.data, "image/jpeg")})
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        faces = api.get("/api/status").json()["steps"]["faces"]
        if not faces.get("pending") and not faces.get("running"):
            break
        time.sleep(0.5)
    assert faces.get("failed", 0) == 0 and faces["done"] > 0, faces
    return ids


def by_size(api: httpx.Client) -> list[dict]:  # type: ignore[type-arg]
    response = api.get("/api/people")
    assert response.status_code == 200
    return response.json()["people"]


def test_people_over_http_and_the_cli(served) -> None:  # type: ignore[no-untyped-def]
    api, env = served
    hanks_items = upload(api, photos_of("hanks"))
    collins_items = upload(api, photos_of("collins", "original", "mirrored", "jpeg20"))
    listed = by_size(api)
    assert [p["face_count"] for p in listed] == [4, 3]
    hanks, collins = listed
    assert hanks["cover"]["item_id"] in hanks_items and hanks["name"] is None and hanks["item_count"] == 4
    items = api.get(f"/api/people/{collins['id']}/items").json()
    assert items["total"] == 3 and {i["id"] for i in items["items"]} == set(collins_items)
    filtered = api.get("/api/search/text", params={"q": "x", "person_id": collins["id"]})
    assert filtered.status_code == 200

    renamed = api.patch(f"/api/people/{hanks['id']}", json={"name": "Tom Hanks"})
    assert renamed.status_code == 200 and renamed.json()["name"] == "Tom Hanks"
    assert api.patch("/api/people/999999", json={"name": "x"}).status_code == 404
    assert api.patch(f"/api/people/{hanks['id']}", json={"name": "x" * 201}).status_code == 422
    assert api.patch(f"/api/people/{hanks['id']}", json={}).status_code == 422
    assert api.get("/api/people/abc").status_code == 422

    # Merge (a user's decision, here a wrong one on purpose): the result keeps the target's name.
    assert api.post(f"/api/people/{hanks['id']}/merge", json={"source_ids": [hanks["id"]]}).status_code == 400
    assert api.post(f"/api/people/{hanks['id']}/merge", json={"source_ids": [999999]}).status_code == 404
    merged = api.post(f"/api/people/{hanks['id']}/merge", json={"source_ids": [collins["id"]]})
    assert merged.status_code == 200, merged.text
    assert merged.json()["name"] == "Tom Hanks" and merged.json()["face_count"] == 7
    assert api.get(f"/api/people/{collins['id']}").status_code == 404

    # A new photo of Collins joins the merged person, and a recluster does not undo the merge.
    upload(api, photos_of("collins", "brighter"))
    (only,) = by_size(api)
    assert only["id"] == hanks["id"] and only["face_count"] == 8
    split = api.post(f"/api/people/{hanks['id']}/recluster")
    assert split.status_code == 200 and split.json() == {
        "person_id": hanks["id"],
        "kept": 8,
        "new_people": [],
        "unassigned": 0,
    }
    assert api.post("/api/people/999999/recluster").status_code == 404

    # A face taken out of its person, then put back.
    face = api.get(f"/api/items/{collins_items[0]}/faces").json()[0]
    assert face["person_id"] == hanks["id"] and face["assigned_by"] == "user"
    out = api.put(f"/api/faces/{face['id']}/person", json={"person_id": None})
    assert out.status_code == 200 and out.json()["person_id"] is None
    assert api.get(f"/api/people/{hanks['id']}").json()["face_count"] == 7
    back = api.put(f"/api/faces/{face['id']}/person", json={"person_id": hanks["id"]})
    assert back.status_code == 200 and back.json()["person_id"] == hanks["id"]
    assert api.put("/api/faces/999999/person", json={"person_id": None}).status_code == 404
    assert api.put(f"/api/faces/{face['id']}/person", json={"person_id": 999999}).status_code == 404

    # The CLI on the same database.
    cli = [sys.executable, "-m", "library", "people"]
    run_env = {**os.environ, **env}
    listing = subprocess.run([*cli, "list"], cwd=REPO, env=run_env, capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and "Tom Hanks" in listing.stdout and "8 faces" in listing.stdout
    renamed_cli = subprocess.run(
        [*cli, "rename", str(hanks["id"]), "Eileen Collins"], cwd=REPO, env=run_env, capture_output=True, text=True
    )
    assert renamed_cli.returncode == 0, renamed_cli.stderr
    assert api.get(f"/api/people/{hanks['id']}").json()["name"] == "Eileen Collins"
    missing = subprocess.run([*cli, "merge", "999998", "999999"], cwd=REPO, env=run_env, capture_output=True, text=True)
    assert missing.returncode == 1 and "no person" in missing.stderr
