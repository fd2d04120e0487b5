"""OCR: PP-OCR text detection (DB) + recognition (CTC) on ONNX Runtime, with Immich's semantics.

The bundled model is the one shipped inside the ``rapidocr`` 3.x wheel (a hard dependency):
PP-OCRv6 small detection + recognition, whose character dictionary (18 708 Chinese, Latin, digit
and punctuation symbols) is embedded in the recogniser's ONNX metadata. It reads Chinese and
English, so the names Immich sends for its PP-OCRv5 Chinese/English models are served by it.

Why not call ``rapidocr.RapidOCR`` directly: it creates its own ONNX sessions (bypassing the
service's provider/thread choice), upscales every image to a 736-px *shorter* side, and takes
per-request thresholds by mutating the shared engine (``update_params``), which races when two
requests with different thresholds run at once. Instead the sessions are opened here through
:func:`ai_service.runtime.onnx.create_session`, and only rapidocr's stateless pieces are reused:
``DBPostProcess`` (a fresh one per request, so ``box_thresh`` is a local), ``CTCLabelDecode``
(immutable after construction) and the perspective crop.

Models in the folder layout ``<model_dir>/ocr/<name>/{detection,recognition}/model.onnx`` are
served too (for example a recogniser Immich downloaded for another language); the recogniser's
dictionary comes from its ONNX metadata or a ``*.txt`` next to it, and a missing detector falls
back to the bundled one (detection is script-agnostic).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
from rapidocr.ch_ppocr_det.utils import DBPostProcess
from rapidocr.ch_ppocr_rec.utils import CTCLabelDecode
from rapidocr.utils.process_img import get_rotate_crop_image

from ai_service.models.base import ModelLoadError, ModelNotInstalledError, TextDetections, TextLines
from ai_service.models.store import MODEL_FILE, ModelStore
from ai_service.protocol.immich import DEFAULT_OCR_MAX_RESOLUTION, ModelTask, ModelType
from ai_service.protocol.reading_order import reading_order
from ai_service.runtime.onnx import ALLOW_SPINNING_KEY, SessionOptions, create_session, shrink_arena_run_options
from ai_service.settings import AIServiceSettings

log = logging.getLogger(__name__)

BUNDLED_NAME = "PP-OCRv6_small"
COMPONENT = "pipeline"  # detection and recognition are served by one loaded object

# Names Immich's OCR settings offer for Chinese/English; the bundled model reads both scripts
# and scores higher than PP-OCRv5 mobile and server on the project's OCR set.
ALIASES: dict[str, str] = {
    "PP-OCRv5_mobile": BUNDLED_NAME,
    "PP-OCRv5_server": BUNDLED_NAME,
    "CH__PP-OCRv5_mobile": BUNDLED_NAME,
    "CH__PP-OCRv5_server": BUNDLED_NAME,
    "EN__PP-OCRv5_mobile": BUNDLED_NAME,
}

_BUNDLED_DET = "PP-OCRv6_det_small.onnx"
_BUNDLED_REC = "PP-OCRv6_rec_small.onnx"
_BUNDLED_CLS = "ch_ppocr_mobile_v2.0_cls_mobile.onnx"

# Immich's detection defaults (also what its server sends): DB threshold, unclip, dilation.
_DB_THRESH = 0.3
_DB_UNCLIP_RATIO = 1.6
_DB_MAX_CANDIDATES = 1000
_DET_MULTIPLE = 32  # the DB network downsamples by 32
# Bounds on the detector's work, whatever the image's aspect ratio (AIServiceSettings documents them).
# Immich's rule scales only the *shorter* side, so a 100000x1000 image meant a 736x73600 detector input
# (over 8 GB); a 20:1 panorama preview (28800x1440) 736x14720 (2.2 GB).
DEFAULT_MAX_RESOLUTION_CEILING = 2048
DEFAULT_DET_MAX_SIDE = 2048
DEFAULT_DET_MAX_PIXELS = 16_000_000
# Tiles overlap by this much; each keeps the probability map up to the middle of the overlap, so every
# kept pixel was computed at least half an overlap (128 px) away from a tile edge it does not share
# with the image, and text that crosses a seam is joined by the one post-processing pass.
_DET_TILE_OVERLAP = 256

# Recogniser input: 48 px high, at least 320 wide; 6 crops per ONNX call, like Immich and RapidOCR.
_REC_HEIGHT = 48
_REC_MIN_WIDTH = 320
_REC_BATCH = 6
# A batch is as wide as its widest crop; crops are sorted by aspect ratio so batches stay tight,
# and the width is capped so one absurdly long box cannot allocate a huge tensor.
_REC_MAX_WIDTH = 48 * 80

# Angle classifier (0 vs 180 degrees), PaddleOCR's mobile v2.0 model.
_CLS_SHAPE = (48, 192)
_CLS_BATCH = 6
_CLS_THRESH = 0.9

# One OCR request alternates between two sessions (detector, then recogniser batches), so an idle session's
# spinning threads would steal the cores the running one needs: off measured ~8 % faster per image on 2 cores.


@dataclass(frozen=True, slots=True)
class DetectorLimits:
    """What one request may make the detector do; see AIServiceSettings.ocr_* for the reasoning."""

    max_resolution_ceiling: int = DEFAULT_MAX_RESOLUTION_CEILING  # larger maxResolution values are clamped
    max_side: int = DEFAULT_DET_MAX_SIDE  # detector inputs never exceed this on either side (else: tiles)
    max_pixels: int = DEFAULT_DET_MAX_PIXELS  # the resized image, all tiles together (else: scaled down)

    def __post_init__(self) -> None:
        if self.max_side % _DET_MULTIPLE or self.max_side < 2 * _DET_TILE_OVERLAP:
            raise ValueError(
                f"the OCR detector's largest side must be a multiple of {_DET_MULTIPLE} and at least "
                f"{2 * _DET_TILE_OVERLAP} px, got {self.max_side}"
            )
        if self.max_resolution_ceiling < _DET_MULTIPLE or self.max_pixels < _DET_MULTIPLE * _DET_MULTIPLE:
            raise ValueError("the OCR maxResolution ceiling and pixel bound must allow at least one 32-px cell")


@dataclass(frozen=True, slots=True)
class OcrModelFiles:
    detection: Path
    recognition: Path
    dictionary: Path | None = None  # None: the recogniser carries its characters in ONNX metadata


@functools.cache
def bundled_model_dir() -> Path | None:
    """The ``models`` folder of the installed rapidocr wheel, found without importing its engine."""
    spec = importlib.util.find_spec("rapidocr")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def bundled_files() -> OcrModelFiles | None:
    """PP-OCRv6 small from the rapidocr wheel, or None if the wheel lacks its model files."""
    root = bundled_model_dir()
    if root is None:
        return None
    files = OcrModelFiles(detection=root / _BUNDLED_DET, recognition=root / _BUNDLED_REC)
    return files if files.detection.is_file() and files.recognition.is_file() else None


def bundled_classifier() -> Path | None:
    root = bundled_model_dir()
    path = root / _BUNDLED_CLS if root is not None else None
    return path if path is not None and path.is_file() else None


# ---- the loaded model ------------------------------------------------------------------------------


class OcrPipeline:
    """Detection + recognition for one model; implements :class:`ai_service.models.base.OcrModel`.

    Thread-safe: ONNX Runtime sessions may be run concurrently, and every per-request value
    (thresholds, sizes) lives in locals, never on ``self``.
    """

    def __init__(
        self,
        det: ort.InferenceSession,
        rec: ort.InferenceSession,
        characters: list[str],
        cls: ort.InferenceSession | None = None,
        rec_batch: int = _REC_BATCH,
        det_bucket: int | None = None,
        limits: DetectorLimits | None = None,
        run_options: ort.RunOptions | None = None,
    ) -> None:
        self._det = det
        self._rec = rec
        self._cls = cls
        self._det_input = det.get_inputs()[0].name
        self._rec_input = rec.get_inputs()[0].name
        self._cls_input = cls.get_inputs()[0].name if cls is not None else ""
        # CTCLabelDecode inserts the blank and space symbols into the list it is given: pass a copy.
        self._decoder = CTCLabelDecode(character=list(characters))
        self._rec_batch = max(1, rec_batch)
        self._det_bucket = resolve_det_bucket(det_bucket, det)
        self._limits = limits or DetectorLimits()
        self._run_options = run_options  # None: ONNX Runtime's defaults (the arena keeps its peak)
        n_classes = rec.get_outputs()[0].shape[-1]
        if isinstance(n_classes, int) and n_classes != len(self._decoder.character):
            raise ModelLoadError(
                f"the recogniser predicts {n_classes} classes but its dictionary has "
                f"{len(self._decoder.character)} (with blank and space): wrong dictionary for this model"
            )

    # ---- detection -------------------------------------------------------------------------------

    def detect(self, image: np.ndarray, min_score: float, max_resolution: int | None) -> TextDetections:
        h, w = image.shape[:2]
        empty = TextDetections(np.zeros((0, 4, 2), np.float32), np.zeros(0, np.float32))
        if h < 2 or w < 2:
            return empty
        max_res = DEFAULT_OCR_MAX_RESOLUTION if max_resolution is None else max_resolution
        # Clamped, not refused: Immich sends whatever its admin typed, and a refusal would fail every OCR job.
        prob = self._det_probabilities(image, min(max_res, self._limits.max_resolution_ceiling))
        # A fresh post-processor per call: box_thresh is this request's value, nothing shared changes.
        post = DBPostProcess(
            thresh=_DB_THRESH,
            box_thresh=min_score,
            max_candidates=_DB_MAX_CANDIDATES,
            unclip_ratio=_DB_UNCLIP_RATIO,
            use_dilation=True,
            score_mode="fast",
        )
        boxes, scores = post(prob, (h, w))
        if len(boxes) == 0:
            return empty
        quads = np.asarray(boxes, dtype=np.float32).reshape(-1, 4, 2)
        order = reading_order(quads[:, 0, 1], quads[:, 0, 0])  # by top-left corners
        return TextDetections(quads[order], np.asarray(scores, dtype=np.float32)[order])

    def _det_probabilities(self, image: np.ndarray, max_resolution: int) -> np.ndarray:
        """The DB probability map (1 x 1 x H' x W') for ``image`` resized per Immich's rule and this
        service's bounds: at most ``max_pixels`` in all, computed in tiles of at most ``max_side``."""
        h, w = image.shape[:2]
        rh, rw = bounded_input_size(h, w, max_resolution, self._limits.max_pixels)
        if (rh, rw) != (h, w):
            # INTER_AREA when shrinking keeps thin strokes (bilinear skips pixels); linear otherwise.
            shrink = rh < h and rw < w
            image = cv2.resize(image, (rw, rh), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        spans_y = tile_spans(rh, self._limits.max_side, _DET_TILE_OVERLAP)
        spans_x = tile_spans(rw, self._limits.max_side, _DET_TILE_OVERLAP)
        if len(spans_y) == len(spans_x) == 1:
            return self._det_run(image)
        prob = np.empty((1, 1, rh, rw), np.float32)
        for ty in spans_y:
            for tx in spans_x:
                tile = self._det_run(image[ty.start : ty.stop, tx.start : tx.stop])
                prob[..., ty.kept, tx.kept] = tile[..., ty.kept_in_tile, tx.kept_in_tile]
        return prob

    def _det_run(self, image: np.ndarray) -> np.ndarray:
        """One detector call on an already resized image (sides multiples of 32): 1 x 1 x H x W probabilities."""
        rh, rw = image.shape[:2]
        tensor = _to_tensor(image)
        if self._det_bucket:
            # A GPU provider compiles (picks kernels, builds engines) per input shape: padding to a bucket
            # keeps the set of shapes small. The pad is 0 in the network's input space (mid-grey), what its
            # own first convolution pads with; the probability map is cropped back before post-processing.
            # Not bit-identical: the detector's squeeze-and-excitation blocks average over the whole input,
            # padding included (on the OCR set: same recall, boxes within 4 px), hence off on CPUs by default.
            ph, pw = bucketed_size(rh, rw, self._det_bucket)
            if (ph, pw) != (rh, rw):
                padded = np.zeros((1, 3, ph, pw), np.float32)
                padded[:, :, :rh, :rw] = tensor
                tensor = padded
        out = self._det.run(None, {self._det_input: tensor}, self._run_options)[0]
        return np.asarray(out, dtype=np.float32)[..., :rh, :rw]

    # ---- recognition -----------------------------------------------------------------------------

    def recognize(self, image: np.ndarray, detections: TextDetections, min_score: float) -> TextLines:
        quads = np.asarray(detections.quads, dtype=np.float32).reshape(-1, 4, 2)
        box_scores = np.asarray(detections.scores, dtype=np.float32).reshape(-1)
        if len(quads) == 0:
            return TextLines(quads=quads, box_scores=box_scores, texts=[], text_scores=np.zeros(0, np.float32))
        # Crops come from the image as given (full resolution), not from the detector's resized copy.
        crops = [_crop(image, quad) for quad in quads]
        if self._cls is not None:
            crops = self._upright(crops)
        texts, text_scores = self._read(crops)
        # Immich keeps textScore > minScore; empty strings never count as text.
        keep = [i for i, (t, s) in enumerate(zip(texts, text_scores, strict=True)) if s > min_score and t.strip()]
        return TextLines(
            quads=quads[keep],
            box_scores=box_scores[keep],
            texts=[texts[i] for i in keep],
            text_scores=np.asarray([text_scores[i] for i in keep], dtype=np.float32),
        )

    def _read(self, crops: list[np.ndarray]) -> tuple[list[str], list[float]]:
        ratios = np.array([c.shape[1] / max(1, c.shape[0]) for c in crops])
        order = np.argsort(ratios, kind="stable")
        texts: list[str] = [""] * len(crops)
        scores: list[float] = [0.0] * len(crops)
        for start in range(0, len(order), self._rec_batch):
            idx = order[start : start + self._rec_batch]
            width = int(min(_REC_MAX_WIDTH, max(_REC_MIN_WIDTH, math.ceil(_REC_HEIGHT * ratios[idx].max()))))
            batch = np.stack([_rec_input(crops[i], width) for i in idx])
            preds = self._rec.run(None, {self._rec_input: batch}, self._run_options)[0]
            results, _ = self._decoder(preds)
            for i, (text, score) in zip(idx, results, strict=True):
                texts[i] = text
                scores[i] = float(score)
        return texts, scores

    def _upright(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        """Turn crops the angle classifier is sure are upside down (a 180-degree sign in a photo)."""
        assert self._cls is not None
        out = list(crops)
        for start in range(0, len(crops), _CLS_BATCH):
            idx = range(start, min(len(crops), start + _CLS_BATCH))
            batch = np.stack([_cls_input(crops[i]) for i in idx])
            probs = self._cls.run(None, {self._cls_input: batch}, self._run_options)[0]
            for i, p in zip(idx, probs, strict=True):
                if int(np.argmax(p)) == 1 and float(p[1]) > _CLS_THRESH:
                    out[i] = cv2.rotate(crops[i], cv2.ROTATE_180)
        return out


def detector_input_size(height: int, width: int, max_resolution: int) -> tuple[int, int]:
    """Immich's rule: scale the shorter side to ``max_resolution`` but never up, then round both
    sides to multiples of 32 (the network's stride), never below one 32-px cell."""
    ratio = min(1.0, max_resolution / min(height, width))

    def side(n: int) -> int:
        return max(_DET_MULTIPLE, round(int(n * ratio) / _DET_MULTIPLE) * _DET_MULTIPLE)

    return side(height), side(width)


def bounded_input_size(height: int, width: int, max_resolution: int, max_pixels: int) -> tuple[int, int]:
    """:func:`detector_input_size`, then scaled down uniformly (sides rounded down to multiples of 32)
    until it has at most ``max_pixels``: only extreme aspect ratios (over ~30:1 at maxResolution 736)
    get there, and their text shrinks no more than needed to keep time and memory bounded."""
    rh, rw = detector_input_size(height, width, max_resolution)
    if rh * rw <= max_pixels:
        return rh, rw
    factor = math.sqrt(max_pixels / (rh * rw))

    def side(n: int) -> int:
        return max(_DET_MULTIPLE, int(n * factor) // _DET_MULTIPLE * _DET_MULTIPLE)

    return side(rh), side(rw)


@dataclass(frozen=True, slots=True)
class TileSpan:
    """One tile along one axis: ``start:stop`` is fed to the detector, ``keep_start:keep_stop`` is kept."""

    start: int
    stop: int
    keep_start: int
    keep_stop: int

    @property
    def kept(self) -> slice:
        return slice(self.keep_start, self.keep_stop)

    @property
    def kept_in_tile(self) -> slice:
        return slice(self.keep_start - self.start, self.keep_stop - self.start)


def tile_spans(length: int, tile: int, overlap: int) -> list[TileSpan]:
    """Equal overlapping tiles of at most ``tile`` covering ``length``, as few as the overlap allows; each
    keeps up to the middle of its overlaps, so the kept parts cover ``length`` exactly once. With all three
    multiples of 32, so is every start and size (the network's stride: a tile sees the grid the whole would).
    """
    if length <= tile:
        return [TileSpan(0, length, 0, length)]
    count = math.ceil((length - overlap) / (tile - overlap))
    # Equal tiles, not full ones plus a sliver: 2080 px are two 1184-px tiles, not two of 2048.
    size = min(tile, _round_up(math.ceil((length + (count - 1) * overlap) / count), _DET_MULTIPLE))
    step = _round_up(math.ceil((length - size) / (count - 1)), _DET_MULTIPLE)  # <= size - overlap
    starts = sorted({min(i * step, length - size) for i in range(count)})
    spans: list[TileSpan] = []
    for i, start in enumerate(starts):
        keep_start = 0 if i == 0 else (start + starts[i - 1] + size) // 2
        keep_stop = length if i == len(starts) - 1 else (start + size + starts[i + 1]) // 2
        spans.append(TileSpan(start, start + size, keep_start, keep_stop))
    return spans


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# Immich's 1440-px previews of aspect ratios 1:1 to 2:1 at maxResolution 736: 47 detector shapes, 13 in 128-px buckets.
DEFAULT_GPU_DET_BUCKET = 128


def resolve_det_bucket(configured: int | None, det: ort.InferenceSession) -> int:
    """Detector input bucket in pixels (0: none). Unset: on a GPU provider 128, on the CPU none, since the CPU
    provider does not compile per shape and padding would only add pixels to compute."""
    if configured is not None:
        if configured % _DET_MULTIPLE:
            raise ValueError(f"the OCR detector bucket must be a multiple of {_DET_MULTIPLE} px, got {configured}")
        return configured
    providers = det.get_providers()
    return DEFAULT_GPU_DET_BUCKET if providers and providers[0] != "CPUExecutionProvider" else 0


def bucketed_size(height: int, width: int, bucket: int) -> tuple[int, int]:
    """``height`` x ``width`` rounded up to multiples of ``bucket`` (unchanged for 0)."""
    if bucket <= 0:
        return height, width
    return -(-height // bucket) * bucket, -(-width // bucket) * bucket


# INTER_CUBIC reads up to 2 px beyond a sample: a box is cut with this much context around it.
_CROP_MARGIN = 3
# OpenCV's warps refuse images with a side of 32767 px or more (SHRT_MAX), so a box is warped from its
# own neighbourhood, never from the whole image (a 100000 x 1000 strip is a valid image), and a box
# longer than this is shrunk first: the recogniser squeezes anything over 80:1 anyway.
_CROP_MAX_SIDE = 16384


def _crop(image: np.ndarray, quad: np.ndarray) -> np.ndarray:
    """Perspective-crop one quad (rapidocr's crop: cubic, replicated border, tall crops turned).

    Detections may come from a caller rather than this detector, so degenerate quads (under one
    pixel wide or high, or outside the image) yield a blank 1 x 1 crop, which reads as no text,
    instead of an OpenCV error.
    """
    blank = np.full((1, 1, 3), 255, dtype=np.uint8)
    width = max(np.linalg.norm(quad[0] - quad[1]), np.linalg.norm(quad[2] - quad[3]))
    height = max(np.linalg.norm(quad[0] - quad[3]), np.linalg.norm(quad[1] - quad[2]))
    if width < 1 or height < 1 or not np.isfinite(quad).all():
        return blank
    h, w = image.shape[:2]
    x0, y0 = (max(0, int(v) - _CROP_MARGIN) for v in np.floor(quad.min(axis=0)))
    x1, y1 = (min(limit, int(v) + _CROP_MARGIN + 1) for v, limit in zip(np.ceil(quad.max(axis=0)), (w, h), strict=True))
    if x1 <= x0 or y1 <= y0:
        return blank
    region = image[y0:y1, x0:x1]
    local = (quad - np.array([x0, y0], dtype=np.float32)).astype(np.float32)
    longest = max(region.shape[:2])
    if longest > _CROP_MAX_SIDE:
        factor = _CROP_MAX_SIDE / longest
        size = (max(1, round(region.shape[1] * factor)), max(1, round(region.shape[0] * factor)))
        region = cv2.resize(region, size, interpolation=cv2.INTER_AREA)
        local = local * np.float32(factor)
    return np.ascontiguousarray(get_rotate_crop_image(region, local))


def _to_tensor(image: np.ndarray) -> np.ndarray:
    """RGB uint8 H x W x 3 -> 1 x 3 x H x W float32 in [-1, 1], channels in BGR order.

    PaddleOCR models are trained on OpenCV-decoded (BGR) images; RapidOCR and Immich feed BGR too.
    """
    chw = image[:, :, ::-1].transpose(2, 0, 1).astype(np.float32)
    chw *= 1.0 / 127.5
    chw -= 1.0
    return chw[np.newaxis]


def _rec_input(crop: np.ndarray, width: int) -> np.ndarray:
    """One crop -> 3 x 48 x ``width`` float32 in [-1, 1] (BGR), aspect kept, right-padded with 0."""
    h, w = crop.shape[:2]
    resized_w = max(1, min(width, math.ceil(_REC_HEIGHT * w / max(1, h))))
    resized = cv2.resize(crop, (resized_w, _REC_HEIGHT), interpolation=cv2.INTER_LINEAR)
    out = np.zeros((3, _REC_HEIGHT, width), dtype=np.float32)
    out[:, :, :resized_w] = _to_tensor(resized)[0]
    return out


def _cls_input(crop: np.ndarray) -> np.ndarray:
    height, max_w = _CLS_SHAPE
    h, w = crop.shape[:2]
    resized_w = max(1, min(max_w, math.ceil(height * w / max(1, h))))
    resized = cv2.resize(crop, (resized_w, height), interpolation=cv2.INTER_LINEAR)
    out = np.zeros((3, height, max_w), dtype=np.float32)
    out[:, :, :resized_w] = _to_tensor(resized)[0]
    return out


# ---- loading -------------------------------------------------------------------------------------


def read_characters(rec: ort.InferenceSession, dictionary: Path | None) -> list[str]:
    """The recogniser's symbols: a dictionary file if given, else the ``character`` ONNX metadata.

    PaddleOCR exports converted by RapidOCR (and the ones Immich downloads) embed the dictionary
    one symbol per line under that key; other exports ship it as a text file.
    """
    if dictionary is not None:
        # rapidocr's own reader: one symbol per line, split on newlines only (str.splitlines would
        # also split on symbols such as U+2028 that a dictionary may contain).
        return CTCLabelDecode.read_character_file(dictionary)
    meta = rec.get_modelmeta().custom_metadata_map
    if "character" in meta:
        return meta["character"].splitlines()
    raise ModelLoadError("the recogniser has no embedded 'character' metadata and no dictionary (*.txt) next to it")


def load_pipeline(
    files: OcrModelFiles,
    options: SessionOptions,
    classifier: Path | None = None,
    rec_batch: int = _REC_BATCH,
    det_bucket: int | None = None,
    limits: DetectorLimits | None = None,
    run_options: ort.RunOptions | None = None,
) -> OcrPipeline:
    """Open the sessions (through the service's one session factory) and build the pipeline."""
    det = create_session(files.detection, options)
    rec = create_session(files.recognition, options)
    cls = create_session(classifier, options) if classifier is not None else None
    characters = read_characters(rec, files.dictionary)
    log.info(
        "OCR pipeline: detector %s, recogniser %s (%d symbols%s)%s",
        files.detection.name,
        files.recognition.name,
        len(characters),
        f" from {files.dictionary.name}" if files.dictionary else ", embedded",
        ", angle classifier on" if cls is not None else "",
    )
    return OcrPipeline(
        det,
        rec,
        characters,
        cls=cls,
        rec_batch=rec_batch,
        det_bucket=det_bucket,
        limits=limits,
        run_options=run_options,
    )


class OcrFamily:
    """The OCR :class:`ai_service.models.registry.ModelFamily`: one ``pipeline`` object per model."""

    task = ModelTask.OCR

    def __init__(
        self,
        store: ModelStore,
        session_options: SessionOptions,
        settings: AIServiceSettings,
        *,
        use_classifier: bool | None = None,
    ) -> None:
        self.store = store
        # A value set centrally (AI_SERVICE_ONNX_SPINNING) wins; otherwise OCR's sessions do not spin.
        extra = {ALLOW_SPINNING_KEY: "0", **session_options.extra}
        # Every OCR request has its own input size, so ONNX Runtime's arena would keep the largest
        # request's working memory for good: give it back after each run, or use no arena at all.
        release = settings.ocr_memory_release
        self.session_options = dataclasses.replace(
            session_options, extra=extra, cpu_arena=session_options.cpu_arena and release != "no-arena"
        )
        self.run_options = shrink_arena_run_options() if release == "shrink" else None
        self.limits = DetectorLimits(
            max_resolution_ceiling=settings.ocr_max_resolution_ceiling,
            max_side=settings.ocr_det_max_side,
            max_pixels=settings.ocr_det_max_pixels,
        )
        self.settings = settings
        # Off by default: on the project's OCR set it lost one substring (86 vs 87/90) and found
        # nothing new, since the decoder already applies EXIF orientation; see
        # bench/results/ocr_compare.md.
        self.use_classifier = settings.ocr_use_angle_classifier if use_classifier is None else use_classifier
        self.rec_batch = settings.ocr_rec_batch_size
        self.det_bucket = settings.ocr_det_bucket_px

    def canonical_name(self, name: str) -> str:
        return ALIASES.get(name, name)

    def component(self, type_: ModelType) -> str:
        if type_ not in (ModelType.DETECTION, ModelType.RECOGNITION):
            raise ValueError(f"OCR has no '{type_}' model type")
        return COMPONENT

    def installed(self) -> list[str]:
        names = {BUNDLED_NAME} if bundled_files() is not None else set()
        names.update(n for n in self.store.installed(self.task) if self._store_files(n) is not None)
        # An alias always means the bundled model, so a folder named like one is never served.
        return sorted(names - ALIASES.keys())

    def is_installed(self, name: str, component: str) -> bool:
        if component != COMPONENT:
            return False
        return self._files(name) is not None

    def known(self) -> list[str]:
        # Only what is bundled or already on disk: other languages would need a download that
        # this service cannot do offline, so they are reported as unknown, listing what is installed.
        return sorted({BUNDLED_NAME, *self.installed()})

    def downloadable(self, name: str) -> bool:
        return False  # the bundled pack serves Immich's names; other packs are put in place by hand

    def install_hint(self, name: str) -> str:
        if name == BUNDLED_NAME:
            return (
                "It ships inside the 'rapidocr' wheel: reinstall it with "
                "pip install --force-reinstall --no-deps 'rapidocr>=3.4,<4'."
            )
        base = self.store.model_dir(self.task, name)
        return (
            f"Put its ONNX files at {base}/recognition/{MODEL_FILE} (dictionary embedded or as a .txt "
            f"beside it) and optionally {base}/detection/{MODEL_FILE}."
        )

    def load(self, name: str, component: str) -> OcrPipeline:
        files = self._files(name) if component == COMPONENT else None
        if files is None:
            raise ModelNotInstalledError(
                f"ocr model '{name}' ({component}) is not installed. {self.install_hint(name)}"
            )
        classifier = bundled_classifier() if self.use_classifier else None
        try:
            return load_pipeline(
                files,
                self.session_options,
                classifier,
                self.rec_batch,
                self.det_bucket,
                limits=self.limits,
                run_options=self.run_options,
            )
        except ModelLoadError as exc:
            raise ModelLoadError(f"ocr model '{name}': {exc}") from exc
        except Exception as exc:  # ONNX Runtime raises its own types for corrupt or truncated files
            raise ModelLoadError(f"ocr model '{name}' failed to load from {files.recognition.parent}: {exc}") from exc

    # ---- file lookup -----------------------------------------------------------------------------

    def _files(self, name: str) -> OcrModelFiles | None:
        if name == BUNDLED_NAME:
            return bundled_files()
        if name in ALIASES:  # always the bundled model; see installed()
            return None
        return self._store_files(name)

    def _store_files(self, name: str) -> OcrModelFiles | None:
        try:
            base = self.store.model_dir(self.task, name)
        except ValueError:
            return None
        rec = base / "recognition" / MODEL_FILE
        if not rec.is_file():
            return None
        det = base / "detection" / MODEL_FILE
        if not det.is_file():
            # Immich keeps a language model's detector under the unprefixed name; any DB detector
            # works for any script, so the bundled one stands in.
            bundled = bundled_files()
            if bundled is None:
                return None
            det = bundled.detection
        dicts = sorted(rec.parent.glob("*.txt"))
        return OcrModelFiles(detection=det, recognition=rec, dictionary=dicts[0] if dicts else None)
