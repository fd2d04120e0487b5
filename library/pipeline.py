"""The per-item pipeline: steps claimed from the ``step`` table, run, and recorded.

A step is claimed with ``FOR UPDATE SKIP LOCKED`` and a lease, so any number of threads, processes or
Celery workers share the work without a broker-side state; a worker that dies leaves its lease to expire
and the step is claimed again (nothing lost). A step that fails because of its image (not an image,
truncated, file gone or changed) fails at once with the reason; any other error is retried with
exponential back-off up to ``max_attempts``. One poisoned image therefore only ever fails itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from ai_service.errors import InputTooLarge, InvalidInput, ServiceError
from ai_service.imaging import ImageError, ImageTooLargeError
from ai_service.models.base import ModelError
from db.connection import first_line
from library import blocklist, items, pdq, people, search, tags, text, video
from library.db import Database
from library.inference import LibraryInference
from library.settings import LibrarySettings

log = logging.getLogger(__name__)

# Idle workers look for steps left behind by dead workers this often (a cheap query).
_RELEASE_EVERY_S = 5.0


class PermanentStepError(Exception):
    """The item itself is unusable for this step; retrying cannot help."""


def worker_identity() -> str:
    """host:pid:start-time of this process; the start time tells a reused pid from ours."""
    import psutil

    return f"{socket.gethostname()}:{os.getpid()}:{psutil.Process().create_time():.3f}"


def _alive(identity: str) -> bool:
    import psutil

    host, pid, started = identity.rsplit(":", 2)
    if host != socket.gethostname():
        return True  # another machine's worker: only its lease expiry can tell
    try:
        process = psutil.Process(int(pid))
        # A killed worker whose parent did not reap it yet is a zombie: gone for our purposes.
        return f"{process.create_time():.3f}" == started and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, ValueError):
        return False


@dataclass(frozen=True)
class Claim:
    item_id: int
    step: str
    attempts: int


def blob_path(settings: LibrarySettings, blob: str) -> Path:
    return settings.data_dir / "blobs" / blob


def load_bytes(settings: LibrarySettings, item: items.Item) -> bytes:
    """The item's bytes, checked against its content address (a file edited in place is not this item)."""
    path = blob_path(settings, item.blob) if item.blob else Path(item.location)
    try:
        size = path.stat().st_size
        if size > settings.max_image_bytes:
            raise PermanentStepError(f"file is now {size} bytes; the limit is {settings.max_image_bytes}")
        data = path.read_bytes()
    except FileNotFoundError:
        raise PermanentStepError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise PermanentStepError(f"not a file: {path}") from None
    if hashlib.sha256(data).hexdigest() != item.sha256:
        raise PermanentStepError(f"file changed since it was added: {path}")
    return data


def video_source(settings: LibrarySettings, item: items.Item) -> video.Source:
    """A video item's file (streamed, checked against its content address), or its bytes when Pillow
    decodes it (animated GIF/WebP/PNG, which are under LIBRARY_MAX_IMAGE_BYTES)."""
    if item.format in ("GIF", "WEBP", "PNG"):
        return load_bytes(settings, item)
    path = blob_path(settings, item.blob) if item.blob else Path(item.location)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except FileNotFoundError:
        raise PermanentStepError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise PermanentStepError(f"not a file: {path}") from None
    if digest.hexdigest() != item.sha256:
        raise PermanentStepError(f"file changed since it was added: {path}")
    return path


class Pipeline:
    def __init__(self, db: Database, settings: LibrarySettings, inference: LibraryInference | None = None) -> None:
        self.db = db
        self.settings = settings
        self.inference = inference or LibraryInference(settings)
        self.identity = worker_identity()
        self._last_release = 0.0
        self.tag_texts = tags.TextEmbeddings(settings, self.inference)
        self._runners: dict[str, Callable[[psycopg.Connection[Any], items.Item, bytes], None]] = {
            "pdq": self._run_pdq,
            "clip": self._run_clip,
            "ocr": self._run_ocr,
            "faces": self._run_faces,
            "video": self._run_video,
            "nsfw": self._run_nsfw,
            "tags": self._run_tags,
        }

    # ---- claiming ---------------------------------------------------------------------------------

    def claim(self, conn: psycopg.Connection[Any], limit: int = 1) -> list[Claim]:
        rows = conn.execute(
            """UPDATE step AS s
                  SET state = 'running', attempts = s.attempts + 1, updated_at = now(), claimed_by = %s,
                      lease_until = now() + make_interval(secs => %s)
                 FROM (SELECT item_id, name FROM step
                        WHERE (state = 'pending' AND next_attempt_at <= now())
                           OR (state = 'running' AND lease_until < now() AND attempts < %s)
                        ORDER BY next_attempt_at, item_id
                        LIMIT %s
                        FOR UPDATE SKIP LOCKED) AS todo
                WHERE s.item_id = todo.item_id AND s.name = todo.name
            RETURNING s.item_id, s.name, s.attempts""",
            [self.identity, self.settings.lease_s, self.settings.max_attempts, limit],
        ).fetchall()
        return [Claim(int(r[0]), str(r[1]), int(r[2])) for r in rows]

    def release_dead_claims(self) -> int:
        """Hand back steps claimed by workers of this machine that no longer run (killed, crashed) without
        waiting for their lease to expire, and fail steps whose every try ended with a dead worker (an
        image that crashes the decoder must not crash-loop the workers). Returns how many were released."""
        with self.db.conn() as conn:
            owners = conn.execute(
                "SELECT DISTINCT claimed_by FROM step WHERE state = 'running' AND claimed_by IS NOT NULL"
            ).fetchall()
            dead = [o for (o,) in owners if not _alive(str(o))]
            released = 0
            if dead:
                released = conn.execute(
                    """UPDATE step SET state = 'pending', lease_until = NULL, claimed_by = NULL,
                                      next_attempt_at = now(), updated_at = now()
                       WHERE state = 'running' AND claimed_by = ANY(%s)""",
                    [dead],
                ).rowcount
                log.warning("released %d steps held by workers that are gone: %s", released, ", ".join(dead))
            conn.execute(
                """UPDATE step SET state = 'failed', lease_until = NULL, claimed_by = NULL, updated_at = now(),
                                  reason = 'the worker died or timed out on every try (' || attempts || ')'
                   WHERE attempts >= %s
                     AND (state = 'pending' AND reason IS NULL AND claimed_by IS NULL AND attempts > 0
                          OR state = 'running' AND lease_until < now())""",
                [self.settings.max_attempts],
            )
        return released

    def _fail(self, conn: psycopg.Connection[Any], claim: Claim, reason: str, *, permanent: bool) -> None:
        final = permanent or claim.attempts >= self.settings.max_attempts
        delay = self.settings.retry_base_s * (2 ** max(claim.attempts - 1, 0))
        conn.execute(
            """UPDATE step SET state = %s, reason = %s, lease_until = NULL, claimed_by = NULL, updated_at = now(),
                               next_attempt_at = now() + make_interval(secs => %s)
               WHERE item_id = %s AND name = %s""",
            ["failed" if final else "pending", reason[:2000], 0 if final else delay, claim.item_id, claim.step],
        )
        log.log(
            logging.WARNING if final else logging.INFO,
            "item %d step %s %s: %s",
            claim.item_id,
            claim.step,
            "failed" if final else f"will retry (try {claim.attempts})",
            reason,
        )

    # ---- running ----------------------------------------------------------------------------------

    def run_claim(self, claim: Claim) -> bool:
        """Run one claimed step; returns True when it is done."""
        try:
            with self.db.conn() as conn:
                item = items.get_item(conn, claim.item_id)
                if item is None:
                    return False  # deleted meanwhile; its step rows went with it
                runner = self._runners.get(claim.step)
                try:
                    if runner is None:
                        raise PermanentStepError(f"unknown step {claim.step!r}")
                    # A video step streams its file itself (videos may exceed LIBRARY_MAX_IMAGE_BYTES).
                    data = b"" if claim.step == "video" else load_bytes(self.settings, item)
                    with conn.transaction():
                        runner(conn, item, data)
                        items.mark_step_done(conn, item.id, claim.step)
                    return True
                except PermanentStepError as exc:
                    self._fail(conn, claim, str(exc), permanent=True)
                except video.VideoError as exc:
                    self._fail(conn, claim, f"not a usable video: {exc}", permanent=True)
                except (ImageError, ImageTooLargeError) as exc:
                    self._fail(conn, claim, f"not a usable image: {exc}", permanent=True)
                except ServiceError as exc:
                    # The input's fault fails for good; a missing model, a timeout or a busy service may pass.
                    bad_input = isinstance(exc, InvalidInput | InputTooLarge) and not isinstance(exc, ModelError)
                    self._fail(conn, claim, exc.detail, permanent=bad_input)
                except psycopg.errors.TransactionRollback as exc:
                    # A deadlock or serialisation failure: the transaction was rolled back and the connection
                    # is fine, so the step is retried after the usual back-off rather than after its lease.
                    self._fail(conn, claim, f"database: {first_line(exc)}", permanent=False)
                except psycopg.OperationalError:
                    raise
                except Exception as exc:
                    log.exception("item %d step %s raised", claim.item_id, claim.step)
                    self._fail(conn, claim, f"{type(exc).__name__}: {exc}", permanent=False)
        except psycopg.OperationalError as exc:
            # The database went away: leave the lease to expire; the step will be claimed again.
            log.warning("database error while running item %d step %s: %s", claim.item_id, claim.step, exc)
        return False

    def _run_pdq(self, conn: psycopg.Connection[Any], item: items.Item, data: bytes) -> None:
        hashes = pdq.hash_image(
            data, max_pixels=self.settings.max_image_pixels, min_side=self.settings.pdq_decode_min_side
        )
        items.store_pdq(conn, item.id, hashes)
        blocklist.check_item(conn, self.settings, item.id, hashes)
        search.record_pairs(conn, self.settings, item.id, hashes.query_bits)

    def _run_nsfw(self, conn: psycopg.Connection[Any], item: items.Item, data: bytes) -> None:
        self._store_nsfw(conn, item.id, min(max(self.inference.nsfw(data), 0.0), 1.0))

    def _store_nsfw(self, conn: psycopg.Connection[Any], item_id: int, score: float) -> None:
        conn.execute(
            """INSERT INTO nsfw (item_id, model, score) VALUES (%s, %s, %s)
               ON CONFLICT (item_id) DO UPDATE SET model = excluded.model, score = excluded.score""",
            [item_id, self.settings.nsfw_model, score],
        )
        blocklist.check_nsfw(conn, self.settings, item_id, score)

    def _run_video(self, conn: psycopg.Connection[Any], item: items.Item, data: bytes) -> None:
        """Keyframes with their PDQ (every keyframe is checked against the blocklist) and, with a CLIP
        model, their CLIP vectors. Decoding happens before any write, so a failure stores nothing."""
        frames: list[video.Keyframe] = []
        vectors = []
        nsfw: float | None = None
        for frame in video.keyframes(video_source(self.settings, item), self.settings):
            if self.inference.clip_enabled or self.settings.nsfw_model:
                encoded = video.jpeg(frame.rgb)
                if self.inference.clip_enabled:
                    vectors.append(self.inference.clip_image(encoded))
                if self.settings.nsfw_model:  # the video's score: its highest-scoring keyframe
                    nsfw = max(nsfw or 0.0, min(max(self.inference.nsfw(encoded), 0.0), 1.0))
            frames.append(video.Keyframe(frame.t, frame.rgb[:0], frame.hashes))  # pixels dropped: memory bound
        conn.execute("DELETE FROM video_frame WHERE item_id = %s", [item.id])
        conn.execute("DELETE FROM video_frame_clip WHERE item_id = %s", [item.id])
        for n, frame in enumerate(frames):
            for kind, result in frame.hashes.variants:
                conn.execute(
                    """INSERT INTO video_frame (item_id, n, t, kind, hash, quality)
                       VALUES (%s, %s, %s, %s, %s::bit(256), %s)""",
                    [item.id, n, frame.t, kind, result.bits, result.quality],
                )
            blocklist.check_item(conn, self.settings, item.id, frame.hashes)
        for n, (frame, vector) in enumerate(zip(frames, vectors, strict=False)):
            conn.execute(
                """INSERT INTO video_frame_clip (item_id, n, t, model, embedding)
                   VALUES (%s, %s, %s, %s, %s::vector)""",
                [item.id, n, frame.t, self.settings.clip_model, str(vector.tolist())],
            )
        if nsfw is not None:
            self._store_nsfw(conn, item.id, nsfw)

    def _run_clip(self, conn: psycopg.Connection[Any], item: items.Item, data: bytes) -> None:
        vector = [float(v) for v in self.inference.clip_image(data)]
        search.ensure_clip_index(conn, len(vector))
        conn.execute(
            """INSERT INTO clip (item_id, model, embedding) VALUES (%s, %s, %s::vector)
               ON CONFLICT (item_id) DO UPDATE SET model = excluded.model, embedding = excluded.embedding""",
            [item.id, self.settings.clip_model, str(vector)],
        )
        search.record_clip_pairs(conn, self.settings, item.id, vector)
        if self.settings.tags_enabled and not self.settings.tag_model:  # a tagging model has its own step
            tags.assign(conn, self.settings, self.tag_texts, item.id, vector)

    def _run_tags(self, conn: psycopg.Connection[Any], item: items.Item, data: bytes) -> None:
        tags.store_model_tags(conn, self.settings, item.id, self.inference.tags(data))

    def _run_ocr(self, conn: psycopg.Connection[Any], item: items.Item, data: bytes) -> None:
        found = self.inference.ocr(data)
        text.store_ocr(conn, item.id, found.lines)

    def _run_faces(self, conn: psycopg.Connection[Any], item: items.Item, data: bytes) -> None:
        found = self.inference.faces(data)  # before any write: the people lock is held only while storing
        people.store_faces(conn, self.settings, item.id, found)

    # ---- driving ----------------------------------------------------------------------------------

    def run_once(self, limit: int = 1) -> int:
        """Claim and run up to ``limit`` steps; returns how many were claimed. When there is nothing to
        claim, steps held by dead workers of this machine are released (at most every few seconds)."""
        with self.db.conn() as conn:
            claims = self.claim(conn, limit)
        if not claims and time.monotonic() - self._last_release >= _RELEASE_EVERY_S:
            self._last_release = time.monotonic()
            if self.release_dead_claims():
                with self.db.conn() as conn:
                    claims = self.claim(conn, limit)
        for claim in claims:
            self.run_claim(claim)
        return len(claims)

    def run_until_idle(self, on_step: Callable[[], None] | None = None) -> None:
        """Run every step that is due now (retries scheduled later are left for the workers)."""
        while self.run_once():
            if on_step is not None:
                on_step()


class WorkerPool:
    """In-process workers: ``threads`` threads claiming and running steps until stopped."""

    def __init__(self, pipeline: Pipeline, threads: int) -> None:
        self.pipeline = pipeline
        self.threads = threads
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._workers: list[threading.Thread] = []

    def start(self) -> None:
        for n in range(self.threads):
            worker = threading.Thread(target=self._loop, name=f"library-worker-{n}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def wake(self) -> None:
        """New work was enqueued: look now rather than at the next poll."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.pipeline.run_once()
            except Exception:  # never let a worker thread die: log and keep polling
                log.exception("library worker loop")
                busy = 0
            if not busy:
                self._wake.wait(self.pipeline.settings.poll_s)
                self._wake.clear()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        for worker in self._workers:
            worker.join(timeout)
        self._workers.clear()
