"""``python -m gateway`` under cProfile with a CPU-time clock, for bench/profile_gateway.py --cprofile.

py-spy samples wall time: on shared cores a thread that a write's wake-up preempted looks as busy as one
computing. cProfile with ``time.thread_time`` counts only the CPU the event loop's thread used. The stats
go to ``$GATEWAY_CPROFILE_OUT`` when the process is stopped (SIGTERM, as the bench does).

    python bench/cprofile_gateway.py --host 127.0.0.1 --port 3003   # same arguments as python -m gateway
"""

from __future__ import annotations

import cProfile
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.__main__ import main

profile = cProfile.Profile(time.thread_time)


def _dump(signum: int, frame: FrameType | None) -> None:
    # uvicorn takes SIGTERM for its graceful shutdown and re-raises it once done, with this handler back.
    profile.disable()
    profile.dump_stats(os.environ["GATEWAY_CPROFILE_OUT"])
    os._exit(0)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _dump)
    profile.enable()
    main(sys.argv[1:])
    _dump(signal.SIGTERM, None)
