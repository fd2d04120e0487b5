"""ONNX Runtime sessions: execution-provider choice, threads, device selection.

Every ONNX model in the service is opened through :func:`create_session`, so provider order and
threading are decided in one place. CUDA is used automatically when the installed ONNX Runtime
build offers it; ``AI_SERVICE_PROVIDERS`` overrides the order.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)

# Preference order when nothing is configured; only providers the installed build offers are kept.
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


@dataclass(frozen=True)
class SessionOptions:
    providers: tuple[str, ...] | None = None  # None: automatic
    device_id: int = 0
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    extra: dict[str, str] = field(default_factory=dict)


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def choose_providers(requested: tuple[str, ...] | None) -> list[str]:
    available = available_providers()
    if requested:
        chosen = [p for p in requested if p in available]
        missing = [p for p in requested if p not in available]
        if missing:
            log.warning("execution providers %s are not available in this build (have %s)", missing, available)
        if not chosen:
            raise RuntimeError(f"none of the requested execution providers {list(requested)} is available")
        return chosen
    return [p for p in PREFERRED_PROVIDERS if p in available] or available


def _provider_options(provider: str, options: SessionOptions) -> dict[str, object]:
    if provider == "CUDAExecutionProvider":
        return {"device_id": options.device_id, "arena_extend_strategy": "kSameAsRequested"}
    return {}


def default_intra_threads() -> int:
    # Immich's CPU image uses 2 intra-op threads; on small machines more threads oversubscribe
    # once several requests run at once.
    return max(1, min(4, os.cpu_count() or 1))


def create_session(path: Path | str, options: SessionOptions) -> ort.InferenceSession:
    """Open ``path`` with the chosen providers. Raises ``FileNotFoundError`` if it does not exist."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = options.intra_op_threads or default_intra_threads()
    so.inter_op_num_threads = options.inter_op_threads
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    for key, value in options.extra.items():
        so.add_session_config_entry(key, value)
    providers = choose_providers(options.providers)
    session = ort.InferenceSession(
        str(path),
        sess_options=so,
        providers=[(p, _provider_options(p, options)) for p in providers],
    )
    log.info("loaded %s with %s", path, session.get_providers())
    return session
