"""How long requests wait on a hung backend, with and without ``GATEWAY_BREAKER__CUT_IN_FLIGHT``.

Set-up (real processes and sockets on 127.0.0.1): ``python -m gateway`` with two Immich-protocol backends,
``hung`` first and ``backup`` second (both the test suite's FaultServer), default breaker and health settings
(3 failures open a breaker; health checks every 10 s, 2 s each, 2 failures open all breakers of a backend),
and a 60 s task timeout (``GATEWAY_TIMEOUTS__CLIP=60``, standing in for the 60 s OCR default: the fault server
answers CLIP). Once ``hung`` has passed its checks, it stops answering:

* ``whole``: neither /predict nor /ping answer (a frozen process or host): ``--burst`` requests arrive at once;
* ``predict``: /predict hangs, /ping still answers (a stuck model): 3 requests at once, then one every
  ``--every`` seconds for the task timeout; only request failures can open the breaker.

Every request ends with the backup's answer; the figure is how long each waited.

    .venv/bin/python bench/bench_hung_backend.py [--timeout 60] [--burst 8] [--every 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.gateway_support import FaultServer, fault_vector, gateway_process, immich_predict  # noqa: E402

CLIP_TEXT = {"clip": {"textual": {"modelName": "ViT-B-32__openai", "options": {"language": "zh-CN"}}}}


def _run(scenario: str, cut: bool, args: argparse.Namespace, logs: Path) -> list[float]:
    hung, backup = FaultServer(tag="hung", delay_s=3600), FaultServer(tag="backup")
    with hung.running(), backup.running():
        env = {
            "GATEWAY_BACKENDS": json.dumps(
                {"hung": {"kind": "immich", "url": hung.url}, "backup": {"kind": "immich", "url": backup.url}}
            ),
            "GATEWAY_TIMEOUTS__CLIP": str(args.timeout),
            "GATEWAY_BREAKER__CUT_IN_FLIGHT": "true" if cut else "false",
        }
        with gateway_process(env, logs / f"{scenario}-{cut}.log") as gw, httpx.Client(timeout=300) as client:
            while gw.status()["backends"]["hung"]["up"] is not True:
                time.sleep(0.1)
            hung.mode = "hang"
            if scenario == "whole":
                hung.ping_mode = "slow"
                arrivals = [0.0] * args.burst
            else:
                arrivals = [0.0] * 3 + [args.every * i for i in range(1, int(args.timeout / args.every))]
            waits: list[float] = []
            errors: list[str] = []
            started = time.monotonic()

            def ask(at: float) -> None:
                time.sleep(max(0.0, started + at - time.monotonic()))
                begin = time.monotonic()
                response = immich_predict(client, gw.base, CLIP_TEXT, text="海滩上的狗", timeout=300)
                waits.append(time.monotonic() - begin)
                if response.status_code != 200 or response.json() != {"clip": fault_vector("backup")}:
                    errors.append(f"{response.status_code} {response.text[:100]}")

            threads = [threading.Thread(target=ask, args=(at,)) for at in arrivals]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if errors:
                raise SystemExit(f"{scenario} cut={cut}: unexpected replies: {errors}")
            return waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=60.0, help="task timeout, seconds (GATEWAY_TIMEOUTS__CLIP)")
    parser.add_argument("--burst", type=int, default=8, help="requests arriving at once ('whole' scenario)")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between later requests ('predict')")
    args = parser.parse_args()
    print(f"task timeout {args.timeout:g} s; health checks every 10 s (2 s timeout, 2 failures); breaker: 3 failures")
    with tempfile.TemporaryDirectory(prefix="bench-hung-") as logs:
        for scenario in ("whole", "predict"):
            for cut in (False, True):
                waits = sorted(_run(scenario, cut, args, Path(logs)))
                print(
                    f"{scenario:<8} cut_in_flight={str(cut).lower():<5} n={len(waits):>2}  "
                    f"wait p50 {statistics.median(waits):6.1f} s  mean {statistics.mean(waits):6.1f} s  "
                    f"max {waits[-1]:6.1f} s  (all answered by the backup)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
