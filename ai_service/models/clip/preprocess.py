"""CLIP image preprocessing, read from ``visual/preprocess_cfg.json`` (OpenCLIP's ``PreprocessCfg``).

``resize_mode``:

* ``shortest`` (default, what Immich's ML service always does): resize the shorter side to ``size``,
  then center-crop a ``size`` x ``size`` square.
* ``squash``: resize straight to ``size`` x ``size``, ignoring the aspect ratio. Chinese-CLIP was
  trained this way (``cn_clip.clip.image_transform`` is ``Resize((size, size))``), so the cn-clip
  exporter writes ``squash``.
* ``longest``: resize the longer side to ``size`` and pad to a square (OpenCLIP's option; padding
  with black like OpenCLIP's ``ResizeKeepRatio`` + ``CenterCrop`` with fill 0).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
_RESIZE_MODES = ("shortest", "squash", "longest")
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True, slots=True)
class PreprocessConfig:
    size: int
    mean: tuple[float, float, float] = _OPENAI_MEAN
    std: tuple[float, float, float] = _OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], default_size: int | None = None) -> PreprocessConfig:
        size = data.get("size", default_size)
        if isinstance(size, Sequence) and not isinstance(size, str):
            # OpenCLIP writes [H, W]; CLIP inputs are square, anything else is a layout we do not know.
            if len(size) != 2 or size[0] != size[1]:
                raise ValueError(f"preprocess_cfg size {size!r} is not a square")
            size = size[0]
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"preprocess_cfg has no usable 'size' (got {size!r})")
        mean = _triple(data.get("mean", _OPENAI_MEAN), "mean")
        std = _triple(data.get("std", _OPENAI_STD), "std")
        if any(s <= 0 for s in std):
            raise ValueError(f"preprocess_cfg std must be positive, got {std}")
        interpolation = str(data.get("interpolation", "bicubic")).lower()
        if interpolation not in _FILTERS:
            raise ValueError(f"preprocess_cfg interpolation {interpolation!r} is not one of {sorted(_FILTERS)}")
        resize_mode = str(data.get("resize_mode", "shortest")).lower()
        if resize_mode not in _RESIZE_MODES:
            raise ValueError(f"preprocess_cfg resize_mode {resize_mode!r} is not one of {_RESIZE_MODES}")
        return cls(size, mean, std, interpolation, resize_mode)

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": [self.size, self.size],
            "mode": "RGB",
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
            "fill_color": 0,
        }


def _triple(value: Any, what: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"preprocess_cfg {what} must have 3 values, got {value!r}")
    return values  # type: ignore[return-value]


class ImagePreprocessor:
    """RGB uint8 H x W x 3 -> float32 3 x size x size, normalised. Stateless apart from constants: thread-safe."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg
        self.size = cfg.size
        self._filter = _FILTERS[cfg.interpolation]
        std = np.asarray(cfg.std, np.float32)
        # (x / 255 - mean) / std folded into one multiply-add per pixel.
        self._scale = (1.0 / (255.0 * std)).astype(np.float32)
        self._offset = (np.asarray(cfg.mean, np.float32) / std).astype(np.float32)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB uint8 H x W x 3 array, got {image.dtype} {image.shape}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError("image has zero width or height")
        pixels = np.asarray(self._resize(Image.fromarray(image, "RGB")), dtype=np.float32)
        pixels *= self._scale
        pixels -= self._offset
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def _resize(self, img: Image.Image) -> Image.Image:
        size = self.size
        width, height = img.size
        mode = self.cfg.resize_mode
        if mode == "squash":
            return img if (width, height) == (size, size) else img.resize((size, size), self._filter)
        if mode == "longest":
            scale = size / max(width, height)
            new = (max(1, round(width * scale)), max(1, round(height * scale)))
            if new != (width, height):
                img = img.resize(new, self._filter)
            canvas = Image.new("RGB", (size, size), (0, 0, 0))
            canvas.paste(img, ((size - new[0]) // 2, (size - new[1]) // 2))
            return canvas
        # shortest: torchvision's Resize(size) + CenterCrop(size) arithmetic (long side truncated),
        # which is what OpenCLIP trained with and what Immich's resize_pil/crop_pil reproduce.
        new = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
        if new != (width, height):
            img = img.resize(new, self._filter)
        left = round((new[0] - size) / 2.0)
        top = round((new[1] - size) / 2.0)
        return img.crop((left, top, left + size, top + size))
