"""One library instance per process: the database, ingest, pipeline, inference and the queries the API and
CLI share. Keeps the routes thin and the logic testable without HTTP."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from psycopg import sql

from library import blocklist, items, pdq, search, text, video
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
    t: float | None = None  # a video matched by one image: time of the matching keyframe (seconds)
    t_start: float | None = None  # a video matched by a clip or GIF: the span it shows
    t_end: float | None = None

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
            "media": it.media,
            "duration_s": it.duration_s,
            "t": self.t,
            "t_start": self.t_start,
            "t_end": self.t_end,
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
            from library.celery_app import enqueue  # only with a broker: Celery is an optional extra

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
        """Search with an image (or a video clip / GIF) that is not stored. Raises ImageError /
        IngestTooLargeError."""
        return self._search_image(data, match_type, threshold, limit, filters)

    def _keep(self, hits: list[Hit], filters: ItemFilters) -> list[Hit]:
        """The hits that pass ``filters``, for results whose query could not apply them in SQL (video frames,
        clip votes); the others are filtered where they are ranked."""
        if filters == NO_FILTERS or not hits:
            return hits
        clause, params = filters.clause(sql.SQL("x.id"))
        query = sql.SQL("SELECT x.id FROM unnest(%s::bigint[]) AS x(id) WHERE {}").format(clause)
        with self.db.conn() as conn:
            kept = {int(r[0]) for r in conn.execute(query, [[h.item.id for h in hits], *params])}
        return [h for h in hits if h.item.id in kept]

    def _search_image(
        self,
        data: bytes,
        match_type: MatchType,
        threshold: float | None,
        limit: int | None,
        filters: ItemFilters,
    ) -> tuple[float, list[Hit]]:
        if len(data) > self.settings.max_image_bytes:
            raise IngestTooLargeError(f"the image is {len(data)} bytes; the limit is {self.settings.max_image_bytes}")
        thr = self.default_threshold(match_type) if threshold is None else threshold
        if self.settings.video_enabled and (video.looks_like_video(data) or video.is_animated_image(data)):
            # A clip or GIF: its frames vote by PDQ whatever match_type says (CLIP per query frame would
            # cost a model call per frame for little gain on a copy of the same footage).
            pdq_thr = self.settings.pdq_threshold if match_type != "pdq" or threshold is None else int(thr)
            return float(pdq_thr), self._keep(self._search_clip_query(data, pdq_thr, self._limit(limit)), filters)
        limit = self._limit(limit)
        if match_type == "pdq":
            query = pdq.hash_image(
                data, max_pixels=self.settings.max_image_pixels, min_side=self.settings.pdq_decode_min_side
            )
            frame_bits = video.image_query_bits(data, self.settings) if self.settings.video_enabled else []
            with self.db.conn() as conn:
                matches = search.pdq_matches(
                    conn, self.settings, query.query_bits, threshold=int(thr), limit=limit, filters=filters
                )
                frames = search.video_frame_matches(conn, self.settings, [frame_bits], threshold=int(thr))
        else:
            vector = self._clip_image(data)
            model = str(self.settings.clip_model)
            with self.db.conn() as conn:
                matches = search.clip_matches(conn, vector, model, threshold=thr, limit=limit, filters=filters)
                frames = search.video_clip_matches(conn, vector, model, threshold=thr, limit=limit)
        hits = self._hits(matches, match_type) + self._keep(self._frame_hits(frames, match_type), filters)
        hits.sort(key=lambda h: (h.distance, h.item.id))
        return thr, hits[:limit]

    def _frame_hits(self, frames: list[search.FrameHit], match_type: str) -> list[Hit]:
        """One hit per video (its best keyframe) for a single-image query."""
        best: dict[int, search.FrameHit] = {}
        for f in frames:
            if f.item_id not in best or (f.distance, f.t) < (best[f.item_id].distance, best[f.item_id].t):
                best[f.item_id] = f
        with self.db.conn() as conn:
            found = items.get_items(conn, list(best))
        return [Hit(found[i], f.distance, match_type, t=f.t) for i, f in best.items() if i in found]

    def _search_clip_query(self, data: bytes, threshold: int, limit: int) -> list[Hit]:
        """Videos a query clip or GIF was cut from: every sampled query frame is looked up, and per video
        the frames that agree on one time offset vote for the span (library.video.vote)."""
        sampled = video.query_frames(data, self.settings)
        with self.db.conn() as conn:
            frames = search.video_frame_matches(
                conn, self.settings, [h.query_bits for _, h in sampled], threshold=threshold
            )
        per_video: dict[int, list[video.FrameMatch]] = {}
        for f in frames:
            per_video.setdefault(f.item_id, []).append(video.FrameMatch(sampled[f.query][0], f.t, f.distance))
        start, end = sampled[0][0], sampled[-1][0]
        window = self.settings.video_keyframe_interval_s + 1.0
        spans = {i: video.vote(m, start, end, window) for i, m in per_video.items()}
        ranked = sorted(
            ((i, s) for i, s in spans.items() if s is not None), key=lambda kv: (-kv[1].votes, kv[1].distance, kv[0])
        )[:limit]
        with self.db.conn() as conn:
            found = items.get_items(conn, [i for i, _ in ranked])
        return [
            Hit(found[i], s.distance, "pdq", t_start=round(s.t_start, 2), t_end=round(s.t_end, 2))
            for i, s in ranked
            if i in found
        ]

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
            found = items.get_item(conn, item_id)
            if found is None:
                raise NotFoundError(f"no item {item_id}")
            if found.media == "video":
                raise UnavailableError(f"item {item_id} is a video: search with a frame, a clip or a GIF of it")
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
