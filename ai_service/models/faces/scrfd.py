"""SCRFD face detector (InsightFace ``det_10g`` / ``det_2.5g`` / ``det_500m`` / ``scrfd_10g_bnkps``).

Reproduces InsightFace's ``RetinaFace.detect`` (which Immich used until 3.1 and re-implemented in
numpy with the same numbers), so boxes match Immich's for the same model and image:

1. letterbox: resize (bilinear) to fit the 640x640 input keeping the aspect ratio, truncating the
   scaled side to an integer, and pad bottom/right with black;
2. RGB, ``(x - 127.5) / 128``, NCHW float32;
3. per stride (8, 16, 32 [, 64, 128]): anchor centres at ``(x * stride, y * stride)`` on the feature
   grid, ``num_anchors`` per location; keep anchors with ``score >= min_score``; boxes and landmarks
   are distances (in strides) from the centre;
4. sort by score (descending), then NMS at IoU 0.4 (InsightFace's ``+1`` pixel area convention),
   highest score first; equal scores resolve as in InsightFace, which sorts twice;
5. divide by the letterbox scale: pixels of the original image, unclipped.

Output heads are matched to (kind, stride) from the arrays' shapes (last dim 1 / 4 / 10 = score /
box / landmarks; rows = grid cells x anchors), so both output orders found in InsightFace models
(grouped by kind then stride, as in ``det_10g``; or by stride then kind) and batched 3-D outputs
work without per-model configuration.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import cv2
import numpy as np
import onnxruntime as ort

from ai_service.models.base import FaceDetections, ModelLoadError

DEFAULT_INPUT_SIZE = 640
NMS_THRESHOLD = 0.4
INPUT_MEAN = 127.5
INPUT_STD = 128.0

# Number of outputs -> (strides, anchors per location, has landmarks), as in InsightFace.
_LAYOUTS: dict[int, tuple[tuple[int, ...], int, bool]] = {
    6: ((8, 16, 32), 2, False),
    9: ((8, 16, 32), 2, True),
    10: ((8, 16, 32, 64, 128), 1, False),
    15: ((8, 16, 32, 64, 128), 1, True),
}
_KINDS = {1: "score", 4: "bbox", 10: "kps"}


@dataclass(frozen=True, slots=True)
class Letterbox:
    image: np.ndarray  # in_h x in_w x 3 uint8
    scale: float  # resized / original


def letterbox(image: np.ndarray, input_w: int, input_h: int) -> Letterbox:
    """InsightFace's resize-and-pad (top-left aligned)."""
    height, width = image.shape[:2]
    im_ratio = height / width
    model_ratio = input_h / input_w
    if im_ratio > model_ratio:
        new_h = input_h
        new_w = max(1, int(new_h / im_ratio))
    else:
        new_w = input_w
        new_h = max(1, int(new_w * im_ratio))
    scale = new_h / height
    canvas = np.zeros((input_h, input_w, 3), np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(image, (new_w, new_h))
    return Letterbox(canvas, scale)


def to_blob(image: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 RGB -> 1 x 3 x H x W float32, ``(x - 127.5) / 128``."""
    blob = (image.astype(np.float32) - INPUT_MEAN) / INPUT_STD
    return np.ascontiguousarray(blob.transpose(2, 0, 1)[None])


def anchor_centers(height: int, width: int, stride: int, num_anchors: int) -> np.ndarray:
    """(height * width * num_anchors) x 2 centres (x, y), row-major over the grid, anchors innermost."""
    centers = np.stack(np.mgrid[:height, :width][::-1], axis=-1).astype(np.float32)
    centers = (centers * stride).reshape(-1, 2)
    if num_anchors > 1:
        centers = np.repeat(centers, num_anchors, axis=0)
    return centers


def distance2bbox(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    return np.stack(
        [
            points[:, 0] - distance[:, 0],
            points[:, 1] - distance[:, 1],
            points[:, 0] + distance[:, 2],
            points[:, 1] + distance[:, 3],
        ],
        axis=-1,
    )


def distance2kps(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """N x 2K distances -> N x K x 2 points."""
    n_points = distance.shape[1] // 2
    offsets = distance.reshape(-1, n_points, 2)
    return points[:, None, :] + offsets


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float = NMS_THRESHOLD) -> np.ndarray:
    """Indices kept, highest score first (InsightFace's greedy NMS, ``+1`` area convention)."""
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep: list[int] = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        xx1 = np.maximum(x1[i], x1[rest])
        yy1 = np.maximum(y1[i], y1[rest])
        xx2 = np.minimum(x2[i], x2[rest])
        yy2 = np.minimum(y2[i], y2[rest])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        # Degenerate (negative-size) boxes from an untrained or broken model can make the union 0.
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-12)
        order = rest[iou <= threshold]
    return np.asarray(keep, np.int64)


class ScrfdDetector:
    """An SCRFD ONNX session behind :class:`~ai_service.models.base.FaceDetectorModel`."""

    def __init__(
        self,
        session: ort.InferenceSession,
        input_size: int = DEFAULT_INPUT_SIZE,
        nms_threshold: float = NMS_THRESHOLD,
    ) -> None:
        self.session = session
        inputs = session.get_inputs()
        outputs = session.get_outputs()
        if len(inputs) != 1:
            raise ModelLoadError(f"SCRFD model must have one input, has {len(inputs)}")
        if len(outputs) not in _LAYOUTS:
            raise ModelLoadError(
                f"SCRFD model must have 6, 9, 10 or 15 outputs (score/box/landmark heads), has {len(outputs)}"
            )
        self.input_name = inputs[0].name
        shape = inputs[0].shape
        if len(shape) != 4:
            raise ModelLoadError(f"SCRFD input must be N x 3 x H x W, is {shape}")
        # A model with a fixed input size wins over the default, as in InsightFace's prepare().
        fixed = isinstance(shape[2], int) and isinstance(shape[3], int) and shape[2] > 0 and shape[3] > 0
        self.input_h, self.input_w = (int(shape[2]), int(shape[3])) if fixed else (input_size, input_size)
        self.output_names = [o.name for o in outputs]
        self.strides, self.num_anchors, self.use_kps = _LAYOUTS[len(outputs)]
        self.nms_threshold = nms_threshold
        # Anchor grids depend only on the input size; filled once, read-only afterwards.
        self._centers = {
            s: anchor_centers(self.input_h // s, self.input_w // s, s, self.num_anchors) for s in self.strides
        }
        self._heads_lock = threading.Lock()
        self._heads: dict[tuple[tuple[int, ...], ...], dict[tuple[str, int], int]] = {}

    def detect(self, image: np.ndarray, min_score: float) -> FaceDetections:
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"expected an RGB H x W x 3 image, got shape {image.shape}")
        boxed = letterbox(np.ascontiguousarray(image, dtype=np.uint8), self.input_w, self.input_h)
        outputs = self.session.run(self.output_names, {self.input_name: to_blob(boxed.image)})
        heads = [o[0] if o.ndim == 3 else o for o in outputs]  # batched exports: 1 x rows x k
        index = self._head_index(heads)

        scores_list: list[np.ndarray] = []
        boxes_list: list[np.ndarray] = []
        kps_list: list[np.ndarray] = []
        for stride in self.strides:
            scores = heads[index["score", stride]].reshape(-1)
            keep = np.nonzero(scores >= min_score)[0]
            if keep.size == 0:
                continue
            centers = self._centers[stride][keep]
            distances = heads[index["bbox", stride]].reshape(-1, 4)[keep] * stride
            scores_list.append(scores[keep])
            boxes_list.append(distance2bbox(centers, distances))
            if self.use_kps:
                kps = heads[index["kps", stride]].reshape(-1, 10)[keep] * stride
                kps_list.append(distance2kps(centers, kps))
        if not scores_list:
            return FaceDetections(
                boxes=np.zeros((0, 4), np.float32),
                scores=np.zeros(0, np.float32),
                landmarks=np.zeros((0, 5, 2), np.float32) if self.use_kps else None,
            )
        scores = np.concatenate(scores_list).astype(np.float32)
        # Sorted by score before NMS, as InsightFace's SCRFD.detect does (``argsort()[::-1]``, then NMS sorts
        # again): with equal scores the two sorts decide which box survives, so skipping this one keeps a
        # different set of faces than Immich's reference for the same model and image.
        order = scores.argsort()[::-1]
        scores = scores[order]
        boxes = (np.concatenate(boxes_list) / boxed.scale).astype(np.float32)[order]
        keep = nms(boxes, scores, self.nms_threshold)
        landmarks = None
        if self.use_kps:
            landmarks = (np.concatenate(kps_list) / boxed.scale).astype(np.float32)[order][keep]
        return FaceDetections(boxes=boxes[keep], scores=scores[keep], landmarks=landmarks)

    def _head_index(self, heads: list[np.ndarray]) -> dict[tuple[str, int], int]:
        """Which output is which (kind, stride), from the output shapes; cached per shape set."""
        key = tuple(h.shape for h in heads)
        cached = self._heads.get(key)
        if cached is not None:
            return cached
        rows_to_stride = {(self.input_h // s) * (self.input_w // s) * self.num_anchors: s for s in self.strides}
        index: dict[tuple[str, int], int] = {}
        for i, head in enumerate(heads):
            kind = _KINDS.get(head.shape[-1]) if head.ndim == 2 else None
            stride = rows_to_stride.get(head.shape[0]) if head.ndim == 2 else None
            if kind is None or stride is None or (kind, stride) in index:
                raise ModelLoadError(
                    f"SCRFD output {self.output_names[i]!r} has shape {head.shape}; expected rows in "
                    f"{sorted(rows_to_stride)} and 1, 4 or 10 columns, one per (kind, stride)"
                )
            index[kind, stride] = i
        needed = {(k, s) for s in self.strides for k in ("score", "bbox", "kps") if k != "kps" or self.use_kps}
        if set(index) != needed:
            raise ModelLoadError(f"SCRFD outputs do not cover every stride: found {sorted(index)}")
        with self._heads_lock:
            self._heads[key] = index
        return index
