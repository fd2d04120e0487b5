"""Videos: sniffing, bounded decoding, keyframes (scene changes plus one every N seconds) and frame votes.

Two decoders: PyAV (FFmpeg) for MP4/MOV, Matroska/WebM and AVI, and Pillow for animated GIF/WebP/PNG.
The container is recognised from its magic bytes and PyAV is told which demuxer to use, so FFmpeg never
guesses a format: playlist or concat demuxers (which open other files or URLs) cannot be reached from a
hostile file. Input always goes through a Python file object, never a URL or file name, so no FFmpeg
protocol is ever opened. Every loop is bounded by the LIBRARY_VIDEO_* limits.
"""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image, ImageSequence

from ai_service.imaging import ImageError
from library import pdq
from library.settings import LibrarySettings


class VideoError(ImageError):
    """Not a usable video (corrupt, unsupported, or beyond a limit); retrying cannot help."""


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    duration_s: float | None  # what the container declares; None when it does not say
    format: str  # 'mp4', 'matroska', 'avi' (PyAV) or Pillow's 'GIF', 'WEBP', 'PNG'


@dataclass(frozen=True)
class Frame:
    t: float  # seconds from the start
    rgb: np.ndarray  # scaled to LIBRARY_VIDEO_FRAME_SIDE at most


@dataclass(frozen=True)
class Keyframe:
    t: float
    rgb: np.ndarray
    hashes: pdq.PdqHashes


Source = bytes | Path

_ANIMATED_FORMATS = {"GIF", "WEBP", "PNG"}
# ISO-BMFF major brands of still images (HEIF, HEIC, AVIF and their sequences), not videos.
_STILL_BRANDS = {
    b"heic",
    b"heix",
    b"heim",
    b"heis",
    b"hevc",
    b"hevx",
    b"hevm",
    b"hevs",
    b"mif1",
    b"msf1",
    b"avif",
    b"avis",
}


def _demuxer(head: bytes) -> str | None:
    """FFmpeg demuxer for the container these first bytes start, or None (not a video we read)."""
    if len(head) >= 12 and head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        if head[4:8] == b"ftyp" and head[8:12] in _STILL_BRANDS:
            return None  # HEIF/HEIC/AVIF photos share MP4's box format; Pillow (pillow-heif) reads them
        return "mp4"  # FFmpeg's mov demuxer: MP4, MOV, 3GP, M4V
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"  # also WebM
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    return None


def _open_file(source: Source) -> IO[bytes]:
    return io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")


def _head(source: Source) -> bytes:
    if isinstance(source, bytes):
        return source[:64]
    with open(source, "rb") as f:
        return f.read(64)


def is_animated_image(data: bytes) -> bool:
    """An animated GIF/WebP/PNG (more than one frame): ingested as a video."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                return img.format in _ANIMATED_FORMATS and getattr(img, "n_frames", 1) > 1
    except Exception:
        return False


def looks_like_video(source: Source) -> bool:
    return _demuxer(_head(source)) is not None


def _check_size(settings: LibrarySettings, width: int, height: int) -> None:
    if width <= 0 or height <= 0:
        raise VideoError("the video has no width or height")
    if width * height > settings.video_max_pixels:
        raise VideoError(
            f"video frames are {width}x{height} = {width * height} pixels; the limit is "
            f"{settings.video_max_pixels} (LIBRARY_VIDEO_MAX_PIXELS)"
        )


def _check_duration(settings: LibrarySettings, duration: float | None) -> None:
    if duration is not None and duration > settings.video_max_duration_s:
        raise VideoError(
            f"the video lasts {duration:.0f} s; the limit is {settings.video_max_duration_s:.0f} s "
            "(LIBRARY_VIDEO_MAX_DURATION_S)"
        )


def probe(source: Source, settings: LibrarySettings) -> VideoInfo:
    """Size, declared duration and format from the headers; raises VideoError (not a video, over a limit)."""
    if isinstance(source, bytes) and is_animated_image(source):
        return _probe_animated(source, settings)
    demuxer = _demuxer(_head(source))
    if demuxer is None:
        raise VideoError("not a video: unknown container (MP4/MOV, Matroska/WebM, AVI or animated GIF/WebP/PNG)")
    import av

    try:
        with _open_file(source) as f, av.open(f, format=demuxer) as container:
            if not container.streams.video:
                raise VideoError("the file has no video stream")
            stream = container.streams.video[0]
            width, height = int(stream.codec_context.width), int(stream.codec_context.height)
            duration = _declared_duration(container, stream)
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError) as exc:
        raise VideoError(f"not a readable video: {exc}") from None
    _check_size(settings, width, height)
    _check_duration(settings, duration)
    return VideoInfo(width, height, duration, demuxer)


def _declared_duration(container: Any, stream: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(container.duration) / 1_000_000  # AV_TIME_BASE
    return None


def _probe_animated(data: bytes, settings: LibrarySettings) -> VideoInfo:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data)) as img:
            _check_size(settings, *img.size)
            n = int(getattr(img, "n_frames", 1))
            if n > settings.video_max_frames:
                raise VideoError(f"{n} frames; the limit is {settings.video_max_frames} (LIBRARY_VIDEO_MAX_FRAMES)")
            # Summing durations reads every frame header (cheap, no pixels); a GIF says 0 ms for "as fast as
            # possible", which browsers show as 100 ms.
            total = 0.0
            for frame in ImageSequence.Iterator(img):
                total += _frame_ms(frame) / 1000
            _check_duration(settings, total)
            return VideoInfo(img.size[0], img.size[1], total, str(img.format))


def _frame_ms(frame: Image.Image) -> float:
    ms = float(frame.info.get("duration") or 0)
    return ms if ms >= 20 else 100.0


def _scaled(width: int, height: int, side: int) -> tuple[int, int]:
    scale = min(1.0, side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


class _Budget:
    """Frame-count, duration and wall-clock limits of one decode."""

    def __init__(self, settings: LibrarySettings) -> None:
        self.settings = settings
        self.frames = 0
        self.deadline = time.monotonic() + settings.video_decode_timeout_s

    def tick(self, t: float) -> None:
        self.frames += 1
        s = self.settings
        if self.frames > s.video_max_frames:
            raise VideoError(f"more than {s.video_max_frames} frames (LIBRARY_VIDEO_MAX_FRAMES)")
        if t > s.video_max_duration_s:
            raise VideoError(
                f"the video goes on past {s.video_max_duration_s:g} s (LIBRARY_VIDEO_MAX_DURATION_S), "
                "whatever its header says"
            )
        if self.frames % 64 == 0 and time.monotonic() > self.deadline:
            raise VideoError(
                f"decoding took longer than {s.video_decode_timeout_s:.0f} s (LIBRARY_VIDEO_DECODE_TIMEOUT_S)"
            )


def sample_frames(source: Source, settings: LibrarySettings, step_s: float) -> Iterator[Frame]:
    """Frames at most every ``step_s`` seconds (the first frame always), scaled down, with their time."""
    if isinstance(source, bytes) and is_animated_image(source):
        yield from _sample_animated(source, settings, step_s)
        return
    demuxer = _demuxer(_head(source))
    if demuxer is None:
        raise VideoError("not a video: unknown container")
    import av

    budget = _Budget(settings)
    next_t = 0.0
    try:
        with _open_file(source) as f, av.open(f, format=demuxer) as container:
            if not container.streams.video:
                raise VideoError("the file has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else budget.frames / 25.0
                budget.tick(t)
                if t + 1e-6 < next_t:
                    continue  # decoded (it must be) but not converted: the colour conversion is the cost
                _check_size(settings, frame.width, frame.height)
                w, h = _scaled(frame.width, frame.height, settings.video_frame_side)
                rgb = frame.reformat(width=w, height=h, format="rgb24").to_ndarray()
                next_t = t + step_s
                yield Frame(max(t, 0.0), np.ascontiguousarray(rgb))
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError, MemoryError) as exc:
        raise VideoError(f"the video cannot be decoded: {exc}") from None
    if budget.frames == 0:
        raise VideoError("the video has no decodable frame")


def _sample_animated(data: bytes, settings: LibrarySettings, step_s: float) -> Iterator[Frame]:
    _probe_animated(data, settings)
    budget = _Budget(settings)
    next_t, t = 0.0, 0.0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                for frame in ImageSequence.Iterator(img):
                    budget.tick(t)
                    if t + 1e-6 >= next_t:
                        rgb = frame.convert("RGB")
                        rgb.thumbnail((settings.video_frame_side, settings.video_frame_side))
                        next_t = t + step_s
                        yield Frame(t, np.ascontiguousarray(np.asarray(rgb)))
                    t += _frame_ms(frame) / 1000
    except VideoError:
        raise
    except Exception as exc:  # Pillow raises many types for hostile input; all mean "unusable"
        raise VideoError(f"the animation cannot be decoded: {exc}") from None


def keyframes(source: Source, settings: LibrarySettings) -> Iterator[Keyframe]:
    """Keyframes, as they are found (the caller keeps what it needs of each frame's pixels): the first
    frame, every sampled frame whose PDQ moved more than LIBRARY_VIDEO_SCENE_BITS from the last keyframe
    (a cut, or a pan/zoom that has gone far enough), and at least one every LIBRARY_VIDEO_KEYFRAME_INTERVAL_S
    seconds."""
    last: Keyframe | None = None
    count = 0
    for frame in sample_frames(source, settings, 1.0 / settings.video_sample_fps):
        hashes = pdq.hash_pixels(frame.rgb)
        if last is not None:
            moved = pdq.hamming(hashes.plain.hash_hex, last.hashes.plain.hash_hex) > settings.video_scene_bits
            if not moved and frame.t - last.t < settings.video_keyframe_interval_s:
                continue
        count += 1
        if count > settings.video_max_keyframes:
            raise VideoError(f"more than {settings.video_max_keyframes} keyframes (LIBRARY_VIDEO_MAX_KEYFRAMES)")
        last = Keyframe(frame.t, frame.rgb, hashes)
        yield last


def query_frames(source: Source, settings: LibrarySettings) -> list[tuple[float, pdq.PdqHashes]]:
    """The frames of a query clip or GIF that vote: every LIBRARY_VIDEO_QUERY_STEP_S, at most
    LIBRARY_VIDEO_QUERY_MAX_FRAMES of them."""
    found: list[tuple[float, pdq.PdqHashes]] = []
    for frame in sample_frames(source, settings, settings.video_query_step_s):
        found.append((frame.t, pdq.hash_pixels(frame.rgb)))
        if len(found) >= settings.video_query_max_frames:
            break
    return found


def _band_depth(lines: np.ndarray) -> int:
    """Leading lines of one flat colour: a status bar or letterbox ends where the colour changes, even when
    the picture's own edge is flat too (a sky), which trim_frame would eat."""
    if not len(lines) or not pdq._uniform_lines(lines[:1])[0]:
        return 0
    colour = np.median(lines[0], axis=0)
    limit = len(lines) // 3
    depth = 1
    while depth < limit and pdq._uniform_lines(lines[depth : depth + 1])[0]:
        if np.abs(np.median(lines[depth], axis=0) - colour).max() > pdq._FRAME_TOLERANCE:
            break
        depth += 1
    return depth


def cut_bands(rgb: np.ndarray) -> list[np.ndarray]:
    """``rgb`` without the flat bands at its top and bottom (a status bar, a letterbox), and without flat
    bands on all four sides (pillarbox too), each side cut at the first colour change; [] when none."""
    h, w = rgb.shape[:2]
    top, bottom = _band_depth(rgb), h - _band_depth(rgb[::-1])
    if bottom - top < h // 3:
        return []
    cols = rgb[top:bottom].transpose(1, 0, 2)
    left, right = _band_depth(cols), w - _band_depth(cols[::-1])
    found = []
    if (top, bottom) != (0, h):
        found.append(np.ascontiguousarray(rgb[top:bottom]))
    if (left, right) != (0, w) and right - left >= w // 3:
        found.append(np.ascontiguousarray(rgb[top:bottom, left:right]))
    return found


def image_query_bits(data: bytes, settings: LibrarySettings) -> list[str]:
    """What a screenshot is compared with: the dihedral PDQ of the image, of the image without its uniform
    frame, and of the image with its edge bands (status bar, letterbox) cut at the first colour change."""
    from ai_service.imaging import decode_image

    rgb = decode_image(data, max_pixels=settings.max_image_pixels, pillow_rgb=True).rgb
    bits = pdq.hash_pixels(rgb).query_bits
    for banded in cut_bands(rgb):
        bits += pdq.hash_rgb(banded).dihedral_bits
    return list(dict.fromkeys(bits))


def frame_at(source: Source, settings: LibrarySettings, t: float) -> np.ndarray:
    """The frame shown at ``t`` seconds (the last one when ``t`` is past the end), scaled to
    LIBRARY_VIDEO_FRAME_SIDE. PyAV seeks to the keyframe before ``t`` and decodes from there, under the
    same limits as indexing."""
    if isinstance(source, bytes) and is_animated_image(source):
        chosen: np.ndarray | None = None
        for frame in _sample_animated(source, settings, 0.0):
            if chosen is not None and frame.t > t + 1e-6:
                break
            chosen = frame.rgb
        if chosen is None:
            raise VideoError("the animation has no frame")
        return chosen
    demuxer = _demuxer(_head(source))
    if demuxer is None:
        raise VideoError("not a video: unknown container")
    import av

    budget = _Budget(settings)
    try:
        with _open_file(source) as f, av.open(f, format=demuxer) as container:
            if not container.streams.video:
                raise VideoError("the file has no video stream")
            stream = container.streams.video[0]
            if t > 0 and stream.time_base:
                container.seek(int(t / stream.time_base), stream=stream, backward=True)
            last = None
            for frame in container.decode(stream):
                frame_t = float(frame.time) if frame.time is not None else 0.0
                budget.tick(frame_t)
                if last is not None and frame_t > t + 1e-6:
                    break
                last = frame
            if last is None:
                raise VideoError("the video has no decodable frame")
            _check_size(settings, last.width, last.height)
            w, h = _scaled(last.width, last.height, settings.video_frame_side)
            return np.ascontiguousarray(last.reformat(width=w, height=h, format="rgb24").to_ndarray())
    except VideoError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError, MemoryError) as exc:
        raise VideoError(f"the video cannot be decoded: {exc}") from None


def jpeg(rgb: np.ndarray) -> bytes:
    """A keyframe encoded for the CLIP model (which takes image bytes)."""
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=92)
    return out.getvalue()


@dataclass(frozen=True)
class FrameMatch:
    query_t: float
    video_t: float
    distance: float


@dataclass(frozen=True)
class Span:
    t_start: float
    t_end: float
    distance: float  # mean distance of the frames that agreed
    votes: int


def vote(matches: list[FrameMatch], query_start: float, query_end: float, window_s: float) -> Span | None:
    """The time span of one video that a query clip shows: the offset (video time - query time) agreed by
    the most query frames within ``window_s`` (keyframes are sparse, so matches scatter by up to a keyframe
    interval), its median, applied to the query's first and last sampled times."""
    if not matches:
        return None
    ordered = sorted(matches, key=lambda m: m.video_t - m.query_t)
    offsets = [m.video_t - m.query_t for m in ordered]
    best: tuple[int, float, int, int] = (0, 0.0, 0, 0)
    hi = 0
    for lo in range(len(ordered)):
        while hi < len(ordered) and offsets[hi] - offsets[lo] <= window_s:
            hi += 1
        voters = len({m.query_t for m in ordered[lo:hi]})
        closeness = -sum(m.distance for m in ordered[lo:hi]) / (hi - lo)
        if (voters, closeness) > (best[0], best[1]):
            best = (voters, closeness, lo, hi)
    voters, _, lo, hi = best
    agreed = ordered[lo:hi]
    offset = float(np.median([m.video_t - m.query_t for m in agreed]))
    return Span(
        t_start=max(0.0, offset + query_start),
        t_end=max(0.0, offset + query_end),
        distance=float(np.mean([m.distance for m in agreed])),
        votes=voters,
    )
