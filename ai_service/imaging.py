"""The one image decoder: encoded bytes -> RGB ``uint8`` array, with the checks a server needs.

* Size is checked from the header before any pixel is decoded (decompression bombs -> 413).
* EXIF orientation is applied, so an upside-down phone photo is read upright.
* JPEGs are decoded at reduced size with Pillow's draft mode when the caller only needs a small
  image (CLIP's 224 px input), which is several times faster than a full decode plus resize.
* Only the first frame of animated formats is used.
* HEIC/HEIF are read through pillow-heif when it is installed (library mode depends on it).
* ``pillow_rgb=True`` converts to RGB exactly as Pillow's ``convert("RGB")`` does (alpha dropped, 16-bit
  values clipped), which is what python-threatexchange hashes: PDQ hashes then match published ones.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ai_service.errors import InputTooLarge, InvalidInput

log = logging.getLogger(__name__)

try:  # optional: HEIC/HEIF (iPhone photos); Pillow itself reads AVIF
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:
    pass

# We enforce our own, configurable limit before decoding; Pillow's global guard would raise a
# different exception type at a fixed size, so it is switched off in favour of ours.
Image.MAX_IMAGE_PIXELS = None


class ImageError(InvalidInput, ValueError):
    """The bytes are not an image we can use."""


class ImageTooLargeError(InputTooLarge, ValueError):
    """The image has more pixels than allowed."""


@dataclass(frozen=True, slots=True)
class DecodedImage:
    """An upright RGB image plus the size Immich must be told (the full decoded size)."""

    rgb: np.ndarray  # H x W x 3, uint8, C-contiguous; may be smaller than width x height (draft mode)
    width: int  # width of the full-size upright image
    height: int  # height of the full-size upright image

    @property
    def scale(self) -> float:
        """Factor from full-size pixels to ``rgb`` pixels (1.0 unless decoded in draft mode)."""
        return self.rgb.shape[1] / self.width


_ROTATING_ORIENTATIONS = {5, 6, 7, 8}


def _open_checked(data: bytes, max_pixels: int) -> tuple[Image.Image, int, int, int | None]:
    """Open ``data`` lazily and check its header: returns the image, upright width/height, EXIF orientation."""
    if not data:
        raise ImageError("Image is empty (0 bytes)")
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageError("Image has zero width or height")
    if width * height > max_pixels:
        raise ImageTooLargeError(f"Image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    orientation = _exif_orientation(img)
    if orientation in _ROTATING_ORIENTATIONS:
        width, height = height, width
    return img, width, height, orientation


def probe_size(data: bytes, *, max_pixels: int) -> tuple[int, int]:
    """Upright (width, height) from the header alone, without decoding pixels."""
    width, height, _ = probe_image(data, max_pixels=max_pixels)
    return width, height


def probe_image(data: bytes, *, max_pixels: int) -> tuple[int, int, str]:
    """Upright (width, height) and Pillow's format name (sniffed from the bytes, never from a file name or
    a Content-Type) from the header alone, without decoding pixels."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img, width, height, _ = _open_checked(data, max_pixels)
            fmt = str(img.format or "unknown")
            img.close()
            return width, height, fmt
    except (ImageError, ImageTooLargeError):
        raise
    except Exception as exc:
        raise _decode_error(exc) from None


def decode_image(
    data: bytes, *, max_pixels: int, min_side: int | None = None, pillow_rgb: bool = False
) -> DecodedImage:
    """Decode ``data`` into an upright RGB array.

    ``min_side``: the caller needs at least this many pixels on the shorter side; a JPEG may then be
    decoded at 1/2, 1/4 or 1/8 scale (never below ``min_side``).
    ``pillow_rgb``: plain ``convert("RGB")`` instead of compositing alpha on white and stretching 16-bit
    images (perceptual hashes must see the pixels the reference implementations see).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img, width, height, orientation = _open_checked(data, max_pixels)
            if min_side is not None and img.format == "JPEG":
                # draft() keeps both sides >= the requested size, so the shorter side stays >= min_side.
                img.draft("RGB", (min_side, min_side))
            if getattr(img, "is_animated", False):
                img.seek(0)
            img.load()
            if orientation not in (None, 1):
                img = ImageOps.exif_transpose(img)
            rgb = img.convert("RGB") if pillow_rgb else _to_rgb(img)
    except (ImageError, ImageTooLargeError):
        raise
    except Exception as exc:
        # Pillow and its plugins raise many types for hostile input (OSError, SyntaxError, struct.error,
        # ValueError, …); every one of them means "not a usable image", never a server fault.
        raise _decode_error(exc) from None
    array = np.asarray(rgb)
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError("Image has zero width or height")
    return DecodedImage(rgb=np.ascontiguousarray(array), width=width, height=height)


def _decode_error(exc: Exception) -> ImageError:
    """What the client is told: what is wrong with its file. The library's own words go to the log."""
    if isinstance(exc, UnidentifiedImageError):
        return ImageError(
            "Image could not be decoded: not a supported image format (JPEG, PNG, WebP, GIF, TIFF, BMP…) "
            "or its header is invalid"
        )
    log.info("image decoding failed: %s: %s", type(exc).__name__, exc)
    if isinstance(exc, MemoryError):
        return ImageError("Image could not be decoded: it needs more memory than is available")
    return ImageError(
        "Image could not be decoded: the file is truncated or damaged, or uses a variant of its format "
        "that cannot be read"
    )


def _exif_orientation(img: Image.Image) -> int | None:
    try:
        value = img.getexif().get(0x0112)
    except Exception:  # a broken EXIF block must not make a readable image unreadable
        return None
    return value if isinstance(value, int) else None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white: text on transparent PNGs (screenshots, stickers) stays readable.
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(img, dtype=np.float64)
        peak = float(array.max()) or 1.0
        return Image.fromarray((array * (255.0 / peak)).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")
