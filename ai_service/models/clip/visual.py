"""CLIP image encoder: ``visual/model.onnx`` + ``visual/preprocess_cfg.json`` in Immich's layout.

The graph takes NCHW float32 ``image`` and its first output's rows are the embeddings (Immich reads
``[0][0]``). Whether the graph normalises or not, rows are L2-normalised here.

Concurrent ``encode_image`` calls are batched into one ONNX Runtime run when the session options
turn batching on (:mod:`ai_service.runtime.batching`): preprocessing and normalisation stay in each
caller's thread, only the graph runs once for the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ai_service.models.base import ModelLoadError
from ai_service.models.clip.common import check_embedding_size, config_embed_dim, l2_normalize, read_json
from ai_service.models.clip.preprocess import ImagePreprocessor, PreprocessConfig
from ai_service.runtime.batching import MicroBatcher, make_batcher
from ai_service.runtime.onnx import SessionOptions, create_session

PREPROCESS_FILE = "preprocess_cfg.json"


class ClipVisualEncoder:
    """Thread-safe: preprocessing keeps no state and ONNX Runtime sessions accept concurrent ``run``."""

    def __init__(self, name: str, model_dir: Path, config: dict[str, Any], options: SessionOptions) -> None:
        self.name = name
        what = self._what = f"clip model '{name}' (visual)"
        folder = model_dir / "visual"
        vision_cfg = config.get("vision_cfg") or {}
        default_size = vision_cfg.get("image_size") if isinstance(vision_cfg, dict) else None
        try:
            cfg = PreprocessConfig.from_dict(read_json(folder / PREPROCESS_FILE, what), default_size)
        except ValueError as exc:
            raise ModelLoadError(f"{what}: {exc}") from None
        self.preprocessor = ImagePreprocessor(cfg)
        self.input_size: int = cfg.size

        self.session = create_session(folder / "model.onnx", options)
        inputs = self.session.get_inputs()
        by_name = {i.name: i for i in inputs}
        # Immich's exports and cn-clip's official ones call it "image"; accept a lone input of any name.
        spec = by_name.get("image") or (inputs[0] if len(inputs) == 1 else None)
        if spec is None:
            raise ModelLoadError(f"{what}: the ONNX model has no 'image' input (inputs: {sorted(by_name)})")
        if len(spec.shape) != 4:
            raise ModelLoadError(f"{what}: input '{spec.name}' has shape {spec.shape}, expected N x 3 x H x W")
        height, width = spec.shape[2], spec.shape[3]
        if isinstance(height, int) and isinstance(width, int) and (height, width) != (cfg.size, cfg.size):
            raise ModelLoadError(
                f"{what}: the ONNX model takes {height}x{width} images but {PREPROCESS_FILE} says size {cfg.size}"
            )
        self._input_name = spec.name
        # Graphs traced without a dynamic batch axis take exactly that many images per run.
        self.max_batch: int | None = spec.shape[0] if isinstance(spec.shape[0], int) else None
        self.embedding_size: int = check_embedding_size(
            self.session,
            config_embed_dim(config),
            lambda: self._run_chunked(np.zeros((1, 3, cfg.size, cfg.size), np.float32)),
            what,
        )
        self.batcher: MicroBatcher[np.ndarray, np.ndarray] | None = make_batcher(
            options.batching, self.session, self._run_rows, fixed_batch=self.max_batch, name=what
        )

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """RGB uint8 H x W x 3 -> float32 3 x size x size, as the graph expects it."""
        return self.preprocessor(image)

    def _run_raw(self, batch: np.ndarray) -> np.ndarray:
        out = self.session.run(None, {self._input_name: batch})[0]
        return np.asarray(out).reshape(batch.shape[0], -1)

    def _run_chunked(self, batch: np.ndarray) -> np.ndarray:
        """N x 3 x S x S -> N x D raw rows; a graph with a fixed batch axis is fed full chunks of it."""
        step = self.max_batch
        if step is None:
            return self._run_raw(batch)
        rows = []
        for start in range(0, len(batch), step):
            chunk = batch[start : start + step]
            count = len(chunk)
            if count < step:  # a fixed batch axis needs a full batch: pad, then drop the padding rows
                chunk = np.concatenate([chunk, np.zeros((step - count, *chunk.shape[1:]), chunk.dtype)])
            rows.append(self._run_raw(chunk)[:count])
        return np.concatenate(rows)

    def _run_rows(self, tensors: list[np.ndarray]) -> list[np.ndarray]:
        # The batcher's call: one graph run for every queued image; rows go back un-normalised so that a
        # broken row fails only the request it belongs to (normalised in that request's thread).
        return list(self._run_chunked(np.stack(tensors)))

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed N x 3 x size x size float32 -> N x D L2-normalised float32."""
        return l2_normalize(self._run_chunked(batch), self._what)

    def encode_image(self, image: np.ndarray) -> np.ndarray:
        """One RGB uint8 image -> L2-normalised float32 vector of ``embedding_size``."""
        tensor = self.preprocess(image)
        row = self._run_chunked(tensor[None])[0] if self.batcher is None else self.batcher.submit(tensor)
        return l2_normalize(row[None], self._what)[0]

    def encode_images(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Several images -> N x D in one ONNX run (chunked for a fixed batch axis); never waits for others."""
        if not images:
            return np.zeros((0, self.embedding_size), np.float32)
        return self.run(np.stack([self.preprocess(image) for image in images]))
