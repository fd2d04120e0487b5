"""Test videos made from real photos (scikit-image's samples) with PyAV: pans, zooms and cuts at known
times, so a query cut from a video has a known true time."""

from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np
import skimage.data
from PIL import Image


def photos() -> dict[str, np.ndarray]:
    """Real RGB photos shipped inside scikit-image (no download)."""
    found = {name: getattr(skimage.data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")}
    return {k: np.ascontiguousarray(v[..., :3]) for k, v in found.items()}


@dataclass(frozen=True)
class Shot:
    photo: np.ndarray
    seconds: float
    motion: str = "pan"  # 'pan' (left to right), 'zoom' (in towards the centre) or 'still'


def _view(photo: np.ndarray, motion: str, progress: float, size: tuple[int, int]) -> np.ndarray:
    """The frame at ``progress`` (0..1) of a shot: a window over the photo, resized to ``size``."""
    h, w = photo.shape[:2]
    aspect = size[0] / size[1]
    win_h = min(h, int(w / aspect))
    win_w = int(win_h * aspect)
    if motion == "pan":
        win_w, win_h = int(win_w * 0.7), int(win_h * 0.7)
        x = int((w - win_w) * progress)
        y = (h - win_h) // 2
    elif motion == "zoom":
        scale = 1.0 - 0.5 * progress
        win_w, win_h = int(win_w * scale), int(win_h * scale)
        x, y = (w - win_w) // 2, (h - win_h) // 2
    else:
        x, y = (w - win_w) // 2, (h - win_h) // 2
    crop = Image.fromarray(photo[y : y + win_h, x : x + win_w])
    return np.asarray(crop.resize(size, Image.Resampling.BILINEAR))


def render(shots: list[Shot], fps: int, size: tuple[int, int]) -> list[np.ndarray]:
    frames: list[np.ndarray] = []
    for shot in shots:
        n = max(1, round(shot.seconds * fps))
        frames += [_view(shot.photo, shot.motion, i / max(n - 1, 1), size) for i in range(n)]
    return frames


def encode_video(
    frames: list[np.ndarray], fps: int, container: str = "mp4", codec: str = "libx264", **options: str
) -> bytes:
    out = io.BytesIO()
    with av.open(out, mode="w", format=container) as c:
        stream = c.add_stream(codec, rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", **options} if codec == "libx264" else dict(options)
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    return out.getvalue()


def encode_gif(frames: list[np.ndarray], fps: int, fmt: str = "GIF") -> bytes:
    """An animated GIF (or WEBP / PNG, Pillow's other animated formats)."""
    images = [Image.fromarray(f) for f in frames]
    out = io.BytesIO()
    images[0].save(out, format=fmt, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return out.getvalue()


def screenshot(frame: np.ndarray, bar: int = 40) -> bytes:
    """A phone screenshot of a paused frame: a status bar (clock text on a dark strip) above, black below,
    saved as JPEG."""
    from PIL import ImageDraw

    h, w = frame.shape[:2]
    canvas = Image.new("RGB", (w, h + bar + bar // 2), (0, 0, 0))
    canvas.paste(Image.fromarray(frame), (0, bar))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([0, 0, w, bar - 1], fill=(20, 20, 20))
    draw.text((8, bar // 4), "9:41", fill=(255, 255, 255))
    draw.text((w - 50, bar // 4), "87%", fill=(255, 255, 255))
    out = io.BytesIO()
    canvas.save(out, format="JPEG", quality=80)
    return out.getvalue()
