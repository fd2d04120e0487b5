"""Peak and retained memory of the real AI service per request, for extreme aspect ratios.

Starts ``python -m ai_service`` as a subprocess (one worker, default limits: 100 MP per image,
64 MiB per body) and sends Immich's requests for images of several shapes, each carrying rendered
Chinese text, OCR with ``maxResolution=100000`` (what an admin may type; the service clamps it), plus
faces (dlib) and CLIP visual (a small random-weight ViT-B/16: the decoder and preprocessing are the
same as for a real one). Per request it reads the server's kernel counters:

* peak: ``VmHWM`` after the request, the high-water mark having been reset (``/proc/PID/clear_refs``
  5) just before it, so it is this request's peak RSS;
* after: ``VmRSS`` once the response is in (and the process had 1 s to settle).

The service is started once per ``--release`` mode (AI_SERVICE_OCR_MEMORY_RELEASE), so the retained
figures show what ONNX Runtime's arena keeps after the largest accepted request.

    .venv/bin/python bench/bench_memory.py [--release shrink keep] [--tasks ocr faces clip]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import immich_requests as im  # noqa: E402
from tests.builders.clip_models import build_vit_b16_model  # noqa: E402
from tests.servers import module_process  # noqa: E402

FONT = Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc")
SHAPES = [(1440, 1080), (28800, 1440), (1440, 28800), (100_000, 1000), (1000, 100_000), (10_000, 9_999)]
PHRASES = [
    "增值税专用发票 No.12345",
    "北京欢迎你 Hello World 2026",
    "上海市浦东新区 世纪大道100号",
    "营业时间 09:00-21:00",
]
CLIP_MODEL = "bench-vit-b16"


def text_png(width: int, height: int) -> bytes:
    """A white PNG of ``width`` x ``height`` with a line of text every 1500 px along its long side."""
    img = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(img)
    font = ImageFont.truetype(str(FONT), 40) if FONT.is_file() else ImageFont.load_default()
    step = 1500
    for i, pos in enumerate(range(50, max(width, height) - 600, step)):
        xy = (pos, 50 + (i % 3) * 200) if width >= height else (50, pos)
        draw.text(xy, PHRASES[i % len(PHRASES)], font=font, fill=0)
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)  # greyscale: the decoder turns it into RGB, as for any photo
    return buf.getvalue()


def entries(task: str) -> dict[str, object]:
    if task == "ocr":
        ocr = json.loads(json.dumps(im.OCR))
        ocr["ocr"]["detection"]["options"]["maxResolution"] = 100_000
        return ocr
    if task == "faces":
        return im.faces("dlib")
    return im.clip_visual(CLIP_MODEL)


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def measure(client: httpx.Client, base: str, pid: int, task: str, data: bytes) -> tuple[int, float, int, int]:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    started = time.perf_counter()
    response = client.post(
        base + "/predict",
        data={"entries": json.dumps(entries(task))},
        files={"image": ("image.png", data, "image/png")},
    )
    seconds = time.perf_counter() - started
    time.sleep(1.0)
    return response.status_code, seconds, status_kib(pid, "VmHWM") // 1024, status_kib(pid, "VmRSS") // 1024


def run(release: str, tasks: list[str], images: dict[tuple[int, int], bytes], model_dir: Path) -> list[str]:
    env = {
        "AI_SERVICE_MODEL_DIR": str(model_dir),
        "AI_SERVICE_OCR_MEMORY_RELEASE": release,
        "AI_SERVICE_MODEL_TTL": "0",  # nothing unloaded behind the measurement's back
        "AI_SERVICE_REQUEST_TIMEOUT_S": "600",
        "AI_SERVICE_LOG_LEVEL": "warning",
    }
    rows: list[str] = []
    with module_process("ai_service", env, ready_timeout=120) as server, httpx.Client(timeout=900) as client:
        pid = server.proc.pid
        warm = images[SHAPES[0]]
        for task in tasks:  # load every model first: the baseline includes them
            measure(client, server.base, pid, task, warm)
        baseline = status_kib(pid, "VmRSS") // 1024
        rows.append(f"| {release} | (models loaded, after a 1440x1080 request each) | | | | | {baseline} |")
        for (w, h), data in images.items():
            for task in tasks:
                status, seconds, peak, after = measure(client, server.base, pid, task, data)
                rows.append(
                    f"| {release} | {task} {w}x{h} ({len(data) // 1024} KiB PNG) | {status} | {seconds:.1f} | "
                    f"{peak} | {peak - baseline:+d} | {after} ({after - baseline:+d}) |"
                )
                print(rows[-1], flush=True)
        if server.proc.poll() is not None:
            rows.append(f"| {release} | the service died (exit {server.proc.returncode}) | | | | | |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", nargs="+", default=["shrink", "keep"], choices=["shrink", "no-arena", "keep"])
    parser.add_argument("--tasks", nargs="+", default=["ocr", "faces", "clip"], choices=["ocr", "faces", "clip"])
    args = parser.parse_args()
    images = {shape: text_png(*shape) for shape in SHAPES}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        model_dir = Path(tmp)
        if "clip" in args.tasks:
            build_vit_b16_model(model_dir, CLIP_MODEL)
        rows = []
        for release in args.release:
            rows += run(release, args.tasks, images, model_dir)
    print(f"\n{os.cpu_count()} CPUs; OCR with maxResolution=100000; MiB\n")
    print("| OCR memory release | request | status | seconds | peak RSS | peak - baseline | RSS after (- baseline) |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
