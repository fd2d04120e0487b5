"""Face detection + recognition latency and throughput on Immich-sized previews (CPU).

Inputs: InsightFace's ``t1.jpg`` (6 faces) and scikit-image's astronaut (1 face), upscaled so the
shorter side is 1440 px and re-encoded as JPEG, as Immich's preview generator would send them.

Pipelines, each timed from the JPEG bytes (decode included, like a request):

* ``FaceFamily dlib``: this service's ``dlib`` model (HOG at 1.5x + 5-point alignment + ResNet);
* ``dlib direct up0`` / ``up1``: the same dlib models called the plain way (``detector(img, n)``,
  ``shape_predictor``, ``compute_face_descriptor``), upsample 0 (misses faces < ~72 px) and 1
  (``face_recognition``'s default);
* ``dlib CNN (mmod) x0.5``: the CNN detector on a half-size image, what made HOG the choice;
* ``SCRFD+ArcFace (random, full-size shape)`` (``--onnx``): random-weight models with det_10g's
  interface at ~8 GMAC and w600k_r50's layout (~6.3 GMAC/face), through ``ScrfdDetector`` and
  ``ArcFaceRecognizer``; the faces embedded are dlib's (their count), since random weights find none.
  Real buffalo_l timings will differ; this shows the order of magnitude on the same machine.

Latency: median of ``--runs`` calls after one warm-up. Throughput: ``--concurrency`` threads (Immich
runs 2 face jobs at once) over ``--requests`` requests.

``--distances`` instead prints the evidence for the ``maxDistance`` range of ``dlib``: cosine distances
Immich would compute between the stored vectors for the same person and for different people, on the
photos of ten people in ``tests/data/faces`` (see ``tests/face_photos.py``), and the same for dlib's raw
(uncentred) descriptors as earlier versions stored them.

    .venv/bin/python bench/bench_faces.py [--runs 5] [--onnx] [--cnn]
    .venv/bin/python bench/bench_faces.py --distances
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ai_service.imaging import decode_image  # noqa: E402
from ai_service.models.base import FaceDetections  # noqa: E402
from ai_service.models.faces import ArcFaceRecognizer, FaceFamily, ScrfdDetector  # noqa: E402
from ai_service.models.faces.arcface import ARCFACE_TEMPLATE  # noqa: E402
from ai_service.models.faces.dlib_models import (  # noqa: E402
    RECOGNITION_FILE,
    SHAPE_PREDICTOR_FILE,
    dlib_model_dir,
)
from ai_service.models.store import ModelStore  # noqa: E402
from ai_service.runtime.onnx import SessionOptions, create_session  # noqa: E402
from ai_service.settings import AIServiceSettings  # noqa: E402
from tests.assets import astronaut_jpeg, insightface_t1_jpeg, preview_jpeg  # noqa: E402

MAX_PIXELS = 100_000_000
MIN_SCORE = 0.7

Pipeline = Callable[[bytes], int]  # JPEG bytes -> number of faces embedded


def decode(data: bytes) -> np.ndarray:
    return decode_image(data, max_pixels=MAX_PIXELS).rgb


def family_pipeline(family: FaceFamily) -> Pipeline:
    detector = family.load("dlib", "detection")
    recognizer = family.load("dlib", "recognition")

    def run(data: bytes) -> int:
        image = decode(data)
        faces = detector.detect(image, MIN_SCORE)  # type: ignore[attr-defined]
        return len(recognizer.embed(image, faces))  # type: ignore[attr-defined]

    return run


def dlib_direct_pipeline(upsample: int) -> Pipeline:
    import dlib

    folder = dlib_model_dir()
    assert folder is not None
    # One HOG detector per thread: a detector shared by two threads returns garbage (seen: 583
    # "faces" on t1), because the scan keeps its feature pyramid in the detector object.
    local = threading.local()
    shape_predictor = dlib.shape_predictor(str(folder / SHAPE_PREDICTOR_FILE))
    net = dlib.face_recognition_model_v1(str(folder / RECOGNITION_FILE))

    def run(data: bytes) -> int:
        image = decode(data)
        if not hasattr(local, "detector"):
            local.detector = dlib.get_frontal_face_detector()
        rects = local.detector(image, upsample)
        return len([net.compute_face_descriptor(image, shape_predictor(image, r)) for r in rects])

    return run


def dlib_cnn_pipeline(scale: float = 0.5) -> Pipeline:
    import cv2
    import dlib

    folder = dlib_model_dir()
    assert folder is not None
    local = threading.local()  # like the HOG detector, a dlib network is not safe to share
    shape_predictor = dlib.shape_predictor(str(folder / SHAPE_PREDICTOR_FILE))
    net = dlib.face_recognition_model_v1(str(folder / RECOGNITION_FILE))

    def run(data: bytes) -> int:
        image = decode(data)
        small = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        if not hasattr(local, "cnn"):
            local.cnn = dlib.cnn_face_detection_model_v1(str(folder / "mmod_human_face_detector.dat"))
        found = local.cnn(small, 0)
        rects = [
            dlib.rectangle(
                int(d.rect.left() / scale),
                int(d.rect.top() / scale),
                int(d.rect.right() / scale),
                int(d.rect.bottom() / scale),
            )
            for d in found
        ]
        return len([net.compute_face_descriptor(image, shape_predictor(image, r)) for r in rects])

    return run


def onnx_pipeline(folder: Path, face_counts: dict[bytes, int]) -> tuple[Pipeline, str]:
    import onnx

    from tests.builders.face_models import arcface_r50_shaped_model, scrfd_fullsize_model

    det_model, det_gmac = scrfd_fullsize_model()
    rec_model, rec_gmac = arcface_r50_shaped_model()
    onnx.save(det_model, folder / "det.onnx")
    onnx.save(rec_model, folder / "rec.onnx")
    options = SessionOptions()
    detector = ScrfdDetector(create_session(folder / "det.onnx", options))
    recognizer = ArcFaceRecognizer(create_session(folder / "rec.onnx", options))

    def run(data: bytes) -> int:
        image = decode(data)
        detector.detect(image, MIN_SCORE)
        n = face_counts[data]
        # Synthetic 5-point landmarks (a 2x-scaled template per face): alignment and batching as for real faces.
        landmarks = np.stack([ARCFACE_TEMPLATE * 2 + [100 + 250 * i, 200] for i in range(n)]).astype(np.float32)
        faces = FaceDetections(np.zeros((n, 4), np.float32), np.ones(n, np.float32), landmarks)
        return len(recognizer.embed(image, faces))

    return run, f"~{det_gmac:.1f} GMAC det + {rec_gmac:.1f} GMAC/face rec"


def measure(pipeline: Pipeline, data: bytes, runs: int) -> tuple[float, float, int]:
    """Median wall and CPU seconds (CPU: all threads of the process, so it includes ONNX Runtime's
    intra-op threads; on a shared machine it is the steadier figure) and the face count."""
    faces = pipeline(data)  # warm-up
    walls, cpus = [], []
    for _ in range(runs):
        start, cpu = time.perf_counter(), time.process_time()
        pipeline(data)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), faces


def throughput(pipeline: Pipeline, images: list[bytes], requests: int, concurrency: int) -> float:
    jobs = [images[i % len(images)] for i in range(requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(pipeline, jobs))
    return requests / (time.perf_counter() - start)


def distance_report(family: FaceFamily) -> None:
    from tests.face_photos import cosine_distances, labelled_vectors

    detector = family.load("dlib", "detection")
    recognizer = family.load("dlib", "recognition")

    def both(image: np.ndarray, faces: FaceDetections) -> np.ndarray:  # stored vector, then the raw descriptor
        return np.hstack([recognizer.embed(image, faces), recognizer.descriptors(image, faces)])  # type: ignore[attr-defined]

    labels, vectors = labelled_vectors(lambda img: detector.detect(img, MIN_SCORE), both)  # type: ignore[attr-defined]
    print(f"{len(labels)} faces of {len(set(labels))} people (tests/data/faces + the astronaut, four variants each)")
    parts = {"stored vectors (centred, unit, padded)": vectors[:, :512], "raw descriptors": vectors[:, 512:]}
    for name, part in parts.items():
        d = cosine_distances(labels, part)
        print(f"\n{name}: {d.summary()}")
        for threshold in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7):
            print(
                f"  maxDistance {threshold:3.1f}: same-person pairs matched {(d.same <= threshold).mean():6.1%}, "
                f"different-person pairs matched {(d.different <= threshold).mean():6.2%}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=12, help="requests for the throughput figure")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--onnx", action="store_true", help="also time full-size-shaped SCRFD + ArcFace")
    parser.add_argument("--cnn", action="store_true", help="also time dlib's CNN detector (slow)")
    parser.add_argument("--distances", action="store_true", help="print dlib's distance figures instead")
    args = parser.parse_args()
    if args.distances:
        with tempfile.TemporaryDirectory() as tmp:
            settings = AIServiceSettings(model_dir=Path(tmp) / "models")
            distance_report(FaceFamily(ModelStore(settings.model_dir), SessionOptions(), settings))
        return

    images = {
        "t1 2080x1440": preview_jpeg(insightface_t1_jpeg()),
        "astronaut 1440x1440": preview_jpeg(astronaut_jpeg()),
    }
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {load} (figures are only comparable on an otherwise idle machine)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        settings = AIServiceSettings(model_dir=Path(tmp) / "models")
        family = FaceFamily(ModelStore(settings.model_dir), SessionOptions(), settings)
        pipelines: dict[str, Pipeline] = {
            "FaceFamily dlib (HOG 1.5x)": family_pipeline(family),
            "dlib direct up0": dlib_direct_pipeline(0),
            "dlib direct up1": dlib_direct_pipeline(1),
        }
        if args.cnn:
            pipelines["dlib CNN (mmod) x0.5"] = dlib_cnn_pipeline()
        if args.onnx:
            counts = {data: family_pipeline(family)(data) for data in images.values()}
            run, label = onnx_pipeline(Path(tmp), counts)
            pipelines[f"SCRFD+ArcFace random ({label})"] = run

        print(f"\nlatency: median of {args.runs} after a warm-up, one request at a time: wall ms / CPU ms (faces)")
        for name, pipeline in pipelines.items():
            cells = []
            for label, data in images.items():
                wall, cpu, faces = measure(pipeline, data, args.runs)
                cells.append(f"{label}: {wall * 1000:5.0f} / {cpu * 1000:5.0f} ms ({faces})")
            print(f"  {name:<45} " + " | ".join(cells))
        print(f"\nthroughput: {args.requests} requests, {args.concurrency} at a time, both images alternating")
        for name, pipeline in pipelines.items():
            rate = throughput(pipeline, list(images.values()), args.requests, args.concurrency)
            print(f"  {name:<45} {rate:5.2f} images/s")


if __name__ == "__main__":
    main()
