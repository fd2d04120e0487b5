"""OCR recall, time and detector memory on panoramas and long screenshots: tiling vs downscaling.

Immich's rule scales only the *shorter* side of an image to ``maxResolution`` (736), so a 20:1
panorama preview (28800 x 1440) means a 736 x 14720 detector input (2.2 GB) and a 100000 x 1000
strip 736 x 73600 (over 8 GB). Two ways to bound that, compared here on the same images:

* ``unbounded``: Immich's rule as is (the reference; not run where it would need over ~3 GB);
* ``downscale L``: scale the whole image so the detector input's long side is at most L;
* ``tiles`` (what the service does, AI_SERVICE_OCR_DET_MAX_SIDE / _MAX_PIXELS): keep Immich's scale,
  run the detector on overlapping tiles of at most 2048 px and stitch the probability maps, scaling
  down only beyond AI_SERVICE_OCR_DET_MAX_PIXELS.

Images, built here from the shared OCR set (``expected.tsv``) and text rendered with a CJK font
(fonts-wqy-zenhei), where Chinese users have text:

* a 20:1 panorama preview, 28800 x 1440: shared images scaled to 1440 px high, side by side with
  panels of shop signs (24-40 px text);
* a 1:20 long phone screenshot, 1080 x 21600: chat-sized lines (36-44 px) with shared images
  scaled to the screen width in between;
* a 100:1 strip, 100000 x 1000: signs of 40-80 px.

Recall: each part's expected substrings searched in the lines whose centres fall inside that part.
Memory: peak RSS growth during the detect+recognise call (sampled every 5 ms), in one process.

    .venv/bin/python bench/bench_ocr_long.py [--data tests/data/ocr] [--images panorama screenshot strip]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ocr_compare import DEFAULT_DATA, missed_substrings, read_expected

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ai_service.imaging import decode_image  # noqa: E402
from ai_service.models.ocr import (  # noqa: E402
    DEFAULT_DET_MAX_PIXELS,
    DetectorLimits,
    OcrPipeline,
    bounded_input_size,
    bundled_files,
    detector_input_size,
    load_pipeline,
    read_characters,
)
from ai_service.runtime.onnx import SessionOptions, shrink_arena_run_options  # noqa: E402

FONT = Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc")
MAX_RESOLUTION = 736
UNBOUNDED_MAX_PIXELS = 15_000_000  # ~2.9 GB of detector memory; above it the reference is not run
PHRASES = [
    "中国农业银行 24小时自助服务",
    "星巴克咖啡 Starbucks Coffee",
    "北京路步行街 欢迎光临",
    "新鲜水果 特价 每斤5.8元",
    "停车场入口 限高2.2米",
    "地铁2号线 人民广场站 Exit 3",
    "老字号 重庆火锅 营业至凌晨2点",
    "中国移动 5G 营业厅",
    "禁止吸烟 违者罚款200元",
    "黄山风景区 游客中心",
    "长江大桥 全长1670米",
    "明天下午三点在会议室开会",
    "好的，收到，我马上过去",
    "快递已放在小区门口的快递柜",
    "周末一起去爬山吗？天气预报说晴天",
    "订单号 20260815123456 已发货",
    "发票抬头：上海某某科技有限公司",
    "请把照片发给我，谢谢！",
    "本次消费合计 ¥358.00 微信支付",
    "航班 CA1831 北京首都 T3 登机口 E12",
    "高铁 G102 二等座 07车12F",
    "会员积分 1,280 分 可兑换礼品",
    "晚上七点半 电影院门口见",
    "图书馆开放时间 08:00-22:00",
]


@dataclass
class Part:
    start: int  # along the long axis, pixels
    stop: int
    substrings: list[str]


@dataclass
class Composite:
    name: str
    image: np.ndarray
    axis: int  # 0: parts stacked vertically (tall image), 1: side by side (wide image)
    parts: list[Part]


def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT), size)


def _panel(width: int, height: int, lines: list[tuple[str, int]], gap: int) -> np.ndarray:
    """Text lines (phrase, font px) drawn left-aligned on a light panel."""
    img = Image.new("RGB", (width, height), (248, 246, 240))
    draw = ImageDraw.Draw(img)
    y = gap
    for text, size in lines:
        draw.text((gap, y), text, font=_font(size), fill=(25, 25, 25))
        y += int(size * 1.6)
    return np.asarray(img)


def _shared(data: Path) -> list[tuple[np.ndarray, list[str]]]:
    return [
        (decode_image((data / file).read_bytes(), max_pixels=10**8).rgb, subs) for file, subs in read_expected(data)
    ]


def _scaled(image: np.ndarray, *, height: int | None = None, width: int | None = None) -> np.ndarray:
    h, w = image.shape[:2]
    factor = height / h if height else (width or w) / w
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))


def _phrases(start: int, count: int) -> list[str]:
    return [PHRASES[(start + i) % len(PHRASES)] for i in range(count)]


def panorama(shared: list[tuple[np.ndarray, list[str]]], width: int = 28800, height: int = 1440) -> Composite:
    pieces: list[tuple[np.ndarray, list[str]]] = []
    used, k = 0, 0
    while used < width:
        if k % 2 == 0 and shared:
            image, subs = shared[(k // 2) % len(shared)]
            piece = _scaled(image, height=height)
        else:
            # Signs as a 1440-px preview shows them: 24-40 px text.
            phrases = _phrases(k * 3, 8)
            sizes = [24, 32, 40, 28, 36, 24, 30, 26]
            piece, subs = _panel(1200, height, list(zip(phrases, sizes, strict=True)), 60), phrases
        piece = piece[:, : width - used]
        pieces.append((piece, subs))
        used += piece.shape[1]
        k += 1
    return _compose("panorama 20:1", pieces, axis=1)


def long_screenshot(shared: list[tuple[np.ndarray, list[str]]], width: int = 1080, height: int = 21600) -> Composite:
    pieces: list[tuple[np.ndarray, list[str]]] = []
    used, k = 0, 0
    while used < height:
        if k % 3 == 2 and shared:
            image, subs = shared[(k // 3) % len(shared)]
            piece = _scaled(image, width=width)
        else:
            phrases = _phrases(k * 5, 8)
            sizes = [36, 40, 44, 40, 36, 42, 40, 38]
            piece, subs = _panel(width, 8 * 70 + 60, list(zip(phrases, sizes, strict=True)), 40), phrases
        piece = piece[: height - used]
        pieces.append((piece, subs))
        used += piece.shape[0]
        k += 1
    return _compose("long screenshot 1:20", pieces, axis=0)


def strip(width: int = 100_000, height: int = 1000) -> Composite:
    pieces = []
    for k in range(width // 2500):
        phrases = _phrases(k * 4, 4)
        sizes = [80, 60, 40, 56]
        pieces.append((_panel(2500, height, list(zip(phrases, sizes, strict=True)), 50), phrases))
    return _compose("strip 100:1", pieces, axis=1)


def _compose(name: str, pieces: list[tuple[np.ndarray, list[str]]], axis: int) -> Composite:
    parts, offset = [], 0
    for piece, subs in pieces:
        length = piece.shape[axis]
        # A piece cut off at the end keeps only substrings it can still hold: drop it from scoring.
        if length >= 400:
            parts.append(Part(offset, offset + length, subs))
        offset += length
    return Composite(name, np.ascontiguousarray(np.concatenate([p for p, _ in pieces], axis=axis)), axis, parts)


# ---- strategies ------------------------------------------------------------------------------------

Reader = Callable[[np.ndarray], tuple[list[str], np.ndarray]]


def reader(model: OcrPipeline, downscale_to: int | None = None) -> Reader:
    def read(image: np.ndarray) -> tuple[list[str], np.ndarray]:
        factor = 1.0
        small = image
        if downscale_to is not None:
            rh, rw = detector_input_size(*image.shape[:2], MAX_RESOLUTION)
            if max(rh, rw) > downscale_to:
                factor = downscale_to / max(rh, rw)
                h, w = image.shape[:2]
                small = np.asarray(Image.fromarray(image).resize((round(w * factor), round(h * factor))))
        det = model.detect(small, 0.5, MAX_RESOLUTION)
        if factor != 1.0:
            det = type(det)(det.quads / factor, det.scores)  # recognise from the full image, as the service would
        lines = model.recognize(image, det, 0.8)
        return lines.texts, lines.quads

    return read


@contextmanager
def peak_rss() -> Iterator[list[float]]:
    """Peak RSS growth (MiB) while the block runs, sampled every 5 ms."""
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page / 2**20

    base, peak, done = rss(), [0.0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss() - base)
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()


def recall(composite: Composite, texts: list[str], quads: np.ndarray) -> tuple[int, int]:
    centres = quads.reshape(-1, 4, 2).mean(axis=1)[:, 1 - composite.axis] if len(texts) else np.zeros(0)
    found = total = 0
    for part in composite.parts:
        inside = [t for t, c in zip(texts, centres, strict=True) if part.start <= c < part.stop]
        total += len(part.substrings)
        found += len(part.substrings) - len(missed_substrings(inside, part.substrings))
    return found, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--downscale", type=int, nargs="*", default=[2048, 4096])
    parser.add_argument(
        "--images", nargs="+", default=["panorama", "screenshot", "strip"], choices=["panorama", "screenshot", "strip"]
    )
    args = parser.parse_args()
    if not FONT.is_file():
        sys.exit(f"needs the CJK font {FONT} (apt install fonts-wqy-zenhei)")
    shared = _shared(args.data) if (args.data / "expected.tsv").is_file() else []
    if not shared:
        print(f"(no shared OCR set at {args.data}: rendered text only)")

    files = bundled_files()
    assert files is not None, "rapidocr's bundled model files are missing"
    options = SessionOptions(extra={"session.intra_op.allow_spinning": "0"})
    tiled = load_pipeline(files, options, run_options=shrink_arena_run_options())
    huge = 1 << 20
    unbounded = OcrPipeline(
        tiled._det,
        tiled._rec,
        read_characters(tiled._rec, files.dictionary),
        limits=DetectorLimits(max_resolution_ceiling=huge, max_side=huge, max_pixels=huge * huge),
        run_options=shrink_arena_run_options(),
    )
    strategies: dict[str, Reader] = {"unbounded (Immich's rule)": reader(unbounded)}
    strategies |= {f"downscale, long side {n}": reader(tiled, n) for n in args.downscale}
    strategies["tiles 2048, 16 MP (service)"] = reader(tiled)

    print(f"{os.cpu_count()} CPUs; onnxruntime {ort.__version__}; maxResolution {MAX_RESOLUTION}\n")
    print("| image | strategy | detector input | substrings found | seconds | peak RSS growth MiB |")
    print("|---|---|---|---|---|---|")
    builders = {"panorama": lambda: panorama(shared), "screenshot": lambda: long_screenshot(shared), "strip": strip}
    for composite in (builders[name]() for name in args.images):
        h, w = composite.image.shape[:2]
        rh, rw = detector_input_size(h, w, MAX_RESOLUTION)
        for name, read in strategies.items():
            if name.startswith("unbounded") and rh * rw > UNBOUNDED_MAX_PIXELS:
                print(f"| {composite.name} {w}x{h} | {name} | {rw}x{rh} | not run (> 3 GB) | | |")
                continue
            with peak_rss() as peak:
                started = time.perf_counter()
                texts, quads = read(composite.image)
                seconds = time.perf_counter() - started
            found, total = recall(composite, texts, quads)
            print(
                f"| {composite.name} {w}x{h} | {name} | {_input(name, h, w)} | {found}/{total} "
                f"({100 * found / total:.0f} %) | {seconds:.1f} | {peak[0]:.0f} |",
                flush=True,
            )
    print(f"\nload average at the end {os.getloadavg()[0]:.1f} (near or above the CPU count: cores were shared)")


def _input(name: str, h: int, w: int) -> str:
    rh, rw = detector_input_size(h, w, MAX_RESOLUTION)
    if name.startswith("downscale"):
        factor = min(1.0, int(name.rsplit(" ", 1)[1]) / max(rh, rw))
        return f"{round(rw * factor)}x{round(rh * factor)}"
    if name.startswith("tiles"):
        bh, bw = bounded_input_size(h, w, MAX_RESOLUTION, DEFAULT_DET_MAX_PIXELS)
        return f"{bw}x{bh} in tiles"
    return f"{rw}x{rh}"


if __name__ == "__main__":
    main()
