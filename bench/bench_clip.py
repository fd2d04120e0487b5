"""CPU latency and throughput of CLIP on a 1440 x 1080 JPEG: this service's path vs. bare ONNX Runtime.

The model is a full-size ViT-B/16-shaped image tower (cn-clip ViT-B-16's: 224 px, patch 16, width
768, 12 layers, 12 heads, MLP 3072, 512-d projection) with random weights, built into a temporary
model folder in Immich's layout and loaded through ``ClipFamily``. Random weights cost exactly what
trained ones do, so the figures stand for the real model.

Compared in one run, same process, same session options:

* ``service``: JPEG bytes -> ``decode_image(min_side=224)`` (Pillow draft mode) -> ``encode_image``
  (resize + normalise + ONNX run + L2 normalisation): what one Immich ``SmartSearch`` request costs;
* the pieces: draft decode, full decode (what draft mode saves), preprocessing;
* ``bare ORT``: ``InferenceSession.run`` on the same preprocessed tensor, nothing else;
* with ``--text``: ``encode_text`` (tokenise + run + normalise) vs ``run`` on pre-tokenised ids, with
  a RoBERTa-wwm-ext-base-sized text tower (12 x 768, 52 tokens).

    .venv/bin/python bench/bench_clip.py [--runs 20] [--text] [--threads N]
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ai_service.imaging import decode_image  # noqa: E402
from ai_service.models.clip import ClipFamily, ClipTextualEncoder, ClipVisualEncoder  # noqa: E402
from ai_service.models.store import ModelStore  # noqa: E402
from ai_service.runtime.onnx import SessionOptions, default_intra_threads  # noqa: E402
from ai_service.settings import AIServiceSettings  # noqa: E402
from tests.builders.clip_models import build_vit_b16_model  # noqa: E402

NAME = "bench-vit-b-16"
MAX_PIXELS = 100_000_000


def photo_jpeg(width: int = 1440, height: int = 1080, quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth gradients, edges and sensor-like noise (compresses like a photo)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = np.stack([90 + 60 * yy / height, 140 + 40 * yy / height, 220 - 30 * yy / height], -1)
    ground = np.stack([150 + 50 * np.sin(xx / 37), 120 + 30 * np.cos(yy / 23), 80 + 20 * np.sin((xx + yy) / 51)], -1)
    pixels = np.where((yy > height * 0.55 + 40 * np.sin(xx / 120))[..., None], ground, sky)
    pixels += rng.normal(0, 6, pixels.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def timed(fn: Callable[[], object], runs: int, warmup: int = 3) -> list[float]:
    return timed_together([fn], runs, warmup)[0]


def timed_together(fns: list[Callable[[], object]], runs: int, warmup: int = 3) -> list[list[float]]:
    """Time several calls in alternation, so load from other processes hits them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, into in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            into.append((time.perf_counter() - start) * 1000.0)
    return times


HEADER = f"{'median':>8} {'mean':>8} {'p90':>8} {'per s':>8}"


def row(label: str, times: list[float]) -> str:
    median = statistics.median(times)
    p90 = sorted(times)[max(0, int(len(times) * 0.9) - 1)]
    return f"  {label:<50} {median:8.2f} {statistics.fmean(times):8.2f} {p90:8.2f} {1000.0 / median:8.1f}"


def overhead_line(service: list[float], bare: list[float]) -> str:
    # Paired differences: each service call was timed right next to a bare call.
    diffs = [a - b for a, b in zip(service, bare, strict=True)]
    median = statistics.median(diffs)
    return f"  service overhead over bare ORT (median of paired differences): {median:.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="timed calls per figure (after 3 warm-up calls)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: service default)")
    parser.add_argument("--text", action="store_true", help="also measure a ViT-B/16-sized cn-clip text tower")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    options = SessionOptions(intra_op_threads=args.threads)

    with tempfile.TemporaryDirectory(prefix="bench-clip-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        build_vit_b16_model(root, NAME, with_text=args.text)
        built = time.perf_counter() - started
        family = ClipFamily(ModelStore(root), options, AIServiceSettings(model_dir=root))
        started = time.perf_counter()
        visual = family.load(NAME, "visual")
        loaded = time.perf_counter() - started
        assert isinstance(visual, ClipVisualEncoder)
        size_mb = (root / "clip" / NAME / "visual" / "model.onnx").stat().st_size / 1e6

        jpeg = photo_jpeg()
        draft = decode_image(jpeg, max_pixels=MAX_PIXELS, min_side=visual.input_size)
        full = decode_image(jpeg, max_pixels=MAX_PIXELS)
        tensor = visual.preprocess(draft.rgb)[None]
        session: ort.InferenceSession = visual.session
        input_name = session.get_inputs()[0].name

        print(f"onnxruntime {ort.__version__}, providers {session.get_providers()}, {os.cpu_count()} CPU cores")
        print(
            f"intra-op threads {args.threads or default_intra_threads()}; ViT-B/16 image tower {size_mb:.0f} MB "
            f"(built {built:.1f}s, loaded {loaded:.1f}s)"
        )
        print(
            f"input: {len(jpeg) / 1024:.0f} KiB JPEG 1440x1080; draft decode gives "
            f"{draft.rgb.shape[1]}x{draft.rgb.shape[0]}; {args.runs} timed runs, service and bare alternating"
        )
        print(f"\n  {'ms per image':<50} {HEADER}")
        service, bare = timed_together(
            [
                lambda: visual.encode_image(decode_image(jpeg, max_pixels=MAX_PIXELS, min_side=visual.input_size).rgb),
                lambda: session.run(None, {input_name: tensor}),
            ],
            args.runs,
        )
        print(row("service: draft decode + preprocess + run + norm", service))
        print(row("bare ORT session.run (same preprocessed tensor)", bare))
        pieces = {
            "  draft decode (min_side=224)": lambda: decode_image(jpeg, max_pixels=MAX_PIXELS, min_side=224),
            "  preprocess the draft (360x270 -> 224)": lambda: visual.preprocess(draft.rgb),
            "  full decode (no draft)": lambda: decode_image(jpeg, max_pixels=MAX_PIXELS),
            "  preprocess a full decode (1440x1080 -> 224)": lambda: visual.preprocess(full.rgb),
        }
        for label, fn in pieces.items():
            print(row(label, timed(fn, args.runs)))
        print(overhead_line(service, bare))

        batch = [draft.rgb] * 8
        batched = timed(lambda: visual.encode_images(batch), max(3, args.runs // 4), warmup=1)
        print(f"  8 decoded images in one encode_images call: {statistics.median(batched) / 8:.2f} ms per image")

        if args.text:
            textual = family.load(NAME, "textual")
            assert isinstance(textual, ClipTextualEncoder)
            query = "一只在海滩上奔跑的狗 a dog running on the beach"
            feeds = textual.tokenize(query)
            print(f"\n  {'ms per query (52 tokens, 12 x 768 text tower)':<50} {HEADER}")
            text_service, text_bare = timed_together(
                [lambda: textual.encode_text(query), lambda: textual.session.run(None, feeds)], args.runs
            )
            print(row("service: tokenise + run + normalise", text_service))
            print(row("bare ORT session.run (same ids)", text_bare))
            print(row("  tokenise only", timed(lambda: textual.tokenize(query), args.runs)))
            print(overhead_line(text_service, text_bare))


if __name__ == "__main__":
    main()
