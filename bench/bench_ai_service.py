"""Service overhead of the AI service: each workload over HTTP /predict next to the same model
called directly in this process, in one run.

Workloads (what Immich sends):

* CLIP visual, 1440x1080 JPEG, full-size ViT-B/16-shaped model with random weights (speed only) —
  direct = the bare ``onnxruntime`` ``session.run`` on the preprocessed tensor;
* OCR, 1440-px previews (the shared OCR images scaled up) — direct = the same PP-OCRv6 pipeline object
  (detect + recognise) on the decoded array, and RapidOCR's own engine for reference;
* faces (bundled dlib), 1440-px preview of scikit-image's astronaut — direct = detect + embed.

"Overhead" = HTTP median - direct median, as a share of the direct median: multipart parsing, JPEG
decode, thread hop, JSON. Target: <= 5 %. Then throughput with 1 and 2 concurrent clients over HTTP.

    .venv/bin/python bench/bench_ai_service.py [--runs 7]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_clip import photo_jpeg  # noqa: E402

from ai_service.imaging import decode_image  # noqa: E402
from ai_service.inference import InferenceService  # noqa: E402
from ai_service.protocol.immich import ModelTask, ModelType  # noqa: E402
from ai_service.settings import AIServiceSettings  # noqa: E402
from tests import immich_requests as im  # noqa: E402
from tests.builders.clip_models import build_vit_b16_model  # noqa: E402
from tests.servers import python_module_server  # noqa: E402

CLIP = "bench-vit-b-16"
SHARED = REPO / "tests" / "data" / "ocr"  # the OCR ground-truth set kept in the repository


def median_ms(fn: Callable[[], object], runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def preview(data: bytes, side: int = 1440) -> bytes:
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        scale = side / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        return buf.getvalue()


def throughput(fn: Callable[[], object], requests: int, clients: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda _: fn(), range(requests)))
    return requests / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()

    from skimage import data as skdata

    astro = io.BytesIO()
    Image.fromarray(skdata.astronaut()).save(astro, "JPEG", quality=95)
    workloads = {
        "CLIP visual 1440x1080": (im.clip_visual(CLIP), photo_jpeg()),
        "OCR 1440-px preview": (im.OCR, preview((SHARED / "paddleocr_00056221.jpg").read_bytes())),
        "faces 1440-px preview": (im.faces("dlib", 0.7), preview(astro.getvalue())),
    }

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp)
        print("building a ViT-B/16-shaped CLIP model (random weights) ...", flush=True)
        build_vit_b16_model(model_dir, CLIP)
        env = {"AI_SERVICE_MODEL_DIR": str(model_dir), "AI_SERVICE_MODEL_TTL": "0"}
        service = InferenceService(AIServiceSettings(model_dir=model_dir, model_ttl=0))
        registry, cache = service.registry, service.cache

        # The same model objects the service uses, called directly on decoded arrays.
        visual = cache.get(registry.resolve(ModelTask.CLIP, ModelType.VISUAL, CLIP))
        clip_image = decode_image(workloads["CLIP visual 1440x1080"][1], max_pixels=10**8, min_side=224)
        tensor = visual.preprocess(clip_image.rgb)[None]  # type: ignore[attr-defined]
        session = visual.session  # type: ignore[attr-defined]
        input_name = session.get_inputs()[0].name
        ocr = cache.get(registry.resolve(ModelTask.OCR, ModelType.DETECTION, "PP-OCRv5_mobile"))
        ocr_image = decode_image(workloads["OCR 1440-px preview"][1], max_pixels=10**8).rgb
        detector = cache.get(registry.resolve(ModelTask.FACIAL_RECOGNITION, ModelType.DETECTION, "dlib"))
        recognizer = cache.get(registry.resolve(ModelTask.FACIAL_RECOGNITION, ModelType.RECOGNITION, "dlib"))
        face_image = decode_image(workloads["faces 1440-px preview"][1], max_pixels=10**8).rgb
        direct: dict[str, Callable[[], object]] = {
            "CLIP visual 1440x1080": lambda: session.run(None, {input_name: tensor}),
            "OCR 1440-px preview": lambda: ocr.recognize(  # type: ignore[attr-defined]
                ocr_image,
                ocr.detect(ocr_image, 0.5, 736),
                0.8,  # type: ignore[attr-defined]
            ),
            "faces 1440-px preview": lambda: recognizer.embed(  # type: ignore[attr-defined]
                face_image,
                detector.detect(face_image, 0.7),  # type: ignore[attr-defined]
            ),
        }

        http_ms: dict[str, float] = {}
        direct_ms: dict[str, float] = {}
        http_tput: dict[str, tuple[float, float]] = {}
        with python_module_server("ai_service", env) as base, httpx.Client(timeout=300) as client:
            for label, (entries, image) in workloads.items():

                def call(entries: dict = entries, image: bytes = image) -> None:
                    response = im.predict(client, base, entries, image=image)
                    response.raise_for_status()

                # Interleaved, so load from anything else on the machine hits both sides alike; the server
                # idles while the direct call runs and vice versa.
                h, d = [], []
                for i in range(args.runs + 2):
                    t0 = time.perf_counter()
                    call()
                    t1 = time.perf_counter()
                    direct[label]()
                    t2 = time.perf_counter()
                    if i >= 2:  # warm-up
                        h.append((t1 - t0) * 1000)
                        d.append((t2 - t1) * 1000)
                http_ms[label], direct_ms[label] = statistics.median(h), statistics.median(d)
                n = max(4, args.runs)
                http_tput[label] = (throughput(call, n, 1), throughput(call, n, 2))

        from rapidocr import RapidOCR

        engine = RapidOCR()
        bgr = np.ascontiguousarray(ocr_image[:, :, ::-1])
        rapid_ms = median_ms(lambda: engine(bgr), max(3, args.runs // 2))

    print()
    print("| workload | HTTP /predict median | direct model call median | overhead | req/s, 1 client | 2 clients |")
    print("|---|---|---|---|---|---|")
    report = {}
    for label in workloads:
        overhead = (http_ms[label] - direct_ms[label]) / direct_ms[label] * 100
        one, two = http_tput[label]
        print(
            f"| {label} | {http_ms[label]:.1f} ms | {direct_ms[label]:.1f} ms | {overhead:+.1f} % "
            f"| {one:.2f} | {two:.2f} |"
        )
        report[label] = {"http_ms": http_ms[label], "direct_ms": direct_ms[label], "overhead_pct": overhead}
    print(f"\nRapidOCR's own engine (defaults) on the same OCR preview: {rapid_ms:.1f} ms")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
