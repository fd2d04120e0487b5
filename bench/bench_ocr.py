"""CPU latency and throughput of OCR on 1440-px previews: this service's pipeline vs. rapidocr direct.

Immich OCRs the asset's *preview* (shorter side 1440 px by default), so this is the size that
matters. Inputs: the shared OCR images scaled up so their shorter side is 1440 (bicubic), plus a
rendered 1920 x 1440 page of mixed Chinese/English lines (needs fonts-wqy-zenhei). Timed from the
decoded RGB array, so decoding is not part of either figure.

Engines, in the same run:

* ``OcrFamily`` (bundled PP-OCRv6 small) with Immich's options: det minScore 0.5,
  maxResolution 736, rec minScore 0.8;
* the same pipeline with maxResolution 1440 (detection at full preview size, like rapidocr);
* ``rapidocr`` 3.x ``RapidOCR()`` with its defaults, given the BGR array: the same model files.
  It never shrinks an image whose shorter side is over 736 px, so it detects at 1440 x 1920.

With ``--memory-release``, the engines are instead the pipeline at Immich's options under each
``AI_SERVICE_OCR_MEMORY_RELEASE`` mode (shrink the ONNX Runtime arena after every run, no arena,
keep the arena), timed side by side: the speed cost of giving memory back.

Reported: median latency per image (``--runs`` timed calls after a warm-up), sequential
throughput, throughput with ``--clients`` concurrent callers, and recall on the scaled set.

    .venv/bin/python bench/bench_ocr.py [--runs 3] [--clients 2] [--memory-release]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ocr_compare import DEFAULT_DATA, missed_substrings, read_expected

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ai_service.imaging import decode_image  # noqa: E402
from ai_service.models.ocr import BUNDLED_NAME, COMPONENT, OcrFamily  # noqa: E402
from ai_service.models.store import ModelStore  # noqa: E402
from ai_service.runtime.onnx import SessionOptions  # noqa: E402
from ai_service.settings import AIServiceSettings  # noqa: E402

PREVIEW_SIDE = 1440
FONT = Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc")
PAGE_LINES = [
    "增值税专用发票 No.12345678",
    "北京欢迎你 Hello World 2026",
    "上海市浦东新区世纪大道100号",
    "订单编号: ZH-2026-0815  金额 ¥1,280.00",
    "Immich 照片库 中文搜索 OCR test",
    "深圳湾公园 Shenzhen Bay Park",
    "营业时间 09:00-21:00 全年无休",
    "请勿吸烟 No Smoking",
    "出口 EXIT  紧急出口 Emergency Exit",
    "广州塔 Canton Tower 600m",
]

Engine = Callable[[np.ndarray], list[str]]  # RGB image -> recognised lines


def scaled_previews(data: Path) -> dict[str, tuple[np.ndarray, list[str]]]:
    out: dict[str, tuple[np.ndarray, list[str]]] = {}
    for file, substrings in read_expected(data):
        rgb = decode_image((data / file).read_bytes(), max_pixels=10**8).rgb
        h, w = rgb.shape[:2]
        scale = PREVIEW_SIDE / min(h, w)
        size = (round(w * scale), round(h * scale))
        out[file] = (np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC)), substrings)
    return out


def rendered_page() -> tuple[np.ndarray, list[str]] | None:
    if not FONT.is_file():
        return None
    font = ImageFont.truetype(str(FONT), 56)
    page = Image.new("RGB", (1920, PREVIEW_SIDE), (250, 248, 240))
    draw = ImageDraw.Draw(page)
    for i, line in enumerate(PAGE_LINES):
        draw.text((120, 80 + i * 128), line, font=font, fill=(20, 20, 20))
    return np.asarray(page), PAGE_LINES


def family_engine(max_resolution: int, release: str | None = None) -> Engine:
    settings = AIServiceSettings() if release is None else AIServiceSettings(ocr_memory_release=release)
    family = OcrFamily(ModelStore(Path(tempfile.mkdtemp(prefix="ocr-bench-"))), SessionOptions(), settings)
    model = family.load(BUNDLED_NAME, COMPONENT)

    def read(image: np.ndarray) -> list[str]:
        return model.recognize(image, model.detect(image, 0.5, max_resolution), 0.8).texts

    return read


def rapidocr_engine() -> Engine:
    from rapidocr import RapidOCR

    engine = RapidOCR(params={"Global.log_level": "error"})

    def read(image: np.ndarray) -> list[str]:
        # An ndarray is taken as BGR (OpenCV order), as rapidocr documents.
        return list(engine(np.ascontiguousarray(image[:, :, ::-1])).txts or [])

    return read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--runs", type=int, default=3, help="timed calls per image and engine")
    parser.add_argument("--clients", type=int, default=2, help="concurrent callers for the throughput figure")
    parser.add_argument(
        "--memory-release", action="store_true", help="compare AI_SERVICE_OCR_MEMORY_RELEASE modes instead"
    )
    args = parser.parse_args()
    if not (args.data / "expected.tsv").is_file():
        sys.exit(f"no expected.tsv in {args.data}; pass --data")

    images = scaled_previews(args.data)
    page = rendered_page()
    if page is not None:
        images["rendered_page_1920x1440"] = page
    engines: dict[str, Engine] = {
        "OcrFamily, Immich options (det at 736)": family_engine(736),
        "OcrFamily, maxResolution 1440": family_engine(PREVIEW_SIDE),
        "rapidocr 3.x direct (det at full size)": rapidocr_engine(),
    }
    if args.memory_release:
        engines = {
            f"OcrFamily at 736, memory release '{m}'": family_engine(736, m) for m in ("shrink", "no-arena", "keep")
        }
    logging.getLogger("RapidOCR").setLevel(logging.ERROR)

    medians: dict[str, dict[str, float]] = {name: {} for name in engines}
    found: dict[str, int] = dict.fromkeys(engines, 0)
    total = sum(len(s) for s in (subs for _, subs in images.values()))
    for file, (image, substrings) in images.items():
        for name, read in engines.items():
            found[name] += len(substrings) - len(missed_substrings(read(image), substrings))  # warm-up
            times = []
            for _ in range(args.runs):
                started = time.perf_counter()
                read(image)
                times.append(time.perf_counter() - started)
            medians[name][file] = 1000 * statistics.median(times)

    # Throughput with concurrent callers (as Immich's job queues plus a search user produce):
    # every image once per pass, median of ``runs`` passes.
    concurrent: dict[str, float] = {}
    work = [image for image, _ in images.values()]
    for name, read in engines.items():
        rates = []
        with ThreadPoolExecutor(max_workers=args.clients) as pool:
            for _ in range(args.runs):
                started = time.perf_counter()
                list(pool.map(read, work))
                rates.append(len(work) / (time.perf_counter() - started))
        concurrent[name] = statistics.median(rates)

    print(
        f"\n{len(images)} previews (shorter side {PREVIEW_SIDE}); {os.cpu_count()} CPUs; onnxruntime "
        f"{ort.__version__} {ort.get_device()}; median of {args.runs} runs; load average at the end "
        f"{os.getloadavg()[0]:.1f} (near or above the CPU count: other processes shared the cores)\n"
    )
    print(
        "| engine | mean ms / image | median ms / image | images/s, 1 client | "
        f"images/s, {args.clients} clients | substrings found |"
    )
    print("|---|---|---|---|---|---|")
    for name in engines:
        values = list(medians[name].values())
        mean = statistics.fmean(values)
        print(
            f"| {name} | {mean:.0f} | {statistics.median(values):.0f} | {1000 / mean:.2f} | "
            f"{concurrent[name]:.2f} | {found[name]}/{total} |"
        )
    print("\nper image, median ms:\n")
    print("| image | " + " | ".join(engines) + " |")
    print("|---|" + "---|" * len(engines))
    for file, (image, _) in images.items():
        h, w = image.shape[:2]
        print(f"| {file} ({w}x{h}) | " + " | ".join(f"{medians[n][file]:.0f}" for n in engines) + " |")


if __name__ == "__main__":
    main()
