"""Adding images: from server paths, URLs and uploads. Content-addressed: the SHA-256 of the bytes is the
item's identity, so the same file added twice (any name, any route) is one item.

Every route sniffs the bytes (format and size from the header; the name or Content-Type is never trusted)
and refuses what is not an image, too many bytes or too many pixels, before anything is stored.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ai_service.imaging import ImageTooLargeError, probe_image
from library import blocklist, items, pdq, search, video
from library.db import Database
from library.fetch import fetch_image_bytes
from library.pipeline import blob_path
from library.settings import LibrarySettings


class IngestTooLargeError(ValueError):
    """More bytes or pixels than allowed (HTTP 413)."""


@dataclass(frozen=True)
class Added:
    item_id: int
    md5: str
    sha256: str
    created: bool  # False: the same bytes were already in the library


def _store_blob(settings: LibrarySettings, sha256_hex: str, data: bytes) -> str:
    """Write the bytes under data_dir/blobs/ab/<sha256> (atomically; idempotent)."""
    relative = f"{sha256_hex[:2]}/{sha256_hex}"
    target = blob_path(settings, relative)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return relative


class Ingestor:
    def __init__(self, db: Database, settings: LibrarySettings) -> None:
        self.db = db
        self.settings = settings

    def add_bytes(
        self,
        data: bytes,
        *,
        source: str,
        location: str,
        data_id: str | None = None,
        remark: str | None = None,
        meta: Any = None,
        hash_now: bool = False,
    ) -> Added:
        """Add one image. ``hash_now``: decode fully and run the PDQ step inline (API routes, which must
        answer 'not an image' for a truncated file and can return a match at once); otherwise the pipeline
        hashes it later. Raises ``ImageError`` (not an image) or :class:`IngestTooLargeError`."""
        if len(data) > self.settings.max_image_bytes:
            raise IngestTooLargeError(
                f"the image is {len(data)} bytes; the limit is {self.settings.max_image_bytes} "
                "(LIBRARY_MAX_IMAGE_BYTES)"
            )
        media, duration = "image", None
        if self.settings.video_enabled and (video.looks_like_video(data) or video.is_animated_image(data)):
            info = video.probe(data, self.settings)  # VideoError (an ImageError): not usable, over a limit
            width, height, fmt, media, duration = info.width, info.height, info.format, "video", info.duration_s
        else:
            try:
                width, height, fmt = probe_image(data, max_pixels=self.settings.max_image_pixels)
            except ImageTooLargeError as exc:
                raise IngestTooLargeError(str(exc)) from None
        # A video's keyframes are found by its pipeline step, never inside a request.
        result = None
        if hash_now and media == "image":
            result = pdq.hash_image(
                data, max_pixels=self.settings.max_image_pixels, min_side=self.settings.pdq_decode_min_side
            )
        digest = hashlib.sha256(data)
        blob = _store_blob(self.settings, digest.hexdigest(), data) if source != "path" else None
        new = items.NewItem(
            sha256=digest.digest(),
            md5=hashlib.md5(data).hexdigest(),
            byte_size=len(data),
            width=width,
            height=height,
            format=fmt,
            source=source,
            location=location,
            blob=blob,
            data_id=data_id,
            remark=remark,
            meta=meta,
            media=media,
            duration_s=duration,
        )
        return self._insert(new, result)

    def _insert(self, new: items.NewItem, result: pdq.PdqHashes | None) -> Added:
        with self.db.conn() as conn:
            item_id, created = items.insert_item(conn, new, items.enabled_steps(self.settings, new.media))
            if created and result is not None:
                with conn.transaction():
                    items.store_pdq(conn, item_id, result)
                    blocklist.check_item(conn, self.settings, item_id, result)
                    search.record_pairs(conn, self.settings, item_id, result.query_bits)
                    items.mark_step_done(conn, item_id, "pdq")
        return Added(item_id=item_id, md5=new.md5, sha256=new.sha256.hex(), created=created)

    def add_path(self, path: Path) -> Added:
        path = path.resolve()
        size = path.stat().st_size
        if self.settings.video_enabled and size > self.settings.max_image_bytes and video.looks_like_video(path):
            return self._add_video_path(path, size)
        if size > self.settings.max_image_bytes:
            raise IngestTooLargeError(f"{path} is {size} bytes; the limit is {self.settings.max_image_bytes}")
        return self.add_bytes(path.read_bytes(), source="path", location=str(path))

    def _add_video_path(self, path: Path, size: int) -> Added:
        """A video too large to hold in memory: probed from the file, hashed while streaming."""
        if size > self.settings.video_max_bytes:
            raise IngestTooLargeError(f"{path} is {size} bytes; the limit is {self.settings.video_max_bytes}")
        info = video.probe(path, self.settings)
        sha256, md5 = hashlib.sha256(), hashlib.md5()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                sha256.update(chunk)
                md5.update(chunk)
        new = items.NewItem(
            sha256=sha256.digest(),
            md5=md5.hexdigest(),
            byte_size=size,
            width=info.width,
            height=info.height,
            format=info.format,
            source="path",
            location=str(path),
            media="video",
            duration_s=info.duration_s,
        )
        return self._insert(new, None)

    def add_url(self, url: str, **fields: Any) -> Added:
        """Fetch ``url`` (network policy, limits: library.fetch) and add it; raises ``FetchError``."""
        fetched = fetch_image_bytes(url, self.settings)
        return self.add_bytes(fetched.data, source="url", location=url, hash_now=True, **fields)


def iter_image_files(paths: Iterable[Path], extensions: list[str]) -> Iterator[Path]:
    """Files named on the command line, and files under folders (recursively) with an image extension;
    sorted within each folder so runs are reproducible."""
    wanted = {e.lower() for e in extensions}
    for path in paths:
        if path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    if Path(name).suffix.lower() in wanted:
                        yield Path(root) / name
        else:
            yield path
