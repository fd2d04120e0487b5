"""The face model family: dlib on real photos, SCRFD/ArcFace code paths on built test models.

No mocks: dlib runs its real models on real photos (InsightFace's t1.jpg, six faces; scikit-image's
astronaut, one face). SCRFD and ArcFace run through ONNX Runtime on models built by
``tests/builders/face_models.py`` (planted or random outputs: plumbing, not recognition).
"""

from __future__ import annotations

import io
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from PIL import Image

from ai_service.imaging import decode_image
from ai_service.models.base import (
    FaceDetections,
    FaceDetectorModel,
    FaceRecognizerModel,
    ModelLoadError,
    ModelNotInstalledError,
    UnknownModelError,
)
from ai_service.models.faces import ArcFaceRecognizer, DlibFaceDetector, DlibFaceRecognizer, FaceFamily, ScrfdDetector
from ai_service.models.faces.arcface import ARCFACE_TEMPLATE, estimate_norm, norm_crop, umeyama
from ai_service.models.faces.dlib_models import (
    dlib_model_dir,
    margin_from_score,
    score_from_margin,
)
from ai_service.models.faces.dlib_population_mean import DLIB_POPULATION_MEAN
from ai_service.models.faces.onnx_info import looks_like_arcface, looks_like_scrfd, read_interface
from ai_service.models.faces.scrfd import nms
from ai_service.models.registry import ModelRegistry
from ai_service.models.store import ModelStore
from ai_service.protocol.immich import ModelTask, ModelType
from ai_service.protocol.immich_face_models import max_distance_range
from ai_service.runtime.onnx import SessionOptions, create_session
from ai_service.settings import AIServiceSettings
from tests.assets import astronaut_jpeg, decode_rgb, encode_jpeg, insightface_t1_jpeg, preview_jpeg
from tests.builders.face_models import (
    TEST_SCRFD_NAME,
    PlantedFace,
    arcface_probe_model,
    arcface_random_model,
    decoy_model,
    planted_heads,
    probe_indices,
    scrfd_planted_model,
    scrfd_random_model,
    write_immich_pack,
    write_insightface_pack,
)
from tests.face_photos import T1_FACE_CENTRES, cosine_distances, labelled_vectors

MAX_PIXELS = 100_000_000
SESSION_OPTIONS = SessionOptions(intra_op_threads=1)
TASK = ModelTask.FACIAL_RECOGNITION

IMMICH_MIN_SCORE = 0.7  # Immich's default facialRecognition.minScore
IMMICH_MAX_DISTANCE = 0.5  # ... and maxDistance
DLIB_RANGE = max_distance_range("dlib")
assert DLIB_RANGE is not None
ASTRONAUT_FACE_CENTRE = np.array([224, 124], float)


def cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(1.0 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def centres(faces: FaceDetections) -> np.ndarray:
    return (faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2


def match_centres(found: np.ndarray, truth: np.ndarray, tolerance: float) -> list[int]:
    """Index into ``truth`` for each found centre; fails if one is not near a distinct true face."""
    matched = []
    for c in found:
        distances = np.linalg.norm(truth - c, axis=1)
        j = int(distances.argmin())
        assert distances[j] < tolerance, f"detection at {c} is not near any face ({truth.tolist()})"
        matched.append(j)
    assert len(set(matched)) == len(matched), f"two detections on one face: {matched}"
    return matched


def make_family(tmp_path: Path, insightface_dir: Path | None = None) -> FaceFamily:
    settings = AIServiceSettings(model_dir=tmp_path / "models", insightface_dir=insightface_dir)
    return FaceFamily(ModelStore(settings.model_dir), SESSION_OPTIONS, settings)


def save(model: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path


# ---- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def t1() -> np.ndarray:
    return decode_image(insightface_t1_jpeg(), max_pixels=MAX_PIXELS).rgb


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return decode_image(astronaut_jpeg(), max_pixels=MAX_PIXELS).rgb


@pytest.fixture(scope="module")
def dlib_family(tmp_path_factory: pytest.TempPathFactory) -> FaceFamily:
    return make_family(tmp_path_factory.mktemp("dlib"))


@pytest.fixture(scope="module")
def dlib_detector(dlib_family: FaceFamily) -> DlibFaceDetector:
    model = dlib_family.load("dlib", "detection")
    assert isinstance(model, DlibFaceDetector)
    return model


@pytest.fixture(scope="module")
def dlib_recognizer(dlib_family: FaceFamily) -> DlibFaceRecognizer:
    model = dlib_family.load("dlib", "recognition")
    assert isinstance(model, DlibFaceRecognizer)
    return model


@pytest.fixture(scope="module")
def t1_faces(dlib_detector: DlibFaceDetector, t1: np.ndarray) -> FaceDetections:
    return dlib_detector.detect(t1, 0.7)


# ---- dlib: detection ------------------------------------------------------------------------------------


def test_dlib_models_satisfy_the_contract(dlib_detector: DlibFaceDetector, dlib_recognizer: DlibFaceRecognizer) -> None:
    assert isinstance(dlib_detector, FaceDetectorModel)
    assert isinstance(dlib_recognizer, FaceRecognizerModel)
    assert dlib_recognizer.embedding_size == 512
    folder = dlib_model_dir()
    assert folder is not None and (folder / "dlib_face_recognition_resnet_model_v1.dat").is_file()


def test_dlib_finds_the_six_faces_of_t1(t1: np.ndarray, t1_faces: FaceDetections) -> None:
    height, width = t1.shape[:2]
    assert len(t1_faces) == 6
    assert t1_faces.landmarks is None
    assert t1_faces.boxes.dtype == np.float32 and t1_faces.scores.dtype == np.float32
    match_centres(centres(t1_faces), T1_FACE_CENTRES, tolerance=40)
    boxes = t1_faces.boxes
    assert (boxes[:, 0] >= -5).all() and (boxes[:, 1] >= -5).all()
    assert (boxes[:, 2] <= width + 5).all() and (boxes[:, 3] <= height + 5).all()
    sides = boxes[:, 2:] - boxes[:, :2]
    assert ((sides > 60) & (sides < 200)).all(), sides
    assert (t1_faces.scores >= 0.7).all() and (t1_faces.scores <= 1).all()
    assert (np.diff(t1_faces.scores) <= 0).all(), "highest score first"


def test_dlib_finds_the_astronaut(dlib_detector: DlibFaceDetector, astronaut: np.ndarray) -> None:
    faces = dlib_detector.detect(astronaut, 0.7)
    assert len(faces) == 1
    match_centres(centres(faces), ASTRONAUT_FACE_CENTRE[None], tolerance=25)


def test_dlib_on_immich_previews(dlib_detector: DlibFaceDetector) -> None:
    """Immich sends 1440-px previews: t1 upscaled to 2080x1440 still gives the six faces, in its pixels,
    and the upscaled astronaut only her face (the suit's patches score ~0.65 there, below 0.7)."""
    preview = decode_image(preview_jpeg(insightface_t1_jpeg()), max_pixels=MAX_PIXELS).rgb
    assert min(preview.shape[:2]) == 1440
    faces = dlib_detector.detect(preview, 0.7)
    scale = preview.shape[1] / 1280
    assert len(faces) == 6
    match_centres(centres(faces), T1_FACE_CENTRES * scale, tolerance=40 * scale)

    astronaut = decode_image(preview_jpeg(astronaut_jpeg()), max_pixels=MAX_PIXELS).rgb
    faces = dlib_detector.detect(astronaut, 0.7)
    assert len(faces) == 1
    match_centres(centres(faces), ASTRONAUT_FACE_CENTRE[None] * 1440 / 512, tolerance=60)


def test_dlib_min_score_filters(dlib_detector: DlibFaceDetector, t1: np.ndarray, astronaut: np.ndarray) -> None:
    for image in (t1, astronaut):
        loose = dlib_detector.detect(image, 0.3)
        default = dlib_detector.detect(image, 0.7)
        strict = dlib_detector.detect(image, 0.97)
        assert len(loose) >= len(default) >= len(strict)
        for faces, threshold in ((loose, 0.3), (default, 0.7), (strict, 0.97)):
            assert (faces.scores >= threshold).all()
        # what passes a stricter threshold is exactly the loose result's high scorers
        np.testing.assert_allclose(np.sort(strict.scores), np.sort(loose.scores[loose.scores >= 0.97]))
        assert len(dlib_detector.detect(image, 1.0)) == 0
    assert len(dlib_detector.detect(astronaut, 0.3)) > 1, "the loose threshold should admit false positives"


@pytest.mark.parametrize("value", [0, 255, 128])
def test_dlib_blank_image_has_no_faces(
    dlib_detector: DlibFaceDetector, dlib_recognizer: DlibFaceRecognizer, value: int
) -> None:
    blank = np.full((600, 800, 3), value, np.uint8)
    faces = dlib_detector.detect(blank, 0.1)
    assert len(faces) == 0 and faces.boxes.shape == (0, 4)
    assert dlib_recognizer.embed(blank, faces).shape == (0, 512)


def test_dlib_scale_is_bounded_for_large_images(dlib_detector: DlibFaceDetector) -> None:
    assert dlib_detector.scale_for(1440, 2160) == pytest.approx(1.5)
    big = dlib_detector.scale_for(3000, 4000)
    assert 3000 * 4000 * big**2 <= dlib_detector.max_work_pixels * 1.0001


def test_score_mapping() -> None:
    assert float(score_from_margin(0.2)) == pytest.approx(0.7)
    assert float(score_from_margin(-1.3)) == pytest.approx(0.1, abs=0.01)
    margins = np.linspace(-3, 3, 61)
    scores = score_from_margin(margins)
    assert (np.diff(scores) > 0).all() and (scores > 0).all() and (scores < 1).all()
    for s in (0.1, 0.5, 0.7, 0.9, 0.99):
        assert float(score_from_margin(margin_from_score(s))) == pytest.approx(s)
    assert math.isinf(margin_from_score(1.0))


# ---- dlib: recognition ----------------------------------------------------------------------------------


def test_dlib_embeddings_are_unit_128d_padded_to_512(
    dlib_recognizer: DlibFaceRecognizer, t1: np.ndarray, t1_faces: FaceDetections
) -> None:
    emb = dlib_recognizer.embed(t1, t1_faces)
    assert emb.shape == (6, 512) and emb.dtype == np.float32
    assert np.all(emb[:, 128:] == 0)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    # centred on the population mean: the vector is the raw descriptor minus the mean, rescaled
    raw = dlib_recognizer.descriptors(t1, t1_faces)
    centred = raw - np.asarray(DLIB_POPULATION_MEAN, np.float32)
    np.testing.assert_allclose(emb[:, :128], centred / np.linalg.norm(centred, axis=1, keepdims=True), atol=1e-6)


def test_dlib_at_immichs_defaults_keeps_people_apart(
    dlib_detector: DlibFaceDetector, dlib_recognizer: DlibFaceRecognizer
) -> None:
    """Immich's defaults (minScore 0.7, maxDistance 0.5) on real photos of ten people that were not used to
    make the population mean: every same-person pair within 0.5, every different-person pair beyond it."""
    def both(image: np.ndarray, faces: FaceDetections) -> np.ndarray:  # stored vector, then the raw descriptor
        return np.hstack([dlib_recognizer.embed(image, faces), dlib_recognizer.descriptors(image, faces)])

    labels, vectors = labelled_vectors(lambda img: dlib_detector.detect(img, IMMICH_MIN_SCORE), both)
    assert len(set(labels)) == 10 and len(labels) == 52
    distances = cosine_distances(labels, vectors[:, :512])
    print(f"\ndlib at Immich's defaults: {distances.summary()}")
    assert distances.same.max() < IMMICH_MAX_DISTANCE < distances.different.min(), distances.summary()
    # the published range holds on this set too
    assert distances.same.max() < DLIB_RANGE.low and distances.different.min() > DLIB_RANGE.high, distances.summary()
    # the zero-padded raw descriptor (earlier versions) put every pair within 0.5: one person for Immich
    raw = cosine_distances(labels, vectors[:, 512:])
    assert raw.different.max() < IMMICH_MAX_DISTANCE, raw.summary()


def test_dlib_same_person_is_closer_than_other_people(
    dlib_detector: DlibFaceDetector, dlib_recognizer: DlibFaceRecognizer, t1: np.ndarray, t1_faces: FaceDetections
) -> None:
    """Mirror image, a crop around each face and a low-quality re-encode are the same person; the other
    five people in the photo are not. Distances are what Immich computes on the stored vectors."""
    base = dlib_recognizer.embed(t1, t1_faces)
    height, width = t1.shape[:2]
    variants: dict[str, np.ndarray] = {}

    flipped = t1[:, ::-1]  # a view with negative strides: the models must cope
    flip_faces = dlib_detector.detect(flipped, 0.7)
    mirrored_centres = centres(t1_faces).copy()
    mirrored_centres[:, 0] = width - mirrored_centres[:, 0]
    order = match_centres(centres(flip_faces), mirrored_centres, tolerance=20)
    flip_emb = dlib_recognizer.embed(flipped, flip_faces)
    variants["flip"] = flip_emb[np.argsort(order)]

    jpeg = decode_rgb(encode_jpeg(t1, quality=25))
    variants["jpeg25"] = dlib_recognizer.embed(jpeg, t1_faces)

    crops = []
    for box in t1_faces.boxes.astype(int):
        x1, y1 = max(0, box[0] - 60), max(0, box[1] - 60)
        x2, y2 = min(width, box[2] + 60), min(height, box[3] + 60)
        crop = np.ascontiguousarray(t1[y1:y2, x1:x2])
        found = dlib_detector.detect(crop, 0.7)
        assert len(found) >= 1
        best = int(np.argmin(np.linalg.norm(centres(found) - ((box[:2] + box[2:]) / 2 - [x1, y1]), axis=1)))
        one = FaceDetections(found.boxes[best : best + 1], found.scores[best : best + 1])
        crops.append(dlib_recognizer.embed(crop, one)[0])
    variants["crop"] = np.stack(crops)

    different = [cosine_distance(base[i], base[j]) for i in range(6) for j in range(6) if i != j]
    for name, emb in variants.items():
        for i in range(6):
            same = cosine_distance(base[i], emb[i])
            others = min(cosine_distance(emb[i], base[j]) for j in range(6) if j != i)
            assert same < others, f"{name}: face {i} is closer to another person ({same:.3f} vs {others:.3f})"
            assert same < DLIB_RANGE.low, f"{name}: face {i} at {same:.3f}"
    # the documented maxDistance range separates these six people
    assert min(different) > DLIB_RANGE.high, min(different)


def test_dlib_recognizer_accepts_boxes_from_anywhere(
    dlib_recognizer: DlibFaceRecognizer, astronaut: np.ndarray
) -> None:
    faces = FaceDetections(np.array([[174, 74, 275, 175]], np.float32), np.array([0.9], np.float32))
    landmarks = dlib_recognizer.landmarks(astronaut, faces)
    assert landmarks.shape == (1, 5, 2)
    assert ((landmarks[0] > [174, 74]) & (landmarks[0] < [275, 175])).all()
    assert dlib_recognizer.embed(astronaut, faces).shape == (1, 512)


# ---- SCRFD ---------------------------------------------------------------------------------------------

PLANTED = [
    PlantedFace(stride=8, x=40, y=30, score=0.9, distances=(5, 6, 5, 7)),
    # same place, other anchor, lower score: suppressed by NMS
    PlantedFace(stride=8, x=41, y=30, score=0.8, distances=(5, 6, 5, 7), anchor=1),
    PlantedFace(stride=16, x=5, y=25, score=0.75, distances=(2, 2.5, 2, 3)),
    PlantedFace(stride=32, x=15, y=10, score=0.6, distances=(1, 1.5, 1, 2)),
]


def planted_detector(tmp_path: Path, **kwargs: object) -> ScrfdDetector:
    path = save(scrfd_planted_model(PLANTED, **kwargs), tmp_path / "planted" / "model.onnx")  # type: ignore[arg-type]
    return ScrfdDetector(create_session(path, SESSION_OPTIONS))


@pytest.mark.parametrize("order", ["kind", "stride"])
@pytest.mark.parametrize("batched", [False, True])
def test_scrfd_decodes_planted_faces(tmp_path: Path, order: str, batched: bool) -> None:
    detector = planted_detector(tmp_path, order=order, batched=batched)
    image = np.random.default_rng(0).integers(0, 255, (960, 1280, 3), np.uint8)  # letterbox scale 0.5
    scale = 0.5

    faces = detector.detect(image, 0.7)
    expected = [PLANTED[0], PLANTED[2]]  # 0.9 and 0.75; 0.8 suppressed by NMS, 0.6 below threshold
    assert len(faces) == 2
    np.testing.assert_allclose(faces.scores, [0.9, 0.75], rtol=1e-6)
    np.testing.assert_allclose(faces.boxes, np.stack([f.box() for f in expected]) / scale, atol=1e-3)
    assert faces.landmarks is not None
    np.testing.assert_allclose(faces.landmarks, np.stack([f.landmarks() for f in expected]) / scale, atol=1e-3)

    # the threshold is per call: the same loaded model now also returns the 0.6 face
    looser = detector.detect(image, 0.5)
    np.testing.assert_allclose(looser.scores, [0.9, 0.75, 0.6], rtol=1e-6)
    np.testing.assert_allclose(looser.boxes[2], PLANTED[3].box() / scale, atol=1e-3)
    assert len(detector.detect(image, 0.95)) == 0


def test_nms_uses_iou_04() -> None:
    boxes = np.array(
        [
            [0, 0, 99, 99],  # area 100 x 100 with InsightFace's +1 convention
            [0, 50, 99, 149],  # IoU 1/3 with the first: kept
            [0, 20, 99, 119],  # IoU 2/3 with the first: suppressed
            [300, 300, 340, 340],
        ],
        np.float32,
    )
    scores = np.array([0.9, 0.8, 0.85, 0.5], np.float32)
    assert nms(boxes, scores).tolist() == [0, 1, 3]
    assert nms(boxes, scores, threshold=0.7).tolist() == [0, 2, 1, 3]


def insightface_detect(heads: dict[tuple[str, int], np.ndarray], threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Reference: InsightFace's ``SCRFD.detect`` post-processing (model_zoo/scrfd.py), transcribed line by line
    for a 640x640 input at scale 1: per stride keep scores >= threshold, stack, ``argsort()[::-1]``,
    reorder, then its ``nms`` (which sorts again). Returns the kept boxes and scores."""
    scores_list, bboxes_list = [], []
    for stride in (8, 16, 32):
        scores = heads["score", stride]
        side = 640 // stride
        anchor_centers = np.stack(np.mgrid[:side, :side][::-1], axis=-1).astype(np.float32)
        anchor_centers = (anchor_centers * stride).reshape((-1, 2))
        centers = np.stack([anchor_centers] * 2, axis=1).reshape((-1, 2))  # two anchors per location
        pos_inds = np.where(scores >= threshold)[0]
        distance = heads["bbox", stride] * stride
        bboxes = np.stack(
            [
                centers[:, 0] - distance[:, 0],
                centers[:, 1] - distance[:, 1],
                centers[:, 0] + distance[:, 2],
                centers[:, 1] + distance[:, 3],
            ],
            axis=-1,
        )
        scores_list.append(scores[pos_inds])
        bboxes_list.append(bboxes[pos_inds])
    scores = np.vstack(scores_list)
    order = scores.ravel().argsort()[::-1]
    pre_det = np.hstack((np.vstack(bboxes_list), scores)).astype(np.float32, copy=False)[order, :]
    x1, y1, x2, y2, sc = pre_det.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    nms_order = sc.argsort()[::-1]
    keep = []
    while nms_order.size > 0:
        i = nms_order[0]
        keep.append(i)
        xx1 = np.maximum(x1[i], x1[nms_order[1:]])
        yy1 = np.maximum(y1[i], y1[nms_order[1:]])
        xx2 = np.minimum(x2[i], x2[nms_order[1:]])
        yy2 = np.minimum(y2[i], y2[nms_order[1:]])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        ovr = inter / (areas[i] + areas[nms_order[1:]] - inter)
        nms_order = nms_order[np.where(ovr <= 0.4)[0] + 1]
    det = pre_det[keep, :]
    return det[:, :4], det[:, 4]


# A and B tie at 0.9 on one face; C (0.8) overlaps B (IoU 0.43) but not A (IoU 0.34). InsightFace keeps
# the tie's first candidate (A), which leaves C standing: {A, C}. Sorting only once, inside NMS, keeps B,
# which suppresses both A and C: {B}.
TIED = [
    PlantedFace(stride=8, x=40, y=30, score=0.9, distances=(5, 5, 5, 5)),
    PlantedFace(stride=8, x=41, y=30, score=0.9, distances=(5, 5, 5, 5), anchor=1),
    PlantedFace(stride=8, x=45, y=30, score=0.8, distances=(5, 5, 5, 5)),
]


def test_scrfd_equal_scores_keep_insightfaces_boxes(tmp_path: Path) -> None:
    model = save(scrfd_planted_model(TIED), tmp_path / "tied" / "model.onnx")
    detector = ScrfdDetector(create_session(model, SESSION_OPTIONS))
    faces = detector.detect(np.zeros((640, 640, 3), np.uint8), 0.5)
    ref_boxes, ref_scores = insightface_detect(planted_heads(TIED), 0.5)
    np.testing.assert_allclose(faces.boxes, ref_boxes, atol=1e-4)
    np.testing.assert_allclose(faces.scores, ref_scores)
    np.testing.assert_allclose(faces.boxes, np.stack([TIED[0].box(), TIED[2].box()]), atol=1e-4)
    assert faces.landmarks is not None
    np.testing.assert_allclose(faces.landmarks, np.stack([TIED[0].landmarks(), TIED[2].landmarks()]), atol=1e-4)


def test_scrfd_many_ties_match_insightface(tmp_path: Path) -> None:
    """Dozens of overlapping candidates on three score levels, across strides and anchors."""
    rng = np.random.default_rng(7)
    planted, used = [], set()
    while len(planted) < 60:
        stride = int(rng.choice([8, 16, 32]))
        side = 640 // stride
        x, y, anchor = int(rng.integers(2, side - 2)), int(rng.integers(2, side - 2)), int(rng.integers(2))
        if (stride, x, y, anchor) in used:
            continue
        used.add((stride, x, y, anchor))
        size = float(rng.choice([2.0, 3.0, 4.0])) * 8 / stride  # about 32-64 px whatever the stride
        planted.append(PlantedFace(stride, x, y, float(rng.choice([0.6, 0.75, 0.9])), (size,) * 4, anchor=anchor))
    model = save(scrfd_planted_model(planted), tmp_path / "ties" / "model.onnx")
    faces = ScrfdDetector(create_session(model, SESSION_OPTIONS)).detect(np.zeros((640, 640, 3), np.uint8), 0.5)
    ref_boxes, ref_scores = insightface_detect(planted_heads(planted), 0.5)
    assert len(ref_scores) < len(planted)  # NMS had work to do
    np.testing.assert_allclose(faces.boxes, ref_boxes, atol=1e-3)
    np.testing.assert_allclose(faces.scores, ref_scores)


def test_scrfd_letterbox_of_a_tall_image(tmp_path: Path) -> None:
    detector = planted_detector(tmp_path)
    image = np.zeros((1200, 600, 3), np.uint8)  # 640 high, 320 wide after letterbox
    faces = detector.detect(image, 0.7)
    scale = 640 / 1200
    np.testing.assert_allclose(faces.boxes[0], PLANTED[0].box() / scale, atol=1e-3)


def test_scrfd_random_model_on_a_real_photo(tmp_path: Path, t1: np.ndarray) -> None:
    """Dynamic input size, det_10g names and shapes: the real decode path end to end (output meaningless)."""
    path = save(scrfd_random_model(seed=1), tmp_path / "det.onnx")
    detector = ScrfdDetector(create_session(path, SESSION_OPTIONS))
    assert (detector.input_w, detector.input_h) == (640, 640)
    faces = detector.detect(t1, 0.5)
    assert len(faces) > 0
    assert faces.boxes.shape == (len(faces), 4) and faces.landmarks is not None
    assert faces.landmarks.shape == (len(faces), 5, 2)
    assert np.isfinite(faces.boxes).all() and (faces.scores >= 0.5).all()
    assert (np.diff(faces.scores) <= 0).all()
    assert len(detector.detect(t1, 1.0)) == 0
    mirrored = detector.detect(t1[:, ::-1], 0.5)  # negative-stride views are accepted
    assert mirrored.boxes.shape[1] == 4


def test_scrfd_without_landmarks(tmp_path: Path, t1: np.ndarray) -> None:
    path = save(scrfd_random_model(seed=2, with_kps=False, order="stride"), tmp_path / "det6.onnx")
    detector = ScrfdDetector(create_session(path, SESSION_OPTIONS))
    faces = detector.detect(t1, 0.5)
    assert faces.landmarks is None and len(faces) > 0


def test_scrfd_fixed_input_size_wins(tmp_path: Path) -> None:
    path = save(scrfd_random_model(seed=3, input_size=320), tmp_path / "det320.onnx")
    detector = ScrfdDetector(create_session(path, SESSION_OPTIONS))
    assert (detector.input_w, detector.input_h) == (320, 320)
    detector.detect(np.zeros((100, 300, 3), np.uint8), 0.5)


# ---- ArcFace -------------------------------------------------------------------------------------------


def similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array(
        [[scale * math.cos(a), -scale * math.sin(a), tx], [scale * math.sin(a), scale * math.cos(a), ty], [0, 0, 1]]
    )


def test_umeyama_recovers_a_similarity() -> None:
    truth = similarity(2.3, 25.0, 140.0, -30.0)
    src = np.random.default_rng(0).uniform(0, 100, (5, 2))
    dst = (truth[:2, :2] @ src.T).T + truth[:2, 2]
    np.testing.assert_allclose(umeyama(src, dst), truth, atol=1e-9)


def test_norm_crop_puts_landmarks_on_the_template() -> None:
    """Five dots drawn where a rotated, scaled face's landmarks are end up on ArcFace's template."""
    to_image = similarity(2.6, -18.0, 210.0, 95.0)
    landmarks = (to_image[:2, :2] @ ARCFACE_TEMPLATE.T.astype(np.float64)).T + to_image[:2, 2]
    image = np.zeros((600, 700, 3), np.uint8)
    for i, (x, y) in enumerate(landmarks):
        colour = [0, 0, 0]
        colour[i % 3] = 255
        cv2.circle(image, (round(x), round(y)), 5, colour, -1)
    crop = norm_crop(image, landmarks)
    assert crop.shape == (112, 112, 3)
    for i, (tx, ty) in enumerate(ARCFACE_TEMPLATE):
        channel = crop[:, :, i % 3].astype(np.float64)
        window = channel[int(ty) - 6 : int(ty) + 7, int(tx) - 6 : int(tx) + 7]
        assert window.max() > 200, f"landmark {i} missing near the template point"
        ys, xs = np.nonzero(window > 100)
        cy, cx = ys.mean() + int(ty) - 6, xs.mean() + int(tx) - 6
        assert abs(cx - tx) < 1.5 and abs(cy - ty) < 1.5
    matrix = estimate_norm(landmarks)
    mapped = (matrix[:, :2] @ landmarks.T).T + matrix[:, 2]
    np.testing.assert_allclose(mapped, ARCFACE_TEMPLATE, atol=1e-3)


@pytest.mark.parametrize("shape", [(200, 40_000), (40_000, 200)], ids=["wide", "tall"])
def test_norm_crop_beyond_opencvs_32767_px(shape: tuple[int, int]) -> None:
    """A 40000-px panorama is a valid image; OpenCV's warp refuses sources that large (cv2.error, a 500),
    so the face is warped from its neighbourhood: the same crop as from a small image holding it."""
    rng = np.random.default_rng(7)
    small = rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)
    to_image = similarity(1.3, 12.0, 40.0, 30.0)
    landmarks = (to_image[:2, :2] @ ARCFACE_TEMPLATE.T.astype(np.float64)).T + to_image[:2, 2]
    big = np.zeros((*shape, 3), np.uint8)
    offset = np.array([shape[1] - 200, shape[0] - 200])  # the far end, beyond 32767 px
    big[offset[1] :, offset[0] :] = small
    np.testing.assert_array_equal(norm_crop(big, landmarks + offset), norm_crop(small, landmarks))


def faces_with_landmarks(image: np.ndarray, count: int) -> FaceDetections:
    rng = np.random.default_rng(count)
    h, w = image.shape[:2]
    boxes, landmarks = [], []
    for _ in range(count):
        s = rng.uniform(1.0, 2.0)
        t = similarity(s, rng.uniform(-20, 20), rng.uniform(0, w - 112 * s), rng.uniform(0, h - 112 * s))
        pts = (t[:2, :2] @ ARCFACE_TEMPLATE.T.astype(np.float64)).T + t[:2, 2]
        landmarks.append(pts)
        boxes.append([*pts.min(axis=0) - 20, *pts.max(axis=0) + 20])
    return FaceDetections(np.array(boxes, np.float32), np.ones(count, np.float32), np.array(landmarks, np.float32))


def test_arcface_preprocessing_matches_insightface(tmp_path: Path, t1: np.ndarray) -> None:
    """The probe model returns the input blob: aligned crop, RGB, (x - 127.5) / 127.5, NCHW."""
    path = save(arcface_probe_model(), tmp_path / "probe.onnx")
    recognizer = ArcFaceRecognizer(create_session(path, SESSION_OPTIONS))
    faces = faces_with_landmarks(t1, 3)
    out = recognizer.embed(t1, faces)
    assert out.shape == (3, 512) and out.dtype == np.float32
    for i, lm in enumerate(faces.landmarks):  # type: ignore[union-attr]
        crop = cv2.warpAffine(t1, estimate_norm(lm.astype(np.float64)), (112, 112), borderValue=0.0)
        blob = ((crop.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1).reshape(-1)
        np.testing.assert_allclose(out[i], blob[probe_indices()], atol=1e-6)


@pytest.mark.parametrize(("batch", "max_batch"), [(None, None), (None, 2), (1, None), (4, None)])
def test_arcface_batching_gives_the_same_embeddings(
    tmp_path: Path, t1: np.ndarray, batch: int | None, max_batch: int | None
) -> None:
    reference = ArcFaceRecognizer(create_session(save(arcface_random_model(), tmp_path / "ref.onnx"), SESSION_OPTIONS))
    model = arcface_random_model(batch=batch, weights_as_inputs=batch == 1)
    recognizer = ArcFaceRecognizer(create_session(save(model, tmp_path / "m.onnx"), SESSION_OPTIONS), max_batch)
    assert recognizer.fixed_batch == batch
    faces = faces_with_landmarks(t1, 5)
    expected = reference.embed(t1, faces)
    got = recognizer.embed(t1, faces)
    assert got.shape == (5, 512)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0), "raw, un-normalised vectors"
    assert recognizer.embed(t1, FaceDetections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32))).shape == (
        0,
        512,
    )


def test_arcface_needs_landmarks_and_512_outputs(tmp_path: Path, t1: np.ndarray) -> None:
    recognizer = ArcFaceRecognizer(create_session(save(arcface_random_model(), tmp_path / "a.onnx"), SESSION_OPTIONS))
    with pytest.raises(ValueError, match="landmarks"):
        recognizer.embed(t1, FaceDetections(np.array([[0, 0, 50, 50]], np.float32), np.ones(1, np.float32)))
    small = save(arcface_random_model(embedding_size=128), tmp_path / "b.onnx")
    with pytest.raises(ModelLoadError, match="512"):
        ArcFaceRecognizer(create_session(small, SESSION_OPTIONS))


# ---- ONNX interface reader ------------------------------------------------------------------------------


def test_onnx_interface_reader_matches_onnx(tmp_path: Path) -> None:
    models = {
        "scrfd": scrfd_random_model(),
        "scrfd_b": scrfd_random_model(order="stride", batched=True),
        "arcface": arcface_random_model(batch=1, weights_as_inputs=True),
        "decoy": decoy_model(192, 212),
    }
    for name, model in models.items():
        path = save(model, tmp_path / f"{name}.onnx")
        info = read_interface(path)
        weights = {i.name for i in model.graph.initializer}
        assert [i.name for i in info.inputs] == [i.name for i in model.graph.input if i.name not in weights]
        assert [o.name for o in info.outputs] == [o.name for o in model.graph.output]
        session = create_session(path, SESSION_OPTIONS)
        assert [list(i.shape) for i in info.inputs] == [
            [d if d is not None else None for d in i.shape] for i in session.get_inputs()
        ]
        assert looks_like_scrfd(info) == name.startswith("scrfd")
        assert looks_like_arcface(info) == (name == "arcface")
    (tmp_path / "junk.onnx").write_bytes(b"\xff\xff\xff not a model")
    with pytest.raises(ValueError):
        read_interface(tmp_path / "junk.onnx")


# ---- the family ------------------------------------------------------------------------------------------


def test_family_names(tmp_path: Path) -> None:
    family = make_family(tmp_path)
    assert family.task == ModelTask.FACIAL_RECOGNITION
    assert family.known() == ["antelopev2", "buffalo_l", "buffalo_m", "buffalo_s", "dlib"]
    assert family.installed() == ["dlib"]
    assert family.is_installed("dlib", "detection") and family.is_installed("dlib", "recognition")
    assert not family.is_installed("buffalo_l", "detection")
    assert family.component(ModelType.DETECTION) == "detection"
    assert family.component(ModelType.RECOGNITION) == "recognition"
    with pytest.raises(UnknownModelError):
        family.component(ModelType.VISUAL)
    assert family.canonical_name("buffalo_l") == "buffalo_l"
    hint = family.install_hint("buffalo_l")
    assert "python -m ai_service models pull buffalo_l" in hint and "non-commercial" in hint


def test_family_through_the_registry(tmp_path: Path) -> None:
    registry = ModelRegistry([make_family(tmp_path)])
    ref = registry.resolve(TASK, ModelType.DETECTION, "dlib")
    assert (ref.name, ref.component) == ("dlib", "detection")
    with pytest.raises(ModelNotInstalledError, match="models pull buffalo_l"):
        registry.resolve(TASK, ModelType.RECOGNITION, "immich-app/buffalo_l")
    with pytest.raises(UnknownModelError):
        registry.resolve(TASK, ModelType.DETECTION, "no-such-face-model")
    assert registry.installed() == {"facial-recognition": ["dlib"]}


def test_family_loads_the_immich_layout(tmp_path: Path, t1: np.ndarray) -> None:
    family = make_family(tmp_path)
    write_immich_pack(tmp_path / "models", detection=scrfd_planted_model(PLANTED), recognition=arcface_random_model())
    write_immich_pack(tmp_path / "models", "half-pack", detection=scrfd_random_model())
    assert family.installed() == ["dlib", TEST_SCRFD_NAME]
    assert family.is_installed("half-pack", "detection") and not family.is_installed("half-pack", "recognition")

    detector = family.load(TEST_SCRFD_NAME, "detection")
    recognizer = family.load(TEST_SCRFD_NAME, "recognition")
    assert isinstance(detector, ScrfdDetector) and isinstance(recognizer, ArcFaceRecognizer)
    faces = detector.detect(t1, 0.7)
    assert len(faces) == 2
    emb = recognizer.embed(t1, faces)
    assert emb.shape == (2, 512) and np.isfinite(emb).all()
    with pytest.raises(ModelNotInstalledError):
        family.load("half-pack", "recognition")


def test_family_reads_an_insightface_folder(tmp_path: Path) -> None:
    """Files are told apart by their interfaces: names differ between packs and mean nothing here."""
    folder = tmp_path / "insightface"
    write_insightface_pack(
        folder,
        "buffalo_l",
        {
            "1k3d68.onnx": decoy_model(192, 3309),
            "2d106det.onnx": decoy_model(192, 212),
            "det_10g.onnx": scrfd_random_model(),
            "genderage.onnx": decoy_model(96, 3),
            "w600k_r50.onnx": arcface_random_model(),
        },
    )
    # antelopev2.zip unpacks into a nested folder of the same name
    write_insightface_pack(
        folder / "antelopev2",
        "antelopev2",
        {"glintr100.onnx": arcface_random_model(batch=1), "scrfd_10g_bnkps.onnx": scrfd_random_model(order="stride")},
    )
    write_insightface_pack(folder, "my_pack", {"a.onnx": arcface_random_model(), "b.onnx": scrfd_random_model()})
    write_insightface_pack(folder, "no_detector", {"w600k_mbf.onnx": arcface_random_model()})
    family = make_family(tmp_path, insightface_dir=folder)

    assert family.installed() == ["antelopev2", "buffalo_l", "dlib", "my_pack"]
    assert family.insightface_files("buffalo_l") == {
        "detection": folder / "buffalo_l" / "det_10g.onnx",
        "recognition": folder / "buffalo_l" / "w600k_r50.onnx",
    }
    assert family.model_path("antelopev2", "recognition") == folder / "antelopev2" / "antelopev2" / "glintr100.onnx"
    assert family.model_path("my_pack", "detection") == folder / "my_pack" / "b.onnx"
    assert family.is_installed("no_detector", "recognition") and not family.is_installed("no_detector", "detection")
    assert isinstance(family.load("antelopev2", "detection"), ScrfdDetector)
    recognizer = family.load("antelopev2", "recognition")
    assert isinstance(recognizer, ArcFaceRecognizer) and recognizer.fixed_batch == 1

    # the Immich layout wins over the InsightFace folder for the same name
    write_immich_pack(tmp_path / "models", "buffalo_l", detection=scrfd_planted_model(PLANTED))
    assert (
        family.model_path("buffalo_l", "detection")
        == (tmp_path / "models" / "facial-recognition" / "buffalo_l" / "detection" / "model.onnx").resolve()
    )
    assert family.model_path("buffalo_l", "recognition") == folder / "buffalo_l" / "w600k_r50.onnx"


def test_family_reports_a_corrupt_model(tmp_path: Path) -> None:
    family = make_family(tmp_path)
    pack = write_immich_pack(tmp_path / "models", "broken", detection=scrfd_random_model())
    (pack / "detection" / "model.onnx").write_bytes(b"truncated download")
    with pytest.raises(ModelLoadError, match="broken"):
        family.load("broken", "detection")
    write_immich_pack(tmp_path / "models", "wrong", detection=arcface_random_model())
    with pytest.raises(ModelLoadError, match="SCRFD"):
        family.load("wrong", "detection")


# ---- concurrency ------------------------------------------------------------------------------------------


def test_concurrent_calls_give_serial_results(
    tmp_path: Path,
    dlib_detector: DlibFaceDetector,
    dlib_recognizer: DlibFaceRecognizer,
    t1: np.ndarray,
    astronaut: np.ndarray,
) -> None:
    scrfd = ScrfdDetector(create_session(save(scrfd_random_model(seed=4), tmp_path / "d.onnx"), SESSION_OPTIONS))
    arcface = ArcFaceRecognizer(create_session(save(arcface_random_model(), tmp_path / "r.onnx"), SESSION_OPTIONS))

    def dlib_pipeline(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        faces = dlib_detector.detect(image, 0.7)
        return faces.boxes, dlib_recognizer.embed(image, faces)

    def onnx_pipeline(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        faces = scrfd.detect(image, 0.6)
        return faces.boxes, arcface.embed(image, faces)

    jobs = [(dlib_pipeline, t1), (dlib_pipeline, astronaut), (onnx_pipeline, t1), (onnx_pipeline, astronaut)] * 2
    serial = [fn(img) for fn, img in jobs[:4]] * 2
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda job: job[0](job[1]), jobs))
    for (boxes, emb), (ref_boxes, ref_emb) in zip(parallel, serial, strict=True):
        np.testing.assert_array_equal(boxes, ref_boxes)
        np.testing.assert_allclose(emb, ref_emb, rtol=1e-5, atol=1e-6)


def test_decoded_jpeg_matches_what_immich_sends() -> None:
    """The photos are real JPEG bytes decodable by the service's decoder."""
    for data in (astronaut_jpeg(), insightface_t1_jpeg()):
        with Image.open(io.BytesIO(data)) as img:
            assert img.format == "JPEG"
    assert decode_image(insightface_t1_jpeg(), max_pixels=MAX_PIXELS).rgb.shape == (886, 1280, 3)
