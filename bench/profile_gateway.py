"""CPU time per ``/predict`` request of the gateway and of the AI service behind it, and where the
gateway's goes: the noise-free side of ``bench/bench_gateway.py``.

Same set-up as that bench (``python -m ai_service`` with the tiny cn-clip test model, ``python -m
gateway`` with one ``immich`` backend, Immich's ``ViT-B-32__openai`` mapped onto the test model, Node
FormData requests). For each target it reads user+system CPU of both processes from
``/proc/<pid>/stat`` around a run of CLIP text requests and divides by the requests: unlike latency
and throughput, these hardly move when other processes share the cores. On a machine with few cores,
throughput through the gateway is bounded by (gateway CPU + service CPU) per request, so the gateway's
CPU per request, next to the service's, is what decides the "≥ 95 % of direct throughput" target.

    .venv/bin/python bench/profile_gateway.py [--requests 2000] [--concurrency 8] [--mapped/--unmapped]
        [--py-spy OUT.txt]     # also sample the gateway with py-spy (pip install py-spy) during the run
        [--cprofile OUT.prof]  # run the gateway under cProfile with a CPU clock (bench/cprofile_gateway.py)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_gateway import (  # noqa: E402
    CLIP_ENTRIES,
    CLIP_MODEL,
    DIRECT_CLIP_ENTRIES,
    QUERY,
    load,
    server,
)

from tests.builders.clip_models import build_test_models  # noqa: E402
from tests.gateway_support import node_formdata  # noqa: E402


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def measure(
    base: str, body: tuple[str, bytes], pids: dict[str, int], requests: int, concurrency: int
) -> dict[str, float]:
    """CPU ms per request (user + system, and system alone as NAME_sys) of each process in ``pids``."""
    content_type, data = body
    asyncio.run(load(base, content_type, data, 4 * concurrency, concurrency))
    before = {name: cpu_times(pid) for name, pid in pids.items()}
    result = asyncio.run(load(base, content_type, data, requests, concurrency))
    if result.errors:
        raise SystemExit(f"{result.errors} requests to {base} failed")
    out: dict[str, float] = {}
    for name, pid in pids.items():
        user, system = (after - start for after, start in zip(cpu_times(pid), before[name], strict=True))
        out[name] = (user + system) * 1000 / requests
        out[f"{name}_sys"] = system * 1000 / requests
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--unmapped",
        action="store_true",
        help="send the test model's own name through the gateway (no model-name mapping applies)",
    )
    parser.add_argument("--py-spy", type=Path, help="write py-spy's samples of the gateway here (wall time)")
    parser.add_argument(
        "--cprofile", type=Path, help="run the gateway under cProfile (CPU time) and print its top functions"
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="profile-gateway-") as tmp:
        folder = Path(tmp)
        models = build_test_models(folder / "models")
        service_env = {"AI_SERVICE_MODEL_DIR": str(models), "AI_SERVICE_MODEL_TTL": "0"}
        with server("ai_service", service_env, folder / "ai_service.log") as (service, service_pid):
            gateway_env = {
                "GATEWAY_MODEL_MAP__CLIP": json.dumps({"ViT-B-32__openai": CLIP_MODEL}),
                "GATEWAY_CLIP_DIMENSIONS": json.dumps({CLIP_MODEL: 512}),
                "GATEWAY_LOG_LEVEL": "info",
                "GATEWAY_BACKENDS": json.dumps({"svc": {"kind": "immich", "url": service}}),
            }
            module = "gateway"
            if args.cprofile:
                module = "bench.cprofile_gateway"
                gateway_env["GATEWAY_CPROFILE_OUT"] = str(args.cprofile.resolve())
            with server(module, gateway_env, folder / "gateway.log") as (gateway, gateway_pid):
                pids = {"gateway": gateway_pid, "service": service_pid}
                direct = measure(service, node_formdata(DIRECT_CLIP_ENTRIES, text=QUERY), pids, args.requests, 8)
                via_entries = DIRECT_CLIP_ENTRIES if args.unmapped else CLIP_ENTRIES
                spy = _start_py_spy(gateway_pid, args.py_spy, folder) if args.py_spy else None
                via = measure(gateway, node_formdata(via_entries, text=QUERY), pids, args.requests, args.concurrency)
                if spy is not None:
                    _finish_py_spy(spy, args.py_spy)
    if args.cprofile:
        stats = pstats.Stats(str(args.cprofile))
        stats.sort_stats("tottime").print_stats(25)
    mapping = "no mapping" if args.unmapped else "ViT-B-32__openai mapped"
    print(f"CPU ms per CLIP text request, {args.requests} requests, {args.concurrency} clients ({mapping}):")
    print(f"  direct to the AI service:   service {direct['service']:.3f} (system {direct['service_sys']:.3f})")
    print(
        f"  through the gateway:        service {via['service']:.3f} (system {via['service_sys']:.3f})  "
        f"gateway {via['gateway']:.3f} (system {via['gateway_sys']:.3f})"
    )
    share = via["gateway"] / (via["gateway"] + via["service"])
    print(
        f"  gateway share of the CPU per request: {share:.0%}; throughput bound on shared cores: "
        f"{direct['service'] / (via['gateway'] + via['service']):.0%} of direct"
    )
    return 0


def _start_py_spy(pid: int, out: Path, folder: Path) -> subprocess.Popen[bytes]:
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    raw = folder / "py-spy.txt"
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--format", "raw", "--rate", "500", "--nonblocking", "-o", str(raw)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _finish_py_spy(spy: subprocess.Popen[bytes], out: Path) -> None:
    spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
    spy.wait(timeout=60)
    raw = Path(spy.args[-1])  # type: ignore[index]
    out.write_text(raw.read_text() if raw.exists() else "")
    print(f"py-spy samples (collapsed stacks) written to {out}")


if __name__ == "__main__":
    sys.exit(main())
