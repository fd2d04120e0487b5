"""The ``dlib`` face model: dlib's HOG face detector, 5-point landmarks and ResNet face descriptor.

Always available (``dlib-bin`` + ``face_recognition_models`` are dependencies), so a fresh install
recognises faces with no download, and free of InsightFace's non-commercial licence: dlib is under
the Boost licence and Davis King released the model files used here into the public domain (the
68-point landmark model, whose training set restricts commercial use, is not used).

Detector choice (measured on 2 CPU cores, insightface's ``t1.jpg`` and skimage's astronaut, upscaled
to Immich's 1440-px previews; see ``bench/bench_faces.py``):

* HOG (``get_frontal_face_detector``): about 0.16 s per 2080x1440 preview at native scale,
  0.36 s at 1.5x; found all 6 faces of t1 at every face size it can see, no false positives at
  score >= 0.7. Misses faces turned more than ~30° (profile) or rolled ~20° in-plane (4 of 6 found
  at 20° roll).
* CNN (``mmod_human_face_detector``): more pose-robust (6/6 at 20° roll) but 12 s per 1440-px
  preview at native scale, 2.8 s at half scale where it only sees faces >= ~160 px. Its 80-px
  window would need 2x upsampling (estimated ~50 s) to match HOG's reach on small faces. Far too slow for a
  library backfill on a CPU box, so it is not used.

Both detectors slide an ~80-px window; HOG's smallest reliably found face is about 72 px. The image
is therefore resized by ``72 / min_face_px`` before detection (1.5x for the default 48 px, close to
what SCRFD at 640 finds on a 1440-px preview), capped so the resized image stays under
``max_work_pixels`` (large originals are shrunk rather than blown up; the cost stays bounded).

Score: HOG returns an SVM margin (dlib's own default threshold is 0). Measured at the default 1.5x
scan on t1 and the astronaut (each at 3–4 sizes in a 1440-px canvas, and mirrored): 54 true faces,
53 with margin >= 0.33 (one at -0.07); 12 false positives (patches on the astronaut's suit, the
flag), all <= 0.02. The margin is mapped to 0–1 with a logistic curve pinned so that Immich's
default ``minScore`` 0.7 sits at margin 0.2, in that gap, with a gentle slope so the slider stays
useful::

    score = 1 / (1 + exp(-(2 * (margin - 0.2) + ln(7/3))))
    margin 0.2 -> 0.70, 0.6 -> 0.84, 1 -> 0.92, 0 -> 0.61 (dlib's default), -0.5 -> 0.37,
    -1.3 -> 0.10 (Immich's minimum minScore)

Lower ``minScore`` to ~0.6 to get dlib's stock behaviour (more small/turned faces, some false ones).

Recognition: ``dlib_face_recognition_resnet_model_v1`` (trained to put identities in non-overlapping
balls of radius 0.6; 99.38 % on LFW at Euclidean distance 0.6) on a 150x150 chip aligned with the
5-point shape predictor.

**Vectors stored in Immich.** Immich compares faces by cosine distance (``<=>``) with ``maxDistance``
0.5 by default. dlib's raw descriptors all point roughly the same way (norm ~1.47, the shared part
~1.3 of it), so zero-padded they put different people only 0.08–0.20 apart and Immich merges
everyone. The descriptor is therefore centred on a population mean of real faces
(:mod:`~ai_service.models.faces.dlib_population_mean`, made by ``scripts/dlib_population_mean.py``
from photos that are not the test photos), scaled to unit length and zero-padded to 512. Cosine
distance then follows dlib's own Euclidean distance E: about E² / (2 r²), with r the distance of a
face from the mean (median 0.62 on the test photos), so Immich's 0.5 sits near E ≈ 0.6, dlib's
published threshold.

Measured on other real photos of ten people (``tests/data/faces``: Obama in four photos, one a
partial face; Biden, Tom Hanks, the six people of InsightFace's t1.jpg, the astronaut; each also
mirrored, JPEG q20 and brighter; ``test_dlib_at_immichs_defaults_keeps_people_apart`` prints the
figures): same person at most 0.26 apart, different people at least 0.53; so Immich's default 0.5
works, with little room above it. The fitting ``maxDistance`` range is kept in
:mod:`ai_service.protocol.immich_face_models`. These vectors differ from the zero-padded ones of
earlier versions: a library indexed with those must re-run face detection for all photos.

Thread safety: the HOG scan releases the GIL and keeps per-call state in the detector object (one
detector shared by two threads returned 583 "faces" on t1), so each concurrent call borrows its own
detector from a pool, and two Immich jobs use two cores.
dlib's DNN holds the GIL and keeps layer outputs in the network object, so recognition is
serialised by a lock, per face, so that a many-face photo does not block other requests for long.
"""

from __future__ import annotations

import importlib.util
import math
import queue
import threading
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np

from ai_service.models.base import FaceDetections, ModelLoadError
from ai_service.models.faces.dlib_population_mean import DLIB_POPULATION_MEAN

DLIB_PACKAGE = "face_recognition_models"
SHAPE_PREDICTOR_FILE = "shape_predictor_5_face_landmarks.dat"
RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"

DESCRIPTOR_SIZE = 128
EMBEDDING_SIZE = 512

# Smallest face (box side, px) the HOG detector finds at native scale; measured ~70-72 px.
HOG_MIN_FACE_PX = 72.0
DEFAULT_MIN_FACE_PX = 48.0
# 2160x1440 (a 3:2 1440-px preview) at 1.5x is 7.0 MP; larger inputs are scanned at a lower scale.
DEFAULT_MAX_WORK_PIXELS = 7_000_000

# score = sigmoid(_SLOPE * (margin - _PIVOT) + logit(0.7)): minScore 0.7 <-> margin _PIVOT, the gap
# between measured false positives (<= 0.02) and true faces (>= 0.33).
_SLOPE = 2.0
_PIVOT = 0.2
_OFFSET = math.log(0.7 / 0.3) - _SLOPE * _PIVOT
_MIN_MARGIN = -2.0  # below this HOG returns background clutter by the hundred (score 0.03)

# Euclidean threshold dlib publishes for this descriptor (see the module docstring for what Immich's
# cosine maxDistance corresponds to).
DLIB_EUCLIDEAN_THRESHOLD = 0.6
_MEAN = np.asarray(DLIB_POPULATION_MEAN, np.float32)


def dlib_model_dir() -> Path | None:
    """The ``models/`` folder of the installed ``face_recognition_models``, found without importing it
    (its ``__init__`` imports ``pkg_resources``, which new setuptools no longer ships)."""
    spec = importlib.util.find_spec(DLIB_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        folder = Path(location) / "models"
        if folder.is_dir():
            return folder
    return None


def dlib_available(component: str) -> bool:
    """Whether the files ``component`` ("detection" or "recognition") needs are installed."""
    if importlib.util.find_spec("dlib") is None:
        return False
    if component == "detection":
        return True  # the HOG detector is compiled into dlib
    folder = dlib_model_dir()
    return folder is not None and all((folder / f).is_file() for f in (SHAPE_PREDICTOR_FILE, RECOGNITION_FILE))


def score_from_margin(margin: np.ndarray | float) -> np.ndarray:
    """HOG SVM margin -> 0–1 score (monotonic; margin 0.2 -> 0.7, Immich's default minScore)."""
    return 1.0 / (1.0 + np.exp(-(_SLOPE * np.asarray(margin, np.float64) + _OFFSET)))


def margin_from_score(score: float) -> float:
    """Inverse of :func:`score_from_margin`; ``inf`` for scores >= 1 (nothing qualifies)."""
    if score >= 1.0:
        return math.inf
    if score <= 0.0:
        return _MIN_MARGIN
    return max(_MIN_MARGIN, (math.log(score / (1.0 - score)) - _OFFSET) / _SLOPE)


def _import_dlib() -> ModuleType:
    try:
        import dlib
    except ImportError as exc:  # pragma: no cover - dlib-bin is a hard dependency
        raise ModelLoadError(f"the dlib face model needs the 'dlib-bin' package: {exc}") from exc
    return dlib


class DlibFaceDetector:
    """dlib HOG frontal face detector; see the module docstring for scale and score."""

    def __init__(
        self, min_face_px: float = DEFAULT_MIN_FACE_PX, max_work_pixels: int = DEFAULT_MAX_WORK_PIXELS
    ) -> None:
        if min_face_px <= 0 or max_work_pixels <= 0:
            raise ValueError("min_face_px and max_work_pixels must be positive")
        self._dlib = _import_dlib()
        self.min_face_px = float(min_face_px)
        self.max_work_pixels = int(max_work_pixels)
        # Detectors are cheap; the pool grows to the number of concurrent callers.
        self._pool: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._pool.put(self._dlib.get_frontal_face_detector())

    def scale_for(self, height: int, width: int) -> float:
        """Resize factor applied before the scan (> 1 finds smaller faces, < 1 bounds cost)."""
        wanted = HOG_MIN_FACE_PX / self.min_face_px
        cap = math.sqrt(self.max_work_pixels / float(height * width))
        return min(wanted, cap)

    def detect(self, image: np.ndarray, min_score: float) -> FaceDetections:
        min_margin = margin_from_score(min_score)
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"expected an RGB H x W x 3 image, got shape {image.shape}")
        if not math.isfinite(min_margin):
            return _no_faces()
        image = np.ascontiguousarray(image, dtype=np.uint8)  # dlib and cv2 need dense rows (no copy if already)
        height, width = image.shape[:2]
        scale = self.scale_for(height, width)
        if abs(scale - 1.0) < 0.02:
            scale = 1.0
            work = image
        else:
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            interpolation = cv2.INTER_LINEAR if scale > 1 else cv2.INTER_AREA
            work = cv2.resize(image, size, interpolation=interpolation)
        try:
            detector = self._pool.get_nowait()
        except queue.Empty:
            detector = self._dlib.get_frontal_face_detector()
        try:
            rects, margins, _ = detector.run(work, 0, min_margin)  # type: ignore[attr-defined]
        finally:
            self._pool.put(detector)
        if not rects:
            return _no_faces()
        # dlib rectangles are inclusive; +1 makes x2/y2 exclusive pixel edges like SCRFD's boxes.
        boxes = np.array([[r.left(), r.top(), r.right() + 1, r.bottom() + 1] for r in rects], np.float64) / scale
        scores = score_from_margin(np.asarray(margins, np.float64))
        keep = scores >= min_score
        order = np.argsort(-scores[keep], kind="stable")
        return FaceDetections(
            boxes=boxes[keep][order].astype(np.float32),
            scores=scores[keep][order].astype(np.float32),
            landmarks=None,  # dlib's 5 points (eye corners, nose) are not the eyes/nose/mouth layout
        )


class DlibFaceRecognizer:
    """5-point alignment + dlib ResNet descriptor, centred, unit length, zero-padded to 512 (module docstring)."""

    embedding_size = EMBEDDING_SIZE

    def __init__(self, model_dir: Path | None = None, num_jitters: int = 0) -> None:
        dlib = _import_dlib()
        folder = model_dir or dlib_model_dir()
        if folder is None:
            raise ModelLoadError(f"the dlib face model needs the '{DLIB_PACKAGE}' package")
        try:
            self._shape_predictor = dlib.shape_predictor(str(folder / SHAPE_PREDICTOR_FILE))
            self._net = dlib.face_recognition_model_v1(str(folder / RECOGNITION_FILE))
        except RuntimeError as exc:  # dlib reports missing/corrupt files as RuntimeError
            raise ModelLoadError(f"could not load dlib face models from {folder}: {exc}") from exc
        self._dlib = dlib
        self.num_jitters = num_jitters
        self._lock = threading.Lock()

    def landmarks(self, image: np.ndarray, faces: FaceDetections) -> np.ndarray:
        """dlib's 5 points per face (right eye corners, left eye corners, nose base), N x 5 x 2."""
        image = np.ascontiguousarray(image, dtype=np.uint8)
        with self._lock:
            shapes = [self._shape_predictor(image, self._rect(box)) for box in faces.boxes]
        return np.array([[(p.x, p.y) for p in s.parts()] for s in shapes], np.float32).reshape(-1, 5, 2)

    def descriptors(self, image: np.ndarray, faces: FaceDetections) -> np.ndarray:
        """dlib's raw 128-d descriptors, N x 128 (what its Euclidean 0.6 rule is defined on)."""
        out = np.zeros((len(faces), DESCRIPTOR_SIZE), np.float32)
        image = np.ascontiguousarray(image, dtype=np.uint8)
        for i, box in enumerate(faces.boxes):
            with self._lock:
                shape = self._shape_predictor(image, self._rect(box))
                out[i] = np.asarray(self._net.compute_face_descriptor(image, shape, self.num_jitters), np.float32)
        return out

    def embed(self, image: np.ndarray, faces: FaceDetections) -> np.ndarray:
        out = np.zeros((len(faces), EMBEDDING_SIZE), np.float32)
        if len(faces) == 0:
            return out
        out[:, :DESCRIPTOR_SIZE] = to_immich_vector(self.descriptors(image, faces))
        return out

    def _rect(self, box: np.ndarray) -> object:
        x1, y1, x2, y2 = (round(float(v)) for v in box)
        return self._dlib.rectangle(x1, y1, max(x1, x2 - 1), max(y1, y2 - 1))


def to_immich_vector(descriptors: np.ndarray) -> np.ndarray:
    """N x 128 raw descriptors -> centred on the population mean, unit length (see the module docstring)."""
    centred = descriptors.astype(np.float32) - _MEAN
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    return centred / np.maximum(norms, 1e-6)  # a face exactly at the mean cannot happen; no division by 0


def _no_faces() -> FaceDetections:
    return FaceDetections(boxes=np.zeros((0, 4), np.float32), scores=np.zeros(0, np.float32), landmarks=None)
