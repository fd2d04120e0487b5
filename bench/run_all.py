"""Run every benchmark in turn and keep their printed figures in bench/results/latest/<name>.txt.

Each benchmark is its own script (see its docstring for options); this runner only sequences them so
they never compete for the CPU with each other.

    .venv/bin/python bench/run_all.py [NAME ...]     # e.g. bench_gateway bench_search
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ORDER = [
    "ocr_compare",
    "bench_ai_service",
    "bench_gateway",
    "bench_hung_backend",
    "bench_http_limits",
    "bench_search",
    "bench_batching",
    "bench_clip",
    "bench_faces",
    "bench_ocr",
    "bench_ocr_long",
    "bench_memory",
]


def main(argv: list[str]) -> int:
    names = argv or ORDER
    out_dir = BENCH / "results" / "latest"
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        script = BENCH / f"{name}.py"
        if not script.is_file():
            print(f"no benchmark {name}", file=sys.stderr)
            return 2
        print(f"== {name}", flush=True)
        started = time.monotonic()
        with open(out_dir / f"{name}.txt", "w", encoding="utf-8") as log:
            proc = subprocess.run([sys.executable, str(script)], stdout=log, stderr=subprocess.STDOUT, check=False)
        print(f"   exit {proc.returncode} after {time.monotonic() - started:.0f}s -> {out_dir / (name + '.txt')}")
        if proc.returncode:
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
