"""Download on first use, measured as a user meets it: ``python -m ai_service`` on an empty model folder,
a Hugging Face-compatible hub on loopback (the tests' fake hub), requests built as Immich builds them.

Figures:

* **first answer, download included**: empty model folder -> the first CLIP text answer (download of a
  ViT-B/16-shaped model in Immich's layout, install, load, inference);
* **first answer, download excluded**: the same model already installed, fresh process -> first answer
  (load + inference);
* **added latency when installed**: steady-state CLIP text latency with ``AI_SERVICE_AUTO_PULL`` on vs
  off, interleaved on two processes (it must be nil: an installed model takes the same path as before).

The model has random weights in the real shape (ViT-B/16 image tower, 12-layer BERT-base text tower);
its vectors mean nothing, only sizes and times count.

    .venv/bin/python bench/bench_first_use.py [--requests 300]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.builders.clip_models import build_vit_b16_model  # noqa: E402
from tests.fake_hub import OWNER, FakeHub, files_of  # noqa: E402
from tests.gateway_support import immich_predict  # noqa: E402
from tests.servers import module_process  # noqa: E402

NAME = "ViT-B-16__openai"  # a name Immich's hub serves; the files are a ViT-B/16-shaped test model
ENTRIES = {"clip": {"textual": {"modelName": NAME, "options": {"language": "zh-CN"}}}}
QUERY = "海滩上的一只狗"


def _env(work: Path, models: Path, endpoint: str, auto_pull: bool = True) -> dict[str, str]:
    return {
        "AI_SERVICE_MODEL_DIR": str(models),
        "AI_SERVICE_HF_ENDPOINT": endpoint,
        "AI_SERVICE_MODEL_REPO_OWNER": OWNER,
        "AI_SERVICE_AUTO_PULL": "true" if auto_pull else "false",
        "AI_SERVICE_MODEL_TTL": "0",
        "HF_HOME": str(work / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def _first_answer(env: dict[str, str], log: Path) -> float:
    with module_process("ai_service", env, log=log) as server, httpx.Client() as client:
        started = time.perf_counter()
        reply = immich_predict(client, server.base, ENTRIES, text=QUERY, timeout=600)
        took = time.perf_counter() - started
        reply.raise_for_status()
    return took


def _latencies(base: str, client: httpx.Client, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        immich_predict(client, base, ENTRIES, text=QUERY).raise_for_status()
        out.append((time.perf_counter() - started) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300, help="steady-state requests per setting")
    args = parser.parse_args()
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {os.cpu_count()} cores, python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory(prefix="bench-first-use-") as tmp:
        work = Path(tmp)
        folder = build_vit_b16_model(work / "src", NAME, with_text=True)
        files = files_of(folder)
        size = sum(len(b) for b in files.values())
        hub = FakeHub()
        hub.add(f"{OWNER}/{NAME}", files)
        try:
            print(f"model: {NAME} (ViT-B/16-shaped, random weights), {len(files)} files, {size / 1e6:.0f} MB")
            empty = work / "empty"
            included = _first_answer(_env(work, empty, hub.url), work / "included.log")
            assert (empty / "clip" / NAME).is_dir()
            installed = work / "installed"
            shutil.copytree(empty, installed, ignore=shutil.ignore_patterns(".incoming"))
            excluded = _first_answer(_env(work, installed, hub.url), work / "excluded.log")
            print(f"first CLIP answer, download included: {included:.2f} s")
            print(f"first CLIP answer, download excluded: {excluded:.2f} s (load + inference)")
            print(f"download + install share:             {included - excluded:.2f} s")

            requests_before = len(hub.requests)
            on_env = _env(work, installed, hub.url, auto_pull=True)
            off_env = _env(work, installed, hub.url, auto_pull=False)
            with (
                module_process("ai_service", on_env, log=work / "on.log") as on,
                module_process("ai_service", off_env, log=work / "off.log") as off,
                httpx.Client() as client,
            ):
                _latencies(on.base, client, 20), _latencies(off.base, client, 20)  # warm up both
                lat_on: list[float] = []
                lat_off: list[float] = []
                for _ in range(args.requests // 50):  # interleaved blocks: both see the same machine state
                    lat_on += _latencies(on.base, client, 50)
                    lat_off += _latencies(off.base, client, 50)
            assert len(hub.requests) == requests_before, "an installed model must never touch the hub"
            p50_on, p50_off = statistics.median(lat_on), statistics.median(lat_off)
            print(f"installed model, CLIP text p50: auto-pull on {p50_on:.2f} ms, off {p50_off:.2f} ms "
                  f"(added {p50_on - p50_off:+.2f} ms over {len(lat_on)} requests each; hub requests: 0)")
        finally:
            hub.close()


if __name__ == "__main__":
    main()
