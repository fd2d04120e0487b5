"""The library's engine over an Immich library: PDQ duplicates as Immich duplicate groups, zero-shot tags as
Immich tags (``python -m library immich sync-duplicates|sync-tags``).

Everything Immich sees changes through Immich's API, as the owner of ``LIBRARY_IMMICH_API_KEY`` (so Immich's
own permission checks apply): assets are listed with ``POST /api/search/metadata``, previews read with
``GET /api/assets/{id}/thumbnail?size=preview``, groups written with ``PUT /api/assets {ids, duplicateId}``
(what Immich's "Review duplicates" page itself sends to clear a group), tags with ``POST /api/tags`` and
``PUT /api/tags/assets``. What the bridge remembers (groups it proposed, its parent tag, assets it tagged)
lives in the db layer's schema in Immich's database (``db/immich_bridge.py``), never in Immich's tables.

Duplicate groups follow Immich's DuplicateService: per owner, images only, not trashed, not stacked,
visibility timeline or archive (what ``GET /api/duplicates`` shows). A PDQ pair whose assets already sit in
groups joins them: the largest existing group keeps its id and the others are merged into it, as Immich merges
CLIP groups. A pair the bridge once proposed together and Immich now shows ungrouped was resolved by the user
(kept or trashed in "Review duplicates"): it is never proposed again.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from uuid import UUID

import numpy as np
import psycopg

from ai_service.errors import CLIENT_ERRORS
from ai_service.imaging import ImageError, ImageTooLargeError
from ai_service.models.base import ModelError
from db import immich_bridge as records
from db.settings import DbSearchSettings
from gateway.search.credentials import Credential, CredentialKind
from gateway.search.immich import ImmichClient, ImmichError
from gateway.settings import ImmichSettings
from library import pdq
from library.inference import InferenceUnavailableError, LibraryInference
from library.settings import LibrarySettings
from library.tags import TextEmbeddings, vocabulary

log = logging.getLogger("library.immich")

# What Immich's duplicate list shows (DuplicateRepository.getAll: withDefaultVisibility).
GROUP_VISIBILITY = frozenset({"timeline", "archive"})
UPDATE_CHUNK = 500  # asset ids per PUT /api/assets (Immich chunks its own updates like this)
TAG_CHUNK = 50  # assets tagged per round of tag writes (progress survives a crash in between)
HASH_CHUNK = 200  # previews hashed per batch (hashes stored after each)
DEFAULT_PARENT = {"zh": "AI 标签", "en": "AI"}
_T = TypeVar("_T")


class BridgeConfigError(ValueError):
    """The bridge is not configured (message names the setting, never a value)."""


# ---- Immich access -----------------------------------------------------------------------------------------


def _client(settings: LibrarySettings) -> tuple[ImmichClient, Credential]:
    if not settings.immich_url:
        raise BridgeConfigError("LIBRARY_IMMICH_URL is not set")
    if settings.immich_api_key is None or not settings.immich_api_key.get_secret_value():
        raise BridgeConfigError("LIBRARY_IMMICH_API_KEY is not set")
    try:
        immich = ImmichSettings(
            url=settings.immich_url,
            timeout_s=settings.immich_timeout_s,
            max_connections=settings.immich_concurrency + 2,
            max_preview_bytes=settings.max_image_bytes,
            # A search page is ~2 KiB per asset (AssetResponseDto); 64 KiB each leaves room for long EXIF.
            max_response_bytes=max(4 * 1024 * 1024, settings.immich_page_size * 64 * 1024),
        )
    except ValueError:
        # Not the validation message: it would repeat the URL, which may carry a password.
        raise BridgeConfigError("LIBRARY_IMMICH_URL must be an http(s) URL, e.g. http://immich-server:2283") from None
    return ImmichClient(immich), Credential(CredentialKind.API_KEY, settings.immich_api_key.get_secret_value())


async def own_images(
    client: ImmichClient, credential: Credential, me: UUID, settings: LibrarySettings
) -> list[dict[str, Any]]:
    """The caller's own images that Immich would group (not trashed or stacked, timeline or archive), as
    Immich's search lists them (partners' photos in the caller's timeline are left out: Immich's duplicates
    are per owner)."""
    found: list[dict[str, Any]] = []
    page: int | None = 1
    while page is not None and len(found) < settings.immich_max_assets:
        body = {"page": page, "size": settings.immich_page_size, "type": "IMAGE", "withStacked": False}
        items, page = await client.search_assets(credential, body)
        if not items:
            break  # a "next page" with nothing on this one: never loop on it
        found += [
            item
            for item in items
            if item.get("ownerId") == str(me)
            and item.get("type") == "IMAGE"
            and item.get("visibility") in GROUP_VISIBILITY
            and not item.get("isTrashed")
        ]
    return found[: settings.immich_max_assets]


async def _bounded(limit: int, jobs: list[Callable[[], Awaitable[_T]]]) -> list[_T]:
    gate = asyncio.Semaphore(limit)

    async def run(job: Callable[[], Awaitable[_T]]) -> _T:
        async with gate:
            return await job()

    return list(await asyncio.gather(*(run(job) for job in jobs)))


async def _preview(client: ImmichClient, credential: Credential, asset_id: UUID) -> bytes | None:
    """The asset's preview as the caller; None when Immich has none (404: not generated yet) or no longer shows
    this asset (400). A 401/403 (the key lacks asset.view) stops the run: skipping every photo would hide it."""
    try:
        return await client.preview(credential, asset_id)
    except ImmichError as exc:
        if exc.status in (400, 404):
            log.info("asset %s: no preview from Immich (HTTP %s)", asset_id, exc.status)
            return None
        raise


# ---- duplicates --------------------------------------------------------------------------------------------


@dataclass
class DuplicateReport:
    assets: int = 0  # the user's images looked at
    hashed: int = 0
    skipped: int = 0  # no preview, or not a usable image
    pairs: int = 0  # PDQ pairs within the threshold
    pairs_resolved_before: int = 0  # pairs left alone: the user resolved them in Immich
    groups: list[dict[str, Any]] = field(default_factory=list)  # {"duplicateId", "assetIds", "updated"}

    def as_json(self) -> dict[str, Any]:
        return {
            "assets": self.assets,
            "hashed": self.hashed,
            "skipped": self.skipped,
            "pairs": self.pairs,
            "pairsResolvedBefore": self.pairs_resolved_before,
            "groupsWritten": sum(1 for g in self.groups if g["updated"]),
            "assetsUpdated": sum(len(g["updated"]) for g in self.groups),
            "groups": self.groups,
        }


Variants = list[tuple[str, int]]  # an asset's PDQ: (64 hex digits, quality) as given, then without a frame


def _hash_rows(hashes: dict[UUID, Variants], min_quality: int) -> tuple[list[UUID], np.ndarray, np.ndarray]:
    """(asset ids, one uint64x4 row per usable hash variant, the index of each row's asset)."""
    ids = list(hashes)
    rows: list[bytes] = []
    owners: list[int] = []
    for index, asset_id in enumerate(ids):
        for hash_hex, quality in hashes[asset_id]:
            if quality >= min_quality:  # featureless previews match everything flat: never matched
                rows.append(int(hash_hex, 16).to_bytes(32, "big"))
                owners.append(index)
    matrix = np.frombuffer(b"".join(rows), dtype=np.uint64).reshape(-1, 4) if rows else np.zeros((0, 4), np.uint64)
    return ids, matrix, np.asarray(owners, dtype=np.int64)


def near_pairs(hashes: dict[UUID, Variants], threshold: int, min_quality: int) -> list[tuple[UUID, UUID]]:
    """Asset pairs whose PDQ (as given, or without a uniform frame) is within ``threshold`` bits.

    Multi-index hashing: two hashes within t bits agree to within t // 16 bits on at least one of their sixteen
    16-bit chunks (pigeonhole), so only pairs sharing such a chunk value are compared in full; far fewer than all
    pairs (bench/bench_immich_bridge.py: 100 000 photos in ~20 s on 2 cores). Thresholds of 32 bits and more
    (two bits or more per chunk: many more probes) compare every pair instead."""
    ids, matrix, owners = _hash_rows(hashes, min_quality)
    radius = threshold // 16
    masks = [m for m in range(1 << 16) if m.bit_count() <= radius] if radius <= 1 else []
    if not masks:
        found = _pairs_by_scan(matrix, owners, threshold)
    else:
        found = _pairs_by_chunks(matrix, owners, threshold, np.asarray(masks, dtype=np.uint16))
    return [(ids[a], ids[b]) for a, b in sorted(found)]


def _owner_pairs(owners: np.ndarray, left: np.ndarray, right: np.ndarray) -> set[tuple[int, int]]:
    a, b = owners[left], owners[right]
    keep = a != b
    return {(int(x), int(y)) for x, y in zip(np.minimum(a, b)[keep], np.maximum(a, b)[keep], strict=True)}


def _pairs_by_chunks(matrix: np.ndarray, owners: np.ndarray, threshold: int, masks: np.ndarray) -> set[tuple[int, int]]:
    found: set[tuple[int, int]] = set()
    chunks = matrix.view(np.uint16).reshape(-1, 16)
    rows = np.arange(len(matrix))
    for c in range(16):
        column = chunks[:, c]
        order = np.argsort(column, kind="stable")
        ordered = column[order]
        for mask in masks:
            keys = column ^ mask
            low = np.searchsorted(ordered, keys, "left")
            counts = np.searchsorted(ordered, keys, "right") - low
            total = int(counts.sum())
            if total == 0:
                continue
            starts = np.cumsum(counts) - counts
            left = np.repeat(rows, counts)
            right = order[np.repeat(low, counts) + np.arange(total) - np.repeat(starts, counts)]
            distance = np.bitwise_count(matrix[left] ^ matrix[right]).sum(axis=1)
            close = distance <= threshold
            found |= _owner_pairs(owners, left[close], right[close])
    return found


def _pairs_by_scan(matrix: np.ndarray, owners: np.ndarray, threshold: int) -> set[tuple[int, int]]:
    """Every pair compared, 64 rows at a time (thresholds of 32 bits and more)."""
    found: set[tuple[int, int]] = set()
    for start in range(0, len(matrix), 64):
        block = matrix[start : start + 64]
        distance = np.bitwise_count(block[:, None, :] ^ matrix[None, :, :]).sum(axis=2)
        left, right = np.nonzero(distance <= threshold)
        found |= _owner_pairs(owners, left + start, right)
    return found


class _Components:
    def __init__(self) -> None:
        self.parent: dict[UUID, UUID] = {}

    def find(self, x: UUID) -> UUID:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: UUID, b: UUID) -> None:
        self.parent[self.find(a)] = self.find(b)


@dataclass(frozen=True)
class GroupPlan:
    duplicate_id: UUID
    members: list[UUID]  # the whole group after the write
    update: list[UUID]  # the assets whose duplicateId changes
    proposed: list[UUID]  # the assets the bridge groups for their PDQ (recorded)


def plan_groups(
    current: dict[UUID, UUID | None],
    pairs: list[tuple[UUID, UUID]],
    proposed_before: dict[UUID, set[UUID]],
    new_id: Callable[[], UUID] = uuid.uuid4,
) -> tuple[list[GroupPlan], int]:
    """The groups to write, and how many pairs were left alone as decided by the user.

    ``current`` is every listed asset's duplicateId as Immich shows it now. A pair proposed together before
    and not in one group now was resolved by the user. Existing groups touched by a pair are merged (Immich's
    merge: the largest keeps its id)."""
    components = _Components()
    resolved = 0
    paired: set[UUID] = set()
    for a, b in pairs:
        together_now = current[a] is not None and current[a] == current[b]
        if proposed_before.get(a, set()) & proposed_before.get(b, set()) and not together_now:
            resolved += 1
            continue
        components.union(a, b)
        paired.update((a, b))
    by_group: dict[UUID, list[UUID]] = {}
    for asset_id, duplicate_id in current.items():
        if duplicate_id is not None:
            by_group.setdefault(duplicate_id, []).append(asset_id)
    for members in by_group.values():  # an existing group is one piece: joining one member joins all
        for other in members[1:]:
            components.union(members[0], other)
    pieces: dict[UUID, list[UUID]] = {}
    for asset_id in list(components.parent):
        pieces.setdefault(components.find(asset_id), []).append(asset_id)
    sizes = Counter(d for d in current.values() if d is not None)
    plans: list[GroupPlan] = []
    for members in pieces.values():
        proposed = sorted(m for m in members if m in paired)
        if not proposed:
            continue  # an Immich group no PDQ pair touches: left as it is
        existing = sorted({d for m in members if (d := current[m]) is not None}, key=lambda d: (-sizes[d], str(d)))
        target = existing[0] if existing else new_id()
        update = sorted(m for m in members if current[m] != target)
        plans.append(GroupPlan(target, sorted(members), update, proposed))
    plans.sort(key=lambda p: str(p.duplicate_id))
    return plans, resolved


async def hash_previews(
    client: ImmichClient,
    credential: Credential,
    conn: psycopg.Connection[Any],
    checksums: dict[UUID, str],
    settings: LibrarySettings,
) -> dict[UUID, Variants]:
    """PDQ of every asset's preview: from the cache while Immich's checksum is unchanged, else fetched and hashed
    (and cached). Assets without a usable preview are left out."""
    cached = records.cached_hashes(conn, checksums)

    async def one(asset_id: UUID) -> tuple[UUID, Variants | None]:
        data = await _preview(client, credential, asset_id)
        if data is None:
            return asset_id, None
        try:
            found = await asyncio.to_thread(pdq.hash_image, data, max_pixels=settings.max_image_pixels)
        except (ImageError, ImageTooLargeError) as exc:
            log.info("asset %s: preview not usable: %s", asset_id, exc)
            return asset_id, None
        return asset_id, [(result.hash_hex, result.quality) for _, result in found.variants]

    todo = [a for a in checksums if a not in cached]
    fresh: dict[UUID, Variants] = {}
    for start in range(0, len(todo), HASH_CHUNK):  # stored batch by batch: an interrupted run resumes here
        jobs = [lambda a=a: one(a) for a in todo[start : start + HASH_CHUNK]]  # type: ignore[misc]
        batch = {a: v for a, v in await _bounded(settings.immich_concurrency, jobs) if v is not None}
        records.store_hashes(conn, [(a, checksums[a], v) for a, v in batch.items()])
        fresh.update(batch)
        log.info(
            "previews hashed: %d of %d (%d cached before)", min(start + HASH_CHUNK, len(todo)), len(todo), len(cached)
        )
    return {**cached, **fresh}


async def sync_duplicates(
    settings: LibrarySettings, db_settings: DbSearchSettings, *, threshold: int | None = None, dry_run: bool = False
) -> DuplicateReport:
    client, credential = _client(settings)
    await client.start()
    try:
        with records.connect_bridge(db_settings) as conn:  # first: a database problem shows before any work
            me = (await client.me(credential)).id
            assets = await own_images(client, credential, me, settings)
            current = {UUID(a["id"]): UUID(a["duplicateId"]) if a.get("duplicateId") else None for a in assets}
            report = DuplicateReport(assets=len(assets))
            checksums = {UUID(a["id"]): str(a.get("checksum", "")) for a in assets}
            hashes = await hash_previews(client, credential, conn, checksums, settings)
            report.hashed, report.skipped = len(hashes), len(current) - len(hashes)
            limit = settings.immich_duplicate_threshold if threshold is None else threshold
            pairs = near_pairs(hashes, limit, settings.pdq_min_quality)
            report.pairs = len(pairs)
            plans, report.pairs_resolved_before = plan_groups(current, pairs, records.proposed_groups(conn, me))
            for plan in plans:
                if not dry_run:
                    await _write_group(client, credential, conn, me, plan)
                report.groups.append(
                    {
                        "duplicateId": str(plan.duplicate_id),
                        "assetIds": [str(a) for a in plan.members],
                        "updated": [str(a) for a in plan.update],
                    }
                )
        return report
    finally:
        await client.close()


async def _write_group(
    client: ImmichClient, credential: Credential, conn: psycopg.Connection[Any], me: UUID, plan: GroupPlan
) -> None:
    for start in range(0, len(plan.update), UPDATE_CHUNK):
        chunk = plan.update[start : start + UPDATE_CHUNK]
        await client.update_assets(credential, chunk, {"duplicateId": str(plan.duplicate_id)})
    records.record_group(conn, me, plan.duplicate_id, plan.proposed)
    log.info("duplicate group %s: %d assets, %d updated", plan.duplicate_id, len(plan.members), len(plan.update))


# ---- tags --------------------------------------------------------------------------------------------------


@dataclass
class TagReport:
    parent_id: str = ""
    parent_value: str = ""
    assets: int = 0  # the user's images not tagged by the bridge before
    tagged: int = 0
    skipped: int = 0
    links_added: int = 0  # (tag, asset) pairs Immich did not have yet
    tags_created: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "parentId": self.parent_id,
            "parentValue": self.parent_value,
            "assets": self.assets,
            "tagged": self.tagged,
            "skipped": self.skipped,
            "linksAdded": self.links_added,
            "tagsCreated": self.tags_created,
        }


def tag_name(key: str, language: str) -> str:
    """The Immich tag name of a vocabulary entry in ``language``; '/' separates levels in Immich's tag values."""
    entry = {t.key: t for t in vocabulary()}[key]
    return (entry.zh if language == "zh" else entry.en).replace("/", "-").strip()


def choose_tags(keys: list[str], matrix: np.ndarray, vector: np.ndarray, top_k: int, min_score: float) -> list[str]:
    """The top ``top_k`` vocabulary keys by cosine similarity at or above ``min_score`` (library/tags.py's rule)."""
    scores = matrix @ np.asarray(vector, dtype=np.float64)
    return [keys[i] for i in np.argsort(-scores)[:top_k] if scores[i] >= min_score]


class _TagTree:
    """The parent tag (found by the id we stored; created when missing) and its children, by name."""

    def __init__(self, client: ImmichClient, credential: Credential, report: TagReport) -> None:
        self.client, self.credential, self.report = client, credential, report
        self.parent: dict[str, Any] = {}
        self.children: dict[str, UUID] = {}

    async def load(self, conn: psycopg.Connection[Any], me: UUID, name: str) -> None:
        stored = records.tag_parent(conn, me)
        found = await self.client.tag(self.credential, stored) if stored else None
        if found is None:
            found = await self._create(name, None)
            records.set_tag_parent(conn, me, UUID(found["id"]))
        self.parent = found
        self.report.parent_id, self.report.parent_value = str(found["id"]), str(found.get("value", ""))
        for tag in await self.client.tags(self.credential):
            if tag.get("parentId") == found["id"]:
                self.children[str(tag.get("name"))] = UUID(tag["id"])

    async def child(self, name: str) -> UUID:
        if name not in self.children:
            self.children[name] = UUID((await self._create(name, UUID(self.parent["id"])))["id"])
        return self.children[name]

    async def _create(self, name: str, parent_id: UUID | None) -> dict[str, Any]:
        try:
            created = await self.client.create_tag(self.credential, name, parent_id)
            self.report.tags_created.append(str(created.get("value", name)))
            return created
        except ImmichError as exc:
            if exc.status != 400:
                raise
            # "A tag with that name already exists" (made by the user, or by a run that lost its record): adopt it.
            value = f"{self.parent['value']}/{name}" if parent_id is not None else name
            for tag in await self.client.tags(self.credential):
                if tag.get("value") == value:
                    return tag
            raise


async def sync_tags(
    settings: LibrarySettings,
    db_settings: DbSearchSettings,
    *,
    inference: LibraryInference | None = None,
    retag: bool = False,
) -> TagReport:
    if not settings.clip_model:
        raise BridgeConfigError("LIBRARY_CLIP_MODEL is not set (tags come from the CLIP image embedding)")
    client, credential = _client(settings)
    engine = inference or LibraryInference(settings)
    language = settings.immich_tag_language
    report = TagReport()
    await client.start()
    try:
        me = (await client.me(credential)).id
        with records.connect_bridge(db_settings) as conn:
            tree = _TagTree(client, credential, report)
            await tree.load(conn, me, settings.immich_tag_parent or DEFAULT_PARENT[language])
            done = set() if retag else records.tagged_assets(conn, me)
            todo = [UUID(a["id"]) for a in await own_images(client, credential, me, settings)]
            todo = [a for a in todo if a not in done]
            report.assets = len(todo)
            keys, matrix = await asyncio.to_thread(TextEmbeddings(settings, engine).matrix, conn)
            for start in range(0, len(todo), TAG_CHUNK):
                log.info("tagging: %d of %d images", start, len(todo))
                await _tag_chunk(
                    client,
                    credential,
                    conn,
                    me,
                    todo[start : start + TAG_CHUNK],
                    tree,
                    engine,
                    (keys, matrix),
                    settings,
                    report,
                )
        return report
    except (InferenceUnavailableError, ModelError) as exc:
        raise BridgeConfigError(f"CLIP model {settings.clip_model}: {exc}") from None
    finally:
        await client.close()
        if inference is None:
            engine.close()


async def _tag_chunk(
    client: ImmichClient,
    credential: Credential,
    conn: psycopg.Connection[Any],
    me: UUID,
    asset_ids: list[UUID],
    tree: _TagTree,
    engine: LibraryInference,
    texts: tuple[list[str], np.ndarray],
    settings: LibrarySettings,
    report: TagReport,
) -> None:
    async def one(asset_id: UUID) -> tuple[UUID, list[str] | None]:
        data = await _preview(client, credential, asset_id)
        if data is None:
            return asset_id, None
        try:
            vector = await asyncio.to_thread(engine.clip_image, data)
        except (ImageError, ImageTooLargeError, *CLIENT_ERRORS) as exc:  # this preview only (the service's 4xx)
            log.info("asset %s: preview not usable: %s", asset_id, exc)
            return asset_id, None
        return asset_id, choose_tags(*texts, vector, settings.tags_top_k, settings.tags_min_score)

    jobs = [lambda a=a: one(a) for a in asset_ids]  # type: ignore[misc]
    chosen = await _bounded(settings.immich_concurrency, jobs)
    by_tag: dict[str, list[UUID]] = {}
    for asset_id, keys in chosen:
        for key in keys or []:
            by_tag.setdefault(tag_name(key, settings.immich_tag_language), []).append(asset_id)
    for name, assets in sorted(by_tag.items()):
        report.links_added += await client.tag_assets(credential, [await tree.child(name)], assets)
    for asset_id, keys in chosen:
        if keys is None:
            report.skipped += 1
            continue
        records.record_tagged(conn, me, asset_id, str(settings.clip_model), keys)
        report.tagged += 1
