"""The library's engine over an Immich library (``python -m library immich sync-duplicates|sync-tags``).

Against the Immich API stub (tests/immich_stub.py: Immich 3.1's endpoints and permission rules, answering from a
real PostgreSQL loaded with Immich 3.1's tables): previews of real photos (scikit-image's samples) and re-encoded,
resized copies of them. Checked where Immich itself reads: ``asset."duplicateId"`` and ``GET /api/duplicates``
(Immich's own query, singleton clean-up included), ``tag``/``tag_asset`` and ``GET /api/tags``. Tags use the tiny
random-weight CLIP test model: which tags a photo gets means nothing, the plumbing is what is tested.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest
from PIL import Image

from db.migrate import migrate
from db.settings import DbSearchSettings
from db.testing import add_partner, fresh_database, insert_asset, insert_user, load_immich_schema
from library import immich_bridge
from library.settings import LibrarySettings
from library.tags import vocabulary
from tests.immich_stub import ImmichStub, StubUser
from tests.library_support import photo
from tests.servers import REPO

TAG_MODEL = "test-cn-clip-tiny"


def jpeg(image: Image.Image, *, width: int, quality: int) -> bytes:
    height = round(image.height * width / image.width)
    out = io.BytesIO()
    image.resize((width, height), Image.Resampling.LANCZOS).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def preview(name: str) -> bytes:
    return jpeg(photo(name), width=480, quality=90)


def near_copy(name: str) -> bytes:
    """Another upload of the same picture: smaller and re-encoded hard (what a messenger makes of a photo)."""
    return jpeg(photo(name), width=300, quality=45)


@dataclass
class World:
    uri: str
    stub: ImmichStub
    alice: StubUser
    bob: StubUser
    ids: dict[str, UUID] = field(default_factory=dict)

    def add(self, conn: psycopg.Connection[Any], name: str, owner: StubUser, data: bytes | None, **kw: Any) -> UUID:
        asset_id = insert_asset(
            conn, owner.id, exif={}, taken_at=datetime(2024, 1, 1 + len(self.ids), tzinfo=UTC), **kw
        )
        self.ids[name] = asset_id
        if data is not None:
            self.stub.previews[asset_id] = data
        return asset_id

    def duplicate_ids(self) -> dict[str, UUID | None]:
        with psycopg.connect(self.uri, autocommit=True) as conn:
            rows = dict(conn.execute('SELECT id, "duplicateId" FROM asset').fetchall())
        return {name: rows[asset_id] for name, asset_id in self.ids.items()}

    def immich_duplicates(self, user: StubUser) -> list[set[str]]:
        """The groups Immich's "Review duplicates" page shows this user (GET /api/duplicates)."""
        reply = httpx.get(f"{self.stub.url}/api/duplicates", headers=user.key_header, timeout=30)
        assert reply.status_code == 200, reply.text
        names = {str(v): k for k, v in self.ids.items()}
        return sorted(({names[a["id"]] for a in g["assets"]} for g in reply.json()), key=sorted)


G_CLIP = UUID("0b4c0f36-2a29-4c55-9d47-5d2b1c0a0001")  # Immich's CLIP groups, there before the bridge
G_SMALL = UUID("0b4c0f36-2a29-4c55-9d47-5d2b1c0a0002")
G_LARGE = UUID("0b4c0f36-2a29-4c55-9d47-5d2b1c0a0003")


@pytest.fixture(scope="module")
def world(postgres_uri: str) -> Iterator[World]:
    with fresh_database(postgres_uri, prefix="zh_bridge") as uri:
        load_immich_schema(uri)
        migrate(DbSearchSettings(url=uri))
        stub = ImmichStub(uri)
        with psycopg.connect(uri, autocommit=True) as conn:
            alice = stub.add_user(StubUser(insert_user(conn, name="alice"), email="alice@example.test"))
            bob = stub.add_user(StubUser(insert_user(conn, name="bob"), email="bob@example.test"))
            add_partner(conn, bob.id, alice.id, in_timeline=True)  # alice sees bob's photos; they stay bob's
            w = World(uri, stub, alice, bob)
            w.add(conn, "coffee", alice, preview("coffee"))
            w.add(conn, "coffee_copy", alice, near_copy("coffee"))
            w.add(conn, "coffee_trashed", alice, near_copy("coffee"), deleted_at=datetime(2024, 6, 1, tzinfo=UTC))
            w.add(conn, "coffee_bobs", bob, preview("coffee"))  # the same picture in another user's library
            w.add(conn, "astronaut", alice, preview("astronaut"))
            w.add(conn, "astronaut_copy", alice, near_copy("astronaut"))
            w.add(conn, "clip_mate", alice, preview("hubble_deep_field"))  # in a CLIP group with astronaut_copy
            w.add(conn, "rocket", alice, preview("rocket"))
            w.add(conn, "rocket_copy", alice, near_copy("rocket"))
            w.add(conn, "small_mate", alice, preview("immunohistochemistry"))
            w.add(conn, "large_mate", alice, preview("chelsea"))
            w.add(conn, "large_mate2", alice, preview("retina"))
            w.add(conn, "lonely", alice, preview("colorwheel"))
            w.add(conn, "no_preview", alice, None)
            for names, group in (
                (("astronaut_copy", "clip_mate"), G_CLIP),
                (("rocket", "small_mate"), G_SMALL),
                (("rocket_copy", "large_mate", "large_mate2"), G_LARGE),
            ):
                conn.execute(
                    'UPDATE asset SET "duplicateId" = %s WHERE id = ANY(%s)', [group, [w.ids[n] for n in names]]
                )
        with stub.running():
            yield w


def bridge_settings(world: World, user: StubUser, **extra: Any) -> LibrarySettings:
    return LibrarySettings(immich_url=world.stub.url, immich_api_key=user.api_key, immich_page_size=3, **extra)


def run_duplicates(world: World, user: StubUser, **kw: Any) -> dict[str, Any]:
    report = asyncio.run(
        immich_bridge.sync_duplicates(bridge_settings(world, user), DbSearchSettings(url=world.uri), **kw)
    )
    return report.as_json()


def test_pdq_duplicates_become_immich_groups_joining_immichs_own(world: World) -> None:
    before = world.duplicate_ids()
    dry = run_duplicates(world, world.alice, dry_run=True)
    assert world.duplicate_ids() == before and dry["groups"]  # a dry run writes nothing
    report = run_duplicates(world, world.alice)
    ids = world.duplicate_ids()
    # Listed through Immich's search in pages of 3: the user's own images, not trashed, no partner's.
    assert report["assets"] == 12 and report["hashed"] == 11 and report["skipped"] == 1  # no_preview
    # A new group for the copies nobody had grouped.
    assert ids["coffee"] is not None and ids["coffee"] == ids["coffee_copy"]
    assert ids["coffee"] not in (G_CLIP, G_SMALL, G_LARGE)
    # Joined, not overwritten: the pair goes into Immich's CLIP group, whose other member stays in it.
    assert ids["astronaut"] == ids["astronaut_copy"] == ids["clip_mate"] == G_CLIP
    # Two existing groups bridged by one pair merge as Immich merges them: the larger one keeps its id.
    assert {ids[n] for n in ("rocket", "rocket_copy", "small_mate", "large_mate", "large_mate2")} == {G_LARGE}
    # Untouched: a photo without a near copy, the trash, and another user's identical photo.
    assert ids["lonely"] is None and ids["coffee_trashed"] is None and ids["coffee_bobs"] is None
    # Immich's own page shows exactly these groups.
    assert world.immich_duplicates(world.alice) == [
        {"astronaut", "astronaut_copy", "clip_mate"},
        {"coffee", "coffee_copy"},
        {"large_mate", "large_mate2", "rocket", "rocket_copy", "small_mate"},
    ]
    assert world.immich_duplicates(world.bob) == []
    # Every write went through Immich's API as alice, for alice's assets only.
    alices = {str(a) for n, a in world.ids.items() if n != "coffee_bobs"}
    for call in world.stub.recorded("/api/assets", "PUT"):
        assert call.headers["x-api-key"] == world.alice.api_key
        assert set(json.loads(call.body)["ids"]) <= alices
    # A second run changes nothing, and fetches no preview it hashed before (only the one Immich lacks).
    fetched = {r.path for r in world.stub.requests if r.path.endswith("/thumbnail")}
    count = len(world.stub.requests)
    again = run_duplicates(world, world.alice)
    assert again["assetsUpdated"] == 0 and world.duplicate_ids() == ids
    assert {r.path for r in world.stub.requests[count:] if r.path.endswith("/thumbnail")} == {
        f"/api/assets/{world.ids['no_preview']}/thumbnail"
    }
    assert len(fetched) == 12


def test_a_group_the_user_resolved_is_not_recreated(world: World) -> None:
    run_duplicates(world, world.alice)
    group = world.duplicate_ids()["coffee"]
    assert group is not None
    # In "Review duplicates" the user keeps both photos: Immich clears the group's duplicateId.
    reply = httpx.delete(f"{world.stub.url}/api/duplicates/{group}", headers=world.alice.key_header, timeout=30)
    assert reply.status_code == 204
    report = run_duplicates(world, world.alice)
    ids = world.duplicate_ids()
    assert ids["coffee"] is None and ids["coffee_copy"] is None
    assert report["pairsResolvedBefore"] >= 1 and report["assetsUpdated"] == 0
    assert {"coffee", "coffee_copy"} not in world.immich_duplicates(world.alice)


def test_a_key_without_asset_update_writes_nothing(world: World) -> None:
    key = world.stub.add_api_key(world.alice, "asset.read", "asset.view", "user.read")
    settings = LibrarySettings(immich_url=world.stub.url, immich_api_key=key)
    with psycopg.connect(world.uri, autocommit=True) as conn:
        extra = insert_asset(conn, world.alice.id, exif={})
    world.stub.previews[extra] = near_copy("colorwheel")  # "lonely" now has a near copy
    try:
        with pytest.raises(immich_bridge.ImmichError) as refused:
            asyncio.run(immich_bridge.sync_duplicates(settings, DbSearchSettings(url=world.uri)))
        assert refused.value.status == 403 and "asset.update" in refused.value.message
        assert world.duplicate_ids()["lonely"] is None
    finally:
        with psycopg.connect(world.uri, autocommit=True) as conn:
            conn.execute("DELETE FROM asset WHERE id = %s", [extra])


def test_pdq_pairing_finds_exactly_what_comparing_every_pair_finds() -> None:
    """near_pairs's chunk index (pigeonhole on 16-bit chunks) against the plain all-pairs comparison."""
    rng = random.Random(7)
    hashes: dict[UUID, list[tuple[str, int]]] = {}
    for _ in range(400):
        base = rng.getrandbits(256)
        hashes[uuid4()] = [(f"{base:064x}", 100)]
        for bits in (rng.randint(0, 40), rng.randint(25, 33)):  # near copies, some at the edge of the threshold
            flipped = base
            for position in rng.sample(range(256), bits):
                flipped ^= 1 << position
            hashes[uuid4()] = [(f"{rng.getrandbits(256):064x}", 100), (f"{flipped:064x}", 60)]
    hashes[uuid4()] = [(f"{0:064x}", 10)]  # a flat preview: low quality, never matched
    hashes[uuid4()] = [(f"{0:064x}", 10)]
    for threshold in (0, 15, 31, 40):
        ids, matrix, owners = immich_bridge._hash_rows(hashes, 50)
        every = {(ids[a], ids[b]) for a, b in immich_bridge._pairs_by_scan(matrix, owners, threshold)}
        found = immich_bridge.near_pairs(hashes, threshold, 50)
        assert set(found) == every and len(found) == len(every)
        assert threshold < 31 or len(found) > 300


def test_a_key_without_asset_view_stops_instead_of_skipping_every_photo(world: World) -> None:
    key = world.stub.add_api_key(world.alice, "asset.read", "asset.update", "user.read")
    settings = LibrarySettings(immich_url=world.stub.url, immich_api_key=key)
    with psycopg.connect(world.uri, autocommit=True) as conn:
        extra = insert_asset(conn, world.alice.id, exif={})  # not hashed yet: its preview must be fetched
    world.stub.previews[extra] = near_copy("colorwheel")
    try:
        with pytest.raises(immich_bridge.ImmichError) as refused:
            asyncio.run(immich_bridge.sync_duplicates(settings, DbSearchSettings(url=world.uri)))
        assert refused.value.status == 403 and "asset.view" in refused.value.message
    finally:
        with psycopg.connect(world.uri, autocommit=True) as conn:
            conn.execute("DELETE FROM asset WHERE id = %s", [extra])


def test_cli_never_shows_the_key(world: World) -> None:
    env = {
        **os.environ,
        "LIBRARY_IMMICH_URL": world.stub.url,
        "LIBRARY_IMMICH_API_KEY": world.alice.api_key,
        "DB_SEARCH_URL": world.uri,
    }
    done = subprocess.run(
        [sys.executable, "-m", "library", "immich", "sync-duplicates", "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["assetsUpdated"] == 0
    assert world.alice.api_key not in done.stdout + done.stderr
    unset = subprocess.run(
        [sys.executable, "-m", "library", "immich", "sync-duplicates"],
        cwd=REPO,
        env={**env, "LIBRARY_IMMICH_API_KEY": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert unset.returncode == 2 and "LIBRARY_IMMICH_API_KEY is not set" in unset.stderr


# ---- tags ----------------------------------------------------------------------------------------------------


def immich_tags(world: World, user: StubUser) -> list[dict[str, Any]]:
    reply = httpx.get(f"{world.stub.url}/api/tags", headers=user.key_header, timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


def tag_links(world: World) -> dict[UUID, set[UUID]]:
    with psycopg.connect(world.uri, autocommit=True) as conn:
        found: dict[UUID, set[UUID]] = {}
        for asset_id, tag_id in conn.execute('SELECT "assetId", "tagId" FROM tag_asset'):
            found.setdefault(asset_id, set()).add(tag_id)
    return found


def run_tags(world: World, user: StubUser, **extra: Any) -> dict[str, Any]:
    settings = bridge_settings(world, user, clip_model=TAG_MODEL, tags_top_k=3, tags_min_score=-1, **extra)
    return asyncio.run(immich_bridge.sync_tags(settings, DbSearchSettings(url=world.uri))).as_json()


@pytest.fixture
def models(clip_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AI_SERVICE_MODEL_DIR", str(clip_model_dir))


@pytest.mark.usefixtures("models")
def test_tags_become_immich_tags_under_a_parent_the_user_may_rename(world: World) -> None:
    report = run_tags(world, world.alice)
    tags = immich_tags(world, world.alice)
    parents = [t for t in tags if "parentId" not in t]
    assert [p["value"] for p in parents] == ["AI 标签"] and report["parentValue"] == "AI 标签"
    parent = parents[0]
    children = {UUID(t["id"]): t for t in tags if t.get("parentId") == parent["id"]}
    assert len(children) == len(tags) - 1  # every other tag is a child of the parent
    chinese = {t.zh for t in vocabulary()}
    assert all(t["name"] in chinese and t["value"] == f"AI 标签/{t['name']}" for t in children.values())
    links = tag_links(world)
    alices = [a for n, a in world.ids.items() if n not in ("coffee_bobs", "coffee_trashed", "no_preview")]
    assert report["tagged"] == len(alices) == report["assets"] - 1  # no_preview: nothing to look at
    for asset_id in alices:
        assert len(links[asset_id]) == 3 and links[asset_id] <= set(children)  # top 3 (min score -1)
    assert world.ids["coffee_bobs"] not in links and world.ids["coffee_trashed"] not in links
    assert report["linksAdded"] == 3 * len(alices)

    # A re-run adds nothing (and looks at nothing it tagged before).
    again = run_tags(world, world.alice)
    assert (again["tagged"], again["linksAdded"], again["tagsCreated"]) == (0, 0, [])
    assert tag_links(world) == links and len(immich_tags(world, world.alice)) == len(tags)

    # The user renames the parent (by its row: Immich 3.1's API only changes a tag's colour) and a new photo
    # arrives: the parent is found by its id, not its name, and no second "AI 标签" appears.
    with psycopg.connect(world.uri, autocommit=True) as conn:
        conn.execute(
            "UPDATE tag SET value = regexp_replace(value, '^AI 标签', '我的 AI') WHERE id IN "
            "(SELECT id_descendant FROM tag_closure WHERE id_ancestor = %s)",
            [parent["id"]],
        )
        fresh = insert_asset(conn, world.alice.id, exif={})
    world.stub.previews[fresh] = preview("coffee")
    renamed = run_tags(world, world.alice)
    assert renamed["parentId"] == parent["id"] and renamed["parentValue"] == "我的 AI"
    assert renamed["tagged"] == 1 and renamed["linksAdded"] == 3
    after = immich_tags(world, world.alice)
    assert [t["value"] for t in after if "parentId" not in t] == ["我的 AI"]
    assert all(t["value"].startswith("我的 AI/") for t in after if "parentId" in t)
    assert tag_links(world)[fresh] <= {UUID(t["id"]) for t in after if t.get("parentId") == parent["id"]}


@pytest.mark.usefixtures("models")
def test_english_tags_for_an_english_speaking_user(world: World) -> None:
    report = run_tags(world, world.bob, immich_tag_language="en")
    tags = immich_tags(world, world.bob)
    english = {t.en.replace("/", "-") for t in vocabulary()}
    assert report["parentValue"] == "AI" and [t["value"] for t in tags if "parentId" not in t] == ["AI"]
    assert {t["name"] for t in tags if "parentId" in t} <= english
    assert report["tagged"] == 1  # bob's one photo
    assert len(tag_links(world)[world.ids["coffee_bobs"]]) == 3


@pytest.mark.usefixtures("models")
def test_tags_need_a_clip_model(world: World) -> None:
    with pytest.raises(immich_bridge.BridgeConfigError, match="LIBRARY_CLIP_MODEL"):
        asyncio.run(immich_bridge.sync_tags(bridge_settings(world, world.alice), DbSearchSettings(url=world.uri)))
    missing = bridge_settings(world, world.alice, clip_model="no-such-clip-model", immich_tag_language="en")
    with pytest.raises(immich_bridge.BridgeConfigError, match="CLIP model no-such-clip-model"):
        asyncio.run(immich_bridge.sync_tags(missing, DbSearchSettings(url=world.uri), retag=True))


@pytest.mark.usefixtures("models")
def test_a_parent_tag_deleted_in_immich_is_made_again(world: World) -> None:
    with psycopg.connect(world.uri, autocommit=True) as conn:
        carol = world.stub.add_user(StubUser(insert_user(conn, name="carol"), email="carol@example.test"))
        photo_id = insert_asset(conn, carol.id, exif={})
    world.stub.previews[photo_id] = preview("rocket")
    first = run_tags(world, carol)
    with psycopg.connect(world.uri, autocommit=True) as conn:  # the user deletes the tag (and its children)
        conn.execute("DELETE FROM tag WHERE id = %s", [first["parentId"]])
    second = run_tags(world, carol, immich_tag_language="en")
    assert second["parentId"] != first["parentId"] and second["parentValue"] == "AI"
    assert second["tagged"] == 0  # the photo was tagged before: the user's deletion is respected
    third = asyncio.run(
        immich_bridge.sync_tags(
            bridge_settings(world, carol, clip_model=TAG_MODEL, tags_top_k=2, tags_min_score=-1),
            DbSearchSettings(url=world.uri),
            retag=True,  # unless asked to look again
        )
    ).as_json()
    assert third["parentId"] == second["parentId"] and third["tagged"] == 1 and third["linksAdded"] == 2
