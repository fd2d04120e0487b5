"""Throughput of CLIP visual and ArcFace recognition with micro-batching on vs off, by concurrency.

Models (random weights cost exactly what trained ones do, so the figures stand for the real models):

* CLIP visual: a full-size ViT-B/16-shaped image tower (cn-clip ViT-B-16's: 224 px, patch 16, width
  768, 12 layers, 512-d), built in Immich's layout and loaded as ``ClipVisualEncoder``; one request =
  ``encode_image`` on a 640 x 480 RGB image (resize + normalise + ONNX run + L2 normalisation);
* face recognition: an IResNet-50-shaped ArcFace (``w600k_r50``'s layout, ~6.3 GMAC per face, dynamic
  batch axis) as ``ArcFaceRecognizer``; one request = ``embed`` of ``--faces`` aligned faces of a 1440 x
  1080 image (alignment + blob + ONNX run).

``N`` threads each send requests back to back (a request starts as soon as that thread's previous one
returned), as N concurrent Immich jobs would reach the service's thread pool. Batching *on* is forced
here (the service batches only on GPUs unless ``AI_SERVICE_BATCH_ENABLED=true``) with the service's other
defaults unless told otherwise (``--max-size 16 --wait-ms 2``, concurrency auto); *off* is the same encoder
without a batcher, every request its own ``InferenceSession.run``. Each figure is
measured after a warm-up round; reported: requests/s, median and 95th-percentile latency, and the mean
number of requests per ONNX run. Off and on alternate in ``--rounds`` rounds per figure, so that a busy
spell on a shared machine weighs on both alike.

    .venv/bin/python bench/bench_batching.py [--concurrency 1 8 32] [--seconds 12] [--faces 1]
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ai_service.models.base import FaceDetections  # noqa: E402
from ai_service.models.clip import ClipVisualEncoder  # noqa: E402
from ai_service.models.clip.common import read_json  # noqa: E402
from ai_service.models.faces import ArcFaceRecognizer  # noqa: E402
from ai_service.models.faces.arcface import ARCFACE_TEMPLATE  # noqa: E402
from ai_service.runtime.batching import DEFAULT_MAX_SIZE, DEFAULT_WAIT_MS, BatchOptions  # noqa: E402
from ai_service.runtime.onnx import SessionOptions, create_session, default_intra_threads  # noqa: E402
from tests.builders.clip_models import build_vit_b16_model  # noqa: E402
from tests.builders.face_models import arcface_r50_shaped_model  # noqa: E402

Request = Callable[[int], object]


@dataclass
class Result:
    requests: int
    seconds: float
    latencies: list[float]
    per_run: float | None  # mean requests per ONNX run (None: unbatched, always 1)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def drive(request: Request, concurrency: int, seconds: float, min_requests: int) -> tuple[int, float, list[float]]:
    """``concurrency`` threads calling ``request`` back to back for about ``seconds`` (at least ``min_requests``)."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    barrier = threading.Barrier(concurrency + 1)
    stop_at = [0.0]
    count = [0]
    lock = threading.Lock()

    def worker(index: int) -> None:
        barrier.wait()
        while True:
            with lock:
                if time.monotonic() >= stop_at[0] and count[0] >= min_requests:
                    return
                count[0] += 1
                seq = count[0]
            started = time.monotonic()
            request(seq)
            latencies[index].append(time.monotonic() - started)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    started = time.monotonic()
    stop_at[0] = started + seconds
    barrier.wait()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    flat = [x for per in latencies for x in per]
    return len(flat), elapsed, flat


def measure(
    make: Callable[[bool], tuple[Request, Callable[[], tuple[int, int]]]],
    batched: bool,
    concurrency: int,
    seconds: float,
) -> Result:
    request, counters = make(batched)
    drive(request, concurrency, seconds=0.0, min_requests=concurrency)  # warm-up: sessions, arenas, threads
    runs_before, items_before = counters()
    done, elapsed, latencies = drive(request, concurrency, seconds, min_requests=2 * concurrency)
    runs, items = counters()
    per_run = (items - items_before) / max(1, runs - runs_before) if batched else None
    return Result(done, elapsed, latencies, per_run)


def merge(results: list[Result]) -> Result:
    per_run = [r.per_run for r in results if r.per_run is not None]
    return Result(
        requests=sum(r.requests for r in results),
        seconds=sum(r.seconds for r in results),
        latencies=[x for r in results for x in r.latencies],
        per_run=sum(per_run) / len(per_run) if per_run else None,
    )


def clip_maker(
    model_dir: Path, options: BatchOptions
) -> Callable[[bool], tuple[Request, Callable[[], tuple[int, int]]]]:
    folder = model_dir / "clip" / "bench-vit-b-16"
    config = read_json(folder / "config.json", "bench")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (480, 640, 3), np.uint8) for _ in range(8)]
    encoders: dict[bool, ClipVisualEncoder] = {}

    def make(batched: bool) -> tuple[Request, Callable[[], tuple[int, int]]]:
        if batched not in encoders:
            session_options = SessionOptions(batching=options if batched else BatchOptions(enabled=False))
            encoders[batched] = ClipVisualEncoder("bench", folder, config, session_options)
        encoder = encoders[batched]

        def counters() -> tuple[int, int]:
            stats = encoder.batcher.stats() if encoder.batcher else None
            return (stats.batches, stats.items) if stats else (0, 0)

        return (lambda seq: encoder.encode_image(images[seq % len(images)])), counters

    return make


def face_maker(
    model_path: Path, options: BatchOptions, faces: int
) -> Callable[[bool], tuple[Request, Callable[[], tuple[int, int]]]]:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (1080, 1440, 3), np.uint8)
    detections = []
    for i in range(8):
        marks = np.array([ARCFACE_TEMPLATE * 1.5 + rng.uniform(0, 900, 2) for _ in range(faces)], np.float32)
        boxes = np.concatenate([marks.min(axis=1), marks.max(axis=1)], axis=1)
        detections.append(FaceDetections(boxes, np.full(faces, 0.9, np.float32), marks))
        del i
    recognizers: dict[bool, ArcFaceRecognizer] = {}

    def make(batched: bool) -> tuple[Request, Callable[[], tuple[int, int]]]:
        if batched not in recognizers:
            session = create_session(model_path, SessionOptions())
            recognizers[batched] = ArcFaceRecognizer(session, batching=options if batched else None)
        recognizer = recognizers[batched]

        def counters() -> tuple[int, int]:
            stats = recognizer.batcher.stats() if recognizer.batcher else None
            return (stats.batches, stats.items) if stats else (0, 0)

        return (lambda seq: recognizer.embed(image, detections[seq % len(detections)])), counters

    return make


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=12.0, help="measuring time per figure (default 12)")
    parser.add_argument("--rounds", type=int, default=3, help="off/on alternations per figure (default 3)")
    parser.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE)
    parser.add_argument("--wait-ms", type=float, default=DEFAULT_WAIT_MS)
    parser.add_argument("--batch-concurrency", type=int, default=0, help="0: auto, as the service")
    parser.add_argument("--faces", type=int, default=1, help="faces per face-recognition request (default 1)")
    parser.add_argument("--only", choices=["clip", "faces"], help="run one model only")
    args = parser.parse_args()

    options = BatchOptions(
        enabled=True, max_size=args.max_size, wait_ms=args.wait_ms, concurrency=args.batch_concurrency
    )
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, onnxruntime {ort.__version__} "
        f"({', '.join(ort.get_available_providers())}), intra-op threads {default_intra_threads()}, no GPU"
    )
    print(
        f"# batching on: max size {options.max_size}, wait {options.wait_ms:g} ms, concurrency "
        f"{options.concurrency or 'auto'}; {args.seconds:g} s per figure"
    )
    with tempfile.TemporaryDirectory() as tmp:
        models: list[tuple[str, Callable[[bool], tuple[Request, Callable[[], tuple[int, int]]]]]] = []
        if args.only in (None, "clip"):
            build_vit_b16_model(Path(tmp))
            models.append(("CLIP visual ViT-B/16 (image/s)", clip_maker(Path(tmp), options)))
        if args.only in (None, "faces"):
            model, _ = arcface_r50_shaped_model()
            onnx.save(model, Path(tmp) / "arcface.onnx")
            label = f"ArcFace R50 ({args.faces} face{'s' if args.faces > 1 else ''}/request, request/s)"
            models.append((label, face_maker(Path(tmp) / "arcface.onnx", options, args.faces)))
        for label, make in models:
            print(f"\n## {label}")
            print("| concurrent | batching | req/s | p50 ms | p95 ms | req per run | speed-up |")
            print("|---:|---|---:|---:|---:|---:|---:|")
            for concurrency in args.concurrency:
                # Off and on alternate in rounds, so a slow spell of a shared machine hits both alike.
                rounds = [
                    (
                        measure(make, False, concurrency, args.seconds / args.rounds),
                        measure(make, True, concurrency, args.seconds / args.rounds),
                    )
                    for _ in range(args.rounds)
                ]
                off = merge([r[0] for r in rounds])
                on = merge([r[1] for r in rounds])
                for name, result in (("off", off), ("on", on)):
                    per_run = "1" if result.per_run is None else f"{result.per_run:.1f}"
                    gain = f"{on.rate / off.rate:.2f}x" if name == "on" else ""
                    p50 = statistics.median(result.latencies) * 1000
                    p95 = result.percentile(0.95) * 1000
                    row = f"| {concurrency} | {name} | {result.rate:.2f} | {p50:.0f} | {p95:.0f} | {per_run} | {gain} |"
                    print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
