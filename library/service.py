"""One library instance per process: the database, ingest, pipeline, inference and the queries the API and
CLI share. Keeps the routes thin and the logic testable without HTTP."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from library import blocklist, items, pdq, search, text
from library.db import Database
from library.filters import NO_FILTERS, ItemFilters
from library.inference import LibraryInference
from library.ingest import Ingestor, IngestTooLargeError
from library.pipeline import Pipeline, WorkerPool
from library.settings import LibrarySettings

log = logging.getLogger(__name__)

MatchType = Literal["pdq", "clip"]


class NotFoundError(LookupError):
    """No such item (HTTP 404)."""


class UnavailableError(RuntimeError):
    """The request needs something not configured here, e.g. CLIP without a model (HTTP 409)."""


@dataclass(frozen=True)
class Hit:
    item: items.Item
    distance: float
    match_type: str

    def as_dict(self) -> dict[str, Any]:
        it = self.item
        return {
            "id": it.id,
            "md5": it.md5,
            "sha256": it.sha256,
            "source": it.source,
            "location": it.location,
            "data_id": it.data_id,
            "remark": it.remark,
            "meta": it.meta,
            "width": it.width,
            "height": it.height,
            "format": it.format,
            "distance": self.distance,
            "match_type": self.match_type,
        }


class Library:
    def __init__(self, settings: LibrarySettings | None = None, *, migrate: bool = True) -> None:
        self.settings = settings or LibrarySettings()
        self.db = Database(self.settings)
        if migrate:
            self.db.migrate()
        self.inference = LibraryInference(self.settings)
        self.ingestor = Ingestor(self.db, self.settings)
        self.pipeline = Pipeline(self.db, self.settings, self.inference)
        self.pipeline.release_dead_claims()
        self.workers: WorkerPool | None = None

    @property
    def uses_celery(self) -> bool:
        return self.settings.broker_url is not None

    def start_workers(self, threads: int | None = None) -> None:
        """In-process worker threads; none when a Celery broker is configured (the workers run there)."""
        threads = self.settings.workers if threads is None else threads
        if threads > 0 and self.workers is None and not self.uses_celery:
            self.workers = WorkerPool(self.pipeline, threads)
            self.workers.start()

    def wake_workers(self, tasks: int = 1) -> None:
        """New steps were enqueued: wake the in-process workers, or start Celery drain tasks."""
        if self.uses_celery:
            from library.worker import enqueue

            enqueue(tasks)
        elif self.workers is not None:
            self.workers.wake()

    def close(self) -> None:
        if self.workers is not None:
            self.workers.stop()
            self.workers = None
        self.inference.close()
        self.db.close()

    # ---- queries ----------------------------------------------------------------------------------

    def default_match_type(self) -> MatchType:
        return "clip" if self.inference.clip_enabled else "pdq"

    def default_threshold(self, match_type: MatchType) -> float:
        return float(self.settings.pdq_threshold) if match_type == "pdq" else self.settings.clip_threshold

    def _limit(self, limit: int | None) -> int:
        return max(1, min(limit or 20, self.settings.search_max_limit))

    def _hits(self, matches: list[search.Match], match_type: str) -> list[Hit]:
        with self.db.conn() as conn:
            found = items.get_items(conn, [m.item_id for m in matches])
        return [Hit(found[m.item_id], m.distance, match_type) for m in matches if m.item_id in found]

    def search_image(
        self,
        data: bytes,
        match_type: MatchType,
        threshold: float | None,
        limit: int | None,
        filters: ItemFilters = NO_FILTERS,
    ) -> tuple[float, list[Hit]]:
        """Search with an image that is not stored. Raises ImageError / IngestTooLargeError."""
        if len(data) > self.settings.max_image_bytes:
            raise IngestTooLargeError(f"the image is {len(data)} bytes; the limit is {self.settings.max_image_bytes}")
        thr = self.default_threshold(match_type) if threshold is None else threshold
        if match_type == "pdq":
            query = pdq.hash_image(
                data, max_pixels=self.settings.max_image_pixels, min_side=self.settings.pdq_decode_min_side
            )
            with self.db.conn() as conn:
                matches = search.pdq_matches(
                    conn,
                    self.settings,
                    query.query_bits,
                    threshold=int(thr),
                    limit=self._limit(limit),
                    filters=filters,
                )
        else:
            vector = self._clip_image(data)
            with self.db.conn() as conn:
                matches = search.clip_matches(
                    conn,
                    vector,
                    str(self.settings.clip_model),
                    threshold=thr,
                    limit=self._limit(limit),
                    filters=filters,
                )
        return thr, self._hits(matches, match_type)

    def _clip_image(self, data: bytes) -> list[float]:
        if not self.inference.clip_enabled:
            raise UnavailableError("CLIP search needs a CLIP model (LIBRARY_CLIP_MODEL)")
        return [float(v) for v in self.inference.clip_image(data)]

    def search_item(
        self,
        item_id: int,
        match_type: MatchType,
        threshold: float | None,
        limit: int | None,
        filters: ItemFilters = NO_FILTERS,
    ) -> tuple[float, list[Hit]]:
        thr = self.default_threshold(match_type) if threshold is None else threshold
        with self.db.conn() as conn:
            if items.get_item(conn, item_id) is None:
                raise NotFoundError(f"no item {item_id}")
            if match_type == "pdq":
                hashes = search.item_dihedral(conn, item_id)
                if hashes is None:
                    raise UnavailableError(f"item {item_id} has no PDQ hash yet (its pdq step is not done)")
                matches = search.pdq_matches(
                    conn,
                    self.settings,
                    hashes,
                    threshold=int(thr),
                    limit=self._limit(limit),
                    exclude_item=item_id,
                    filters=filters,
                )
            else:
                if not self.inference.clip_enabled:
                    raise UnavailableError("CLIP search needs a CLIP model (LIBRARY_CLIP_MODEL)")
                vector = search.item_clip(conn, item_id, str(self.settings.clip_model))
                if vector is None:
                    raise UnavailableError(f"item {item_id} has no CLIP vector yet (its clip step is not done)")
                matches = search.clip_matches(
                    conn,
                    vector,
                    str(self.settings.clip_model),
                    threshold=thr,
                    limit=self._limit(limit),
                    exclude_item=item_id,
                    filters=filters,
                )
        return thr, self._hits(matches, match_type)

    def search_text(
        self,
        query: str,
        mode: Literal["ocr", "clip", "hybrid"],
        limit: int | None,
        filters: ItemFilters = NO_FILTERS,
    ) -> list[Hit]:
        """OCR full-text (the db layer's segmentation), CLIP text-to-image, or both fused by reciprocal rank."""
        limit = self._limit(limit)
        ranked: dict[str, list[search.Match]] = {}
        with self.db.conn() as conn:
            if mode in ("ocr", "hybrid"):
                ranked["ocr"] = [search.Match(i, -rank) for i, rank, _ in text.search_ocr(conn, query, limit, filters)]
            if mode in ("clip", "hybrid"):
                if not self.inference.clip_enabled:
                    if mode == "clip":
                        raise UnavailableError("CLIP text search needs a CLIP model (LIBRARY_CLIP_MODEL)")
                else:
                    vector = [float(v) for v in self.inference.clip_text(query)]
                    ranked["clip"] = search.clip_matches(
                        conn, vector, str(self.settings.clip_model), threshold=2.0, limit=limit, filters=filters
                    )
        if mode != "hybrid":
            return self._hits(ranked[mode], mode)
        fused: dict[int, float] = {}
        for matches in ranked.values():
            for rank, m in enumerate(matches):
                fused[m.item_id] = fused.get(m.item_id, 0.0) + 1.0 / (60 + rank + 1)
        order = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]
        return self._hits([search.Match(i, -score) for i, score in order], "hybrid")

    def duplicates(self, threshold: float | None, kind: MatchType = "pdq") -> list[list[dict[str, Any]]]:
        """Near-duplicate groups from the pairs recorded when items were hashed / embedded (within
        LIBRARY_PDQ_THRESHOLD bits, or LIBRARY_CLIP_DUPLICATE_THRESHOLD cosine distance); a smaller
        ``threshold`` narrows them, a larger one is refused (ValueError)."""
        recorded = float(self.settings.pdq_threshold) if kind == "pdq" else self.settings.clip_duplicate_threshold
        thr = recorded if threshold is None else threshold
        if thr > recorded:
            setting = "LIBRARY_PDQ_THRESHOLD" if kind == "pdq" else "LIBRARY_CLIP_DUPLICATE_THRESHOLD"
            raise ValueError(
                f"{kind} duplicate pairs are recorded within {setting}={recorded:g}; a threshold of {thr:g} needs "
                "a larger setting (and re-processing)"
            )
        if kind == "clip" and not self.inference.clip_enabled:
            raise UnavailableError("CLIP duplicates need a CLIP model (LIBRARY_CLIP_MODEL)")
        with self.db.conn() as conn:
            groups = search.duplicate_groups(conn, threshold=thr, kind=kind)
            found = items.get_items(conn, [i for g in groups for i, _ in g])
        return [[Hit(found[i], d, kind).as_dict() for i, d in g if i in found] for g in groups]

    def check_blocklist(self, data: bytes) -> blocklist.BlockMatch | None:
        """Check an image against the blocklist; the image is not stored anywhere."""
        if len(data) > self.settings.max_image_bytes:
            raise IngestTooLargeError(f"the image is {len(data)} bytes; the limit is {self.settings.max_image_bytes}")
        query = pdq.hash_image(
            data, max_pixels=self.settings.max_image_pixels, min_side=self.settings.pdq_decode_min_side
        )
        with self.db.conn() as conn:
            return blocklist.match_hashes(conn, self.settings, query.query_bits)

    def import_blocklist_text(self, content: str, source: str) -> blocklist.ImportReport:
        hashes, errors = pdq.parse_reference_hashes(content)
        with self.db.conn() as conn:
            report = blocklist.import_hashes(conn, self.settings, hashes, source)
        report.errors = errors
        return report

    def import_blocklist_images(self, images: list[tuple[str, bytes]]) -> blocklist.ImportReport:
        """Hash reference images (never stored) and add their PDQ hashes to the blocklist."""
        hashes: list[pdq.ReferenceHash] = []
        errors: list[str] = []
        for name, data in images:
            try:
                # Reference images are always decoded in full: their hashes must be ThreatExchange's.
                result = pdq.hash_image(data, max_pixels=self.settings.max_image_pixels)
            except ValueError as exc:
                errors.append(f"{name}: {exc}")
                continue
            if result.plain.quality < self.settings.pdq_min_quality:
                errors.append(f"{name}: PDQ quality {result.plain.quality} is below LIBRARY_PDQ_MIN_QUALITY; not added")
                continue
            hashes.append(pdq.ReferenceHash(result.plain.hash_hex, result.plain.quality, name))
        with self.db.conn() as conn:
            report = blocklist.import_hashes(conn, self.settings, hashes, "images")
        report.errors = errors
        return report
