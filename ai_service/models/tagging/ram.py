"""An ONNX tagger in the layout of a RAM++ (Recognize Anything Plus) export: image -> one score per tag of its
own list, with English and Chinese names and per-tag thresholds as the recognize-anything repository ships them.

Layout (``<model_dir>/tagging/<name>/``)::

    visual/model.onnx            input "image" (or the lone input) N x 3 x S x S float32; output N x C
    ram_tag_list.txt             C English tags, one per line (recognize-anything's ram/data/ file)
    ram_tag_list_chinese.txt     C Chinese names, same order
    ram_tag_list_threshold.txt   optional: C thresholds on the sigmoid score (RAM's calibrated ones)
    config.json                  optional: {"image_size": 384, "mean": [...], "std": [...],
                                            "output": "logits" | "probabilities", "threshold": 0.68}

recognize-anything's own transform is a plain resize to 384 x 384, ToTensor and ImageNet's mean/std,
which are the defaults here; its heads output logits and tag where ``sigmoid(logit) > threshold`` with
0.68 as RAM++'s default threshold. An export that already applies the sigmoid says
``"output": "probabilities"``. (Exports that bake the thresholds in and output 0/1 also work, as
probabilities, but their scores carry no ranking.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ai_service.models.base import ModelLoadError
from ai_service.runtime.onnx import SessionOptions, create_session

TAGS_EN = "ram_tag_list.txt"
TAGS_ZH = "ram_tag_list_chinese.txt"
THRESHOLDS = "ram_tag_list_threshold.txt"
CONFIG = "config.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_THRESHOLD = 0.68  # RAM++'s default class threshold


def _lines(path: Path, what: str) -> list[str]:
    try:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as exc:
        raise ModelLoadError(f"{what}: cannot read {path.name}: {exc.strerror or exc}") from None


def _config(folder: Path, what: str) -> dict[str, Any]:
    path = folder / CONFIG
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{what}: {CONFIG} is not readable JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{what}: {CONFIG} must hold an object")
    return data


class RamTagger:
    """Thread-safe: preprocessing keeps no state and ONNX Runtime sessions accept concurrent ``run``."""

    def __init__(self, name: str, folder: Path, options: SessionOptions) -> None:
        what = f"tagging model '{name}'"
        config = _config(folder, what)
        english, chinese = _lines(folder / TAGS_EN, what), _lines(folder / TAGS_ZH, what)
        if not english or len(english) != len(chinese):
            raise ModelLoadError(f"{what}: {TAGS_EN} has {len(english)} tags, {TAGS_ZH} {len(chinese)}")
        self.names: list[tuple[str, str]] = list(zip(english, chinese, strict=True))
        self.thresholds = self._thresholds(folder, config, len(english), what)
        self.logits = config.get("output", "logits") == "logits"
        self.input_size = int(config.get("image_size", 384))
        self._mean = np.asarray(config.get("mean", IMAGENET_MEAN), np.float32).reshape(3, 1, 1)
        self._std = np.asarray(config.get("std", IMAGENET_STD), np.float32).reshape(3, 1, 1)
        self.session = create_session(folder / "visual" / "model.onnx", options)
        inputs = self.session.get_inputs()
        spec = next((i for i in inputs if i.name == "image"), inputs[0] if len(inputs) == 1 else None)
        if spec is None:
            raise ModelLoadError(f"{what}: the ONNX model has no 'image' input")
        self._input = spec.name
        classes = self.session.get_outputs()[0].shape[-1]
        if isinstance(classes, int) and classes != len(english):
            raise ModelLoadError(f"{what}: the ONNX model scores {classes} tags but {TAGS_EN} lists {len(english)}")

    @staticmethod
    def _thresholds(folder: Path, config: dict[str, Any], count: int, what: str) -> np.ndarray:
        default = float(config.get("threshold", DEFAULT_THRESHOLD))
        if not (folder / THRESHOLDS).is_file():
            return np.full(count, default, np.float32)
        try:
            values = [float(v) for v in _lines(folder / THRESHOLDS, what)]
        except ValueError:
            raise ModelLoadError(f"{what}: {THRESHOLDS} holds something other than numbers") from None
        if len(values) != count:
            raise ModelLoadError(f"{what}: {THRESHOLDS} has {len(values)} values for {count} tags")
        return np.asarray(values, np.float32)

    def preprocess(self, rgb: np.ndarray) -> np.ndarray:
        size = self.input_size
        image = Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR)
        chw = np.asarray(image, np.float32).transpose(2, 0, 1) / 255.0
        return (chw - self._mean) / self._std

    def scores(self, rgb: np.ndarray) -> np.ndarray:
        """One image -> C scores in [0, 1] (sigmoid of the logits, or the export's probabilities)."""
        out = np.asarray(self.session.run(None, {self._input: self.preprocess(rgb)[None]})[0], np.float32)
        row = out.reshape(-1)
        if row.shape[0] != len(self.names):
            raise ModelLoadError(f"the tagging model returned {row.shape[0]} scores for {len(self.names)} tags")
        return 1.0 / (1.0 + np.exp(-row)) if self.logits else row
