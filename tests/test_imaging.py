"""The one image decoder: orientation, draft decoding, odd modes, and hostile input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ai_service.imaging import ImageError, ImageTooLargeError, decode_image, probe_size


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _rotated_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = Image.new("RGB", (64, 32), (255, 255, 255))
    image.paste((255, 0, 0), (0, 0, 8, 8))  # red mark in the stored top-left corner
    return _encode(image, "JPEG", exif=exif, quality=95)


def test_probe_size_reads_the_header_with_exif_rotation() -> None:
    assert probe_size(_rotated_jpeg(8), max_pixels=10_000) == (32, 64)
    assert probe_size(_rotated_jpeg(1), max_pixels=10_000) == (64, 32)
    with pytest.raises(ImageError):
        probe_size(b"nope", max_pixels=10_000)
    with pytest.raises(ImageTooLargeError, match="limit"):
        probe_size(_rotated_jpeg(1), max_pixels=100)


def test_exif_orientation_is_applied() -> None:
    decoded = decode_image(_rotated_jpeg(3), max_pixels=10_000)  # 180°
    assert (decoded.width, decoded.height) == (64, 32)
    # The red mark, stored top-left, is bottom-right after rotating by 180°.
    assert decoded.rgb[-4, -4, 0] > 200 and decoded.rgb[-4, -4, 1] < 80
    rotated = decode_image(_rotated_jpeg(6), max_pixels=10_000)
    assert rotated.rgb.shape == (64, 32, 3) and (rotated.width, rotated.height) == (32, 64)


def test_jpeg_draft_mode_keeps_the_shorter_side_and_reports_full_size() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (1080, 1440, 3), dtype=np.uint8))
    decoded = decode_image(_encode(image, "JPEG"), max_pixels=10**8, min_side=224)
    assert (decoded.width, decoded.height) == (1440, 1080)
    assert min(decoded.rgb.shape[:2]) >= 224
    assert decoded.rgb.shape[:2] == (270, 360)  # 1/4 scale: the smallest JPEG scale still >= 224
    assert decoded.scale == pytest.approx(0.25)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "1"])
def test_modes_become_rgb(mode: str) -> None:
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "I;16" else "PNG")
    image = Image.new("RGB", (20, 10), (10, 200, 30)).convert(mode)
    decoded = decode_image(_encode(image, fmt), max_pixels=10_000)
    assert decoded.rgb.shape == (10, 20, 3) and decoded.rgb.dtype == np.uint8


def test_transparent_png_is_composited_on_white() -> None:
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    decoded = decode_image(_encode(image, "PNG"), max_pixels=100)
    assert (decoded.rgb == 255).all()


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    decoded = decode_image(buf.getvalue(), max_pixels=100)
    assert decoded.rgb[0, 0, 0] > 200 and decoded.rgb[0, 0, 2] < 50


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00" * 10, b"\xff\xd8\xff\xe0" + b"\x00" * 50, b"GIF89a" + b"\xff" * 20, b"<svg></svg>"],
    ids=["empty", "zeros", "truncated-jpeg", "broken-gif", "svg"],
)
def test_hostile_bytes_are_image_errors(data: bytes) -> None:
    with pytest.raises(ImageError):
        decode_image(data, max_pixels=10**6)


def test_truncated_real_jpeg_is_an_image_error_or_decodes() -> None:
    rng = np.random.default_rng(1)
    data = _encode(Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)), "JPEG")
    for cut in (100, len(data) // 2):
        try:
            decoded = decode_image(data[:cut], max_pixels=10**6)
        except ImageError:
            continue
        assert decoded.rgb.shape == (200, 300, 3)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_decode_errors_describe_the_file_and_log_the_internals(fmt: str, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(2)
    data = _encode(Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8)), fmt)
    cut = data[: len(data) // 3]
    for decode in (decode_image, probe_size):
        caplog.clear()
        with caplog.at_level("INFO", logger="ai_service.imaging"), pytest.raises(ImageError) as raised:
            decode(cut, max_pixels=10**6)
            decode(data[:40], max_pixels=10**6)  # probe_size reads only the header: cut into it too
        message = str(raised.value)
        # What the client reads: what is wrong with its file, not Pillow's exception type and words.
        assert message.startswith("Image could not be decoded: ")
        assert "truncated or damaged" in message or "not a supported image format" in message
        assert "Error" not in message and "truncated (" not in message, message
        if "truncated or damaged" in message:
            assert any("OSError" in r.getMessage() or "Error" in r.getMessage() for r in caplog.records)
