"""Compare OCR engines on the shared OCR ground-truth set: recall and per-image latency.

Engines, each called the way its users call it, with its default settings:

* ``rapidocr`` 3.x (PP-OCRv6 small det + rec, angle classifier on): ``RapidOCR()(path)``;
* ``rapidocr-onnxruntime`` 1.x (PP-OCRv4 det + rec, classifier on): ``RapidOCR()(path)``; needs
  ``pip install --no-deps rapidocr-onnxruntime`` (a bench-only install, see the results file);
* this service's ``OcrFamily`` with Immich's default options (det minScore 0.5, maxResolution 736,
  rec minScore 0.8), from the file's bytes through ``decode_image`` like a request;
* with ``--variants``: the same pipeline with the angle classifier, and with rapidocr-onnxruntime's
  PP-OCRv4 models, to separate the model's contribution from the pipeline's.

Recall follows the set's README: join an image's lines, drop whitespace, fold full-width ASCII,
then count expected substrings found. Latency: median of ``--runs`` timed calls per image after
one warm-up, image by image (see :func:`run`).

    .venv/bin/python bench/ocr_compare.py [--runs 5] [--variants] [--data DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ai_service.imaging import decode_image  # noqa: E402
from ai_service.models.ocr import (  # noqa: E402
    BUNDLED_NAME,
    COMPONENT,
    OcrFamily,
    OcrModelFiles,
    OcrPipeline,
    bundled_classifier,
    bundled_files,
    load_pipeline,
)
from ai_service.models.store import ModelStore  # noqa: E402
from ai_service.runtime.onnx import SessionOptions  # noqa: E402
from ai_service.settings import AIServiceSettings  # noqa: E402

DEFAULT_DATA = REPO / "tests" / "data" / "ocr"  # the OCR ground-truth set kept in the repository

# Immich's defaults, as its server sends them.
DET_MIN_SCORE = 0.5
MAX_RESOLUTION = 736
REC_MIN_SCORE = 0.8

Reader = Callable[[Path], list[str]]  # image file -> recognised lines


def normalise(text: str) -> str:
    folded = "".join(
        chr(ord(c) - 0xFEE0) if 0xFF01 <= ord(c) <= 0xFF5E else (" " if c == "\u3000" else c) for c in text
    )
    return re.sub(r"\s+", "", folded)


def read_expected(data: Path) -> list[tuple[str, list[str]]]:
    rows: list[tuple[str, list[str]]] = []
    for line in (data / "expected.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        if line.strip():
            file, substrings, _source = line.split("\t")
            rows.append((file, [s.strip() for s in substrings.split(" | ")]))
    return rows


def missed_substrings(texts: list[str], substrings: list[str]) -> list[str]:
    joined = normalise("".join(texts))
    return [s for s in substrings if normalise(s) not in joined]


@dataclass
class EngineResult:
    name: str
    times: dict[str, list[float]] = field(default_factory=dict)  # file -> seconds per run
    missed: dict[str, list[str]] = field(default_factory=dict)

    def median_ms(self, file: str) -> float:
        return 1000 * statistics.median(self.times[file])

    def min_ms(self, file: str) -> float:
        return 1000 * min(self.times[file])


# ---- engines -----------------------------------------------------------------------------------------


def rapidocr_v3() -> Reader:
    from rapidocr import RapidOCR

    engine = RapidOCR(params={"Global.log_level": "error"})  # defaults, minus the per-call INFO logging

    def read(path: Path) -> list[str]:
        return list(engine(str(path)).txts or [])

    return read


def rapidocr_onnxruntime() -> Reader | None:
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError:
        return None
    engine = RapidOCR()

    def read(path: Path) -> list[str]:
        result, _elapsed = engine(str(path))
        return [line[1] for line in result or []]

    return read


def pipeline_reader(model: OcrPipeline) -> Reader:
    def read(path: Path) -> list[str]:
        image = decode_image(path.read_bytes(), max_pixels=10**8).rgb
        detections = model.detect(image, DET_MIN_SCORE, MAX_RESOLUTION)
        return model.recognize(image, detections, REC_MIN_SCORE).texts

    return read


def ocr_family() -> Reader:
    family = OcrFamily(ModelStore(Path(tempfile.mkdtemp(prefix="ocr-bench-"))), SessionOptions(), AIServiceSettings())
    model = family.load(family.canonical_name("PP-OCRv5_mobile"), COMPONENT)  # what Immich asks for
    return pipeline_reader(model)


def variants() -> dict[str, Reader]:
    out: dict[str, Reader] = {}
    family = OcrFamily(ModelStore(Path(tempfile.mkdtemp(prefix="ocr-bench-"))), SessionOptions(), AIServiceSettings())
    bundled = bundled_files()
    assert bundled is not None
    out["OcrFamily + angle classifier"] = pipeline_reader(
        load_pipeline(bundled, family.session_options, classifier=bundled_classifier())
    )
    try:
        import rapidocr_onnxruntime
    except ImportError:
        return out
    v4 = Path(rapidocr_onnxruntime.__file__).parent / "models"
    files = OcrModelFiles(v4 / "ch_PP-OCRv4_det_infer.onnx", v4 / "ch_PP-OCRv4_rec_infer.onnx")
    out["OcrFamily pipeline, PP-OCRv4 models"] = pipeline_reader(load_pipeline(files, family.session_options))
    return out


# ---- run ---------------------------------------------------------------------------------------------


def run(engines: dict[str, Reader], data: Path, runs: int) -> list[EngineResult]:
    """Per image, each engine in turn: one warm-up call (which also gives its text), then ``runs``
    timed calls back to back. Running an engine's calls together keeps the previous engine's
    ONNX Runtime threads (which spin after each run) from skewing its first timings; going image
    by image keeps slow drift of a shared machine from favouring one engine."""
    results = {name: EngineResult(name) for name in engines}
    for file, substrings in read_expected(data):
        for name, read in engines.items():
            results[name].missed[file] = missed_substrings(read(data / file), substrings)
            times = results[name].times[file] = []
            for _ in range(runs):
                started = time.perf_counter()
                read(data / file)
                times.append(time.perf_counter() - started)
    return list(results.values())


def print_report(results: list[EngineResult], data: Path, runs: int) -> None:
    rows = read_expected(data)
    total = sum(len(s) for _, s in rows)
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"onnxruntime {ort.__version__} {ort.get_device()}; median of {runs} runs per image; "
        f"load average at the end {os.getloadavg()[0]:.1f} (anything near or above the CPU count means "
        "other processes shared the cores and the times are inflated)\n"
    )
    # The minimum is shown too: on a shared machine it is the better estimate of uncontended speed.
    print("| engine | substrings found | recall | sum of per-image medians (ms) | sum of minimums (ms) |")
    print("|---|---|---|---|---|")
    for r in results:
        found = total - sum(len(m) for m in r.missed.values())
        medians = sum(r.median_ms(f) for f, _ in rows)
        minimums = sum(r.min_ms(f) for f, _ in rows)
        print(f"| {r.name} | {found}/{total} | {found / total:.1%} | {medians:.0f} | {minimums:.0f} |")
    print("\nper image: median ms (substrings found/expected)\n")
    print("| image | " + " | ".join(r.name for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for file, substrings in rows:
        cells = [
            f"{r.median_ms(file):.0f} ({len(substrings) - len(r.missed[file])}/{len(substrings)})" for r in results
        ]
        print(f"| {file} | " + " | ".join(cells) + " |")
    print("\nmissed substrings:")
    for r in results:
        missed = {f: m for f, m in r.missed.items() if m}
        print(f"- {r.name}: {missed or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with expected.tsv and the images")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per image and engine (median reported)")
    parser.add_argument("--variants", action="store_true", help="also time classifier / PP-OCRv4 variants")
    args = parser.parse_args()
    if not (args.data / "expected.tsv").is_file():
        sys.exit(f"no expected.tsv in {args.data}; pass --data")

    engines: dict[str, Reader] = {"rapidocr 3.x (PP-OCRv6 small), direct": rapidocr_v3()}
    legacy = rapidocr_onnxruntime()
    if legacy is None:
        print("rapidocr-onnxruntime is not installed: pip install --no-deps rapidocr-onnxruntime", file=sys.stderr)
    else:
        engines["rapidocr-onnxruntime 1.x (PP-OCRv4), direct"] = legacy
    engines[f"OcrFamily {BUNDLED_NAME}, Immich options"] = ocr_family()
    if args.variants:
        engines.update(variants())
    logging.getLogger("RapidOCR").setLevel(logging.ERROR)  # both libraries warn on every empty detection
    print_report(run(engines, args.data, args.runs), args.data, args.runs)


if __name__ == "__main__":
    main()
