"""Gateway overhead on loopback: ``/predict`` through the gateway (immich backend -> AI service) vs. the
AI service called directly, plus the gateway's memory over a long run.

Set-up (all real processes on 127.0.0.1): ``python -m ai_service`` with the tiny 512-d cn-clip test
model and the bundled OCR model, and ``python -m gateway`` whose only backend is that service
(kind ``immich``), mapping Immich's ``ViT-B-32__openai`` onto the test model. Requests are built
exactly as Immich's server builds them (Node FormData multipart).

Workloads, each against both targets, with 1 and 32 concurrent clients:

* CLIP text: a short Chinese query on the tiny CLIP model, so model time is small and the extra hop
  shows;
* OCR: a 1440-px JPEG preview (Immich's preview size) of a product page with ~16 text lines.

Then the gateway's RSS before and after ``--memory-requests`` (default 20 000) CLIP text requests.

    .venv/bin/python bench/bench_gateway.py [--clip-requests 400] [--ocr-requests 12] [--memory-requests 20000]
        [--skip-ocr]

The load generator runs in this process on the same machine, sharing its cores with both servers;
compare the two targets with each other, not with other machines. At 32 clients the OCR latencies are
mostly queueing behind two CPU cores (their p50 depends on queue order): compare the throughput there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.assets import preview_jpeg  # noqa: E402
from tests.builders.clip_models import build_test_models  # noqa: E402
from tests.conftest import shared_data_dir  # noqa: E402
from tests.gateway_support import node_formdata  # noqa: E402
from tests.servers import module_process  # noqa: E402

CLIP_MODEL = "test-cn-clip-512"
CLIP_ENTRIES = {"clip": {"textual": {"modelName": "ViT-B-32__openai", "options": {"language": "zh-CN"}}}}
DIRECT_CLIP_ENTRIES = {"clip": {"textual": {"modelName": CLIP_MODEL, "options": {"language": "zh-CN"}}}}
OCR_ENTRIES = {
    "ocr": {
        "detection": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.5, "maxResolution": 736}},
        "recognition": {"modelName": "PP-OCRv5_mobile", "options": {"minScore": 0.8}},
    }
}
QUERY = "海滩上的一只狗"
OCR_IMAGE = shared_data_dir() / "ocr" / "paddleocr_11.jpg"
REQUEST_TIMEOUT_S = 300.0


@dataclass
class Result:
    latencies: list[float]
    wall_s: float
    errors: int

    def line(self, label: str) -> str:
        ordered = sorted(self.latencies)
        p50 = statistics.median(ordered) * 1000
        p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))] * 1000
        rate = len(ordered) / self.wall_s
        return f"{label:<34} n={len(ordered):>5}  p50 {p50:8.2f} ms  p99 {p99:8.2f} ms  {rate:8.1f} req/s" + (
            f"  errors={self.errors}" if self.errors else ""
        )


@contextmanager
def server(module: str, env: dict[str, str], log: Path) -> Iterator[tuple[str, int]]:
    with module_process(module, env, log=log, ready_timeout=120) as proc:
        yield proc.base, proc.proc.pid


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def load(base: str, content_type: str, body: bytes, requests: int, concurrency: int) -> Result:
    latencies: list[float] = []
    errors = 0
    remaining = requests
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S) as client:

        async def worker() -> None:
            nonlocal remaining, errors
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                response = await client.post(base + "/predict", content=body, headers={"content-type": content_type})
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return Result(latencies, wall, errors)


def run(base: str, content_type: str, body: bytes, requests: int, concurrency: int) -> Result:
    asyncio.run(load(base, content_type, body, min(concurrency, 4), concurrency))  # warm connections and models
    return asyncio.run(load(base, content_type, body, requests, concurrency))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip-requests", type=int, default=400, help="CLIP text requests per measurement")
    parser.add_argument("--ocr-requests", type=int, default=12, help="OCR requests at concurrency 1 (x4 at 32)")
    parser.add_argument("--memory-requests", type=int, default=20_000, help="CLIP requests for the RSS check")
    parser.add_argument("--skip-ocr", action="store_true", help="only the CLIP text workload (the gateway's overhead)")
    args = parser.parse_args()

    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        folder = Path(tmp)
        models = build_test_models(folder / "models")
        service_env = {"AI_SERVICE_MODEL_DIR": str(models), "AI_SERVICE_MODEL_TTL": "0"}
        gateway_env_base = {
            "GATEWAY_MODEL_MAP__CLIP": json.dumps({"ViT-B-32__openai": CLIP_MODEL}),
            "GATEWAY_CLIP_DIMENSIONS": json.dumps({CLIP_MODEL: 512}),
            "GATEWAY_LOG_LEVEL": "info",  # the default: one access line per request is part of the cost
        }
        ocr_image = preview_jpeg(OCR_IMAGE.read_bytes())
        with server("ai_service", service_env, folder / "ai_service.log") as (service, service_pid):
            gateway_env = {
                **gateway_env_base,
                "GATEWAY_BACKENDS": json.dumps({"svc": {"kind": "immich", "url": service}}),
            }
            with server("gateway", gateway_env, folder / "gateway.log") as (gateway, gateway_pid):
                workloads = [
                    ("CLIP text", CLIP_ENTRIES, DIRECT_CLIP_ENTRIES, {"text": QUERY}, args.clip_requests),
                    ("OCR 1440px JPEG", OCR_ENTRIES, OCR_ENTRIES, {"image": ocr_image}, args.ocr_requests),
                ][: 1 if args.skip_ocr else 2]
                print(f"OCR input: {len(ocr_image) / 1024:.0f} KiB JPEG, shorter side 1440 px")
                for name, entries, direct_entries, payload, requests in workloads:
                    for concurrency in (1, 32):
                        n = requests if concurrency == 1 or name.startswith("CLIP") else requests * 4
                        n = max(n, concurrency)
                        direct_type, direct_body = node_formdata(direct_entries, **payload)  # type: ignore[arg-type]
                        gw_type, gw_body = node_formdata(entries, **payload)  # type: ignore[arg-type]
                        sent = n + min(concurrency, 4)  # run() warms up with a few requests first
                        service_before = cpu_s(service_pid)
                        direct = run(service, direct_type, direct_body, n, concurrency)
                        direct_service_ms = (cpu_s(service_pid) - service_before) * 1000 / sent
                        cpu_before = cpu_s(gateway_pid), cpu_s(service_pid)
                        through = run(gateway, gw_type, gw_body, n, concurrency)
                        gateway_cpu_ms = (cpu_s(gateway_pid) - cpu_before[0]) * 1000 / sent
                        service_cpu_ms = (cpu_s(service_pid) - cpu_before[1]) * 1000 / sent
                        print(direct.line(f"{name} c={concurrency} direct"))
                        print(through.line(f"{name} c={concurrency} via gateway"))
                        overhead = (statistics.median(through.latencies) - statistics.median(direct.latencies)) * 1000
                        # CPU time per request is what the gateway's code costs; unlike the latencies it hardly
                        # moves when other processes share the cores.
                        print(
                            f"{'':<34} gateway adds {overhead:+.2f} ms at p50, "
                            f"{len(through.latencies) / through.wall_s / (len(direct.latencies) / direct.wall_s):.0%} "
                            f"of direct throughput"
                        )
                        print(
                            f"{'':<34} CPU ms per request: service {direct_service_ms:.2f} direct, "
                            f"{service_cpu_ms:.2f} via gateway; gateway {gateway_cpu_ms:.2f}"
                        )

                # Both servers and this load generator share the machine's cores: a load average near or
                # above the CPU count means other processes took a share too.
                print(f"load average after the latency runs: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
                gw_type, gw_body = node_formdata(CLIP_ENTRIES, text=QUERY)
                run(gateway, gw_type, gw_body, 200, 8)
                before = rss_mib(gateway_pid)
                started = time.perf_counter()
                result = asyncio.run(load(gateway, gw_type, gw_body, args.memory_requests, 8))
                after = rss_mib(gateway_pid)
                print(
                    f"gateway RSS over {args.memory_requests} CLIP text requests (8 clients, "
                    f"{time.perf_counter() - started:.0f} s, {result.errors} errors): "
                    f"start {before:.1f} MiB, end {after:.1f} MiB ({after - before:+.1f} MiB)"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
