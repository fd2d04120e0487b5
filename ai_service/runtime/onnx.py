"""ONNX Runtime sessions: execution-provider choice, threads, device selection, precision.

Every ONNX model in the service is opened through :func:`create_session`, so provider order,
threading, the GPU a process uses and fp16 are decided in one place. CUDA is used automatically
when the installed ONNX Runtime build offers it; ``AI_SERVICE_PROVIDERS`` overrides the order.

Precision ``fp16`` (``AI_SERVICE_PRECISION``): a ``model_fp16.onnx`` next to ``model.onnx`` is used
when present; otherwise the model is converted at load, keeping float32 inputs and outputs, so
callers feed and read float32 either way. The converter is ONNX Runtime's own
``onnxruntime.transformers.float16`` (shipped in every onnxruntime / onnxruntime-gpu wheel; it needs
the ``onnx`` package, which the ``gpu`` extra installs): the same algorithm as onnxconverter-common,
whose 1.16 release breaks graphs that ``Cast`` to float (every CLIP text tower with a padding mask),
see tests/test_batching.py. Without ``onnx``, or for a model that cannot be converted, the float32
model is used and a warning says why. fp16 pays off on GPUs (tensor cores, half the memory); ONNX
Runtime's CPU provider has few fp16 kernels and casts around the rest, so on a CPU it is slower.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import onnxruntime as ort

from ai_service.runtime.batching import BatchOptions

log = logging.getLogger(__name__)

# Preference order when nothing is configured; only providers the installed build offers are kept.
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")

Precision = Literal["fp32", "fp16"]
FP16_SUFFIX = "_fp16"  # model.onnx -> model_fp16.onnx


# ONNX Runtime's intra-op threads busy-wait after each parallel section by default. Between requests that is pure
# waste: with a gap of 2 ms between runs, a small text model used 2.66 ms of CPU per 0.27 ms run with spinning
# and 0.35 ms without, at the same latency; a ViT-B/16 image tower ran no slower without it (2 cores). The
# wasted CPU is taken from whatever else runs on the machine (the gateway, OCR, the database).
ALLOW_SPINNING_KEY = "session.intra_op.allow_spinning"


@dataclass(frozen=True)
class SessionOptions:
    providers: tuple[str, ...] | None = None  # None: automatic
    device_id: int = 0
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    precision: Precision = "fp32"
    batching: BatchOptions = field(default_factory=BatchOptions)  # off unless the service's settings turn it on
    extra: dict[str, str] = field(default_factory=dict)
    # False: tensors are malloc'd and freed per run instead of kept in ONNX Runtime's CPU arena, whose
    # footprint only ever grows to the largest run seen (see shrink_arena_run_options for the alternative).
    cpu_arena: bool = True


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


# Run option that hands the CPU arena's unused chunks back at the end of each run.
ARENA_SHRINKAGE_KEY = "memory.enable_memory_arena_shrinkage"


def shrink_arena_run_options() -> ort.RunOptions:
    """Run options that return a run's working memory to the system when the run ends.

    For models whose input size varies per request (OCR): the arena otherwise keeps the peak of the
    largest request for as long as the session lives. Only the CPU arena is named: a device arena
    (``gpu:N``) exists only where a CUDA provider is active, and naming a missing one fails every run.
    The object is only read during a run, so one instance serves concurrent runs.
    """
    options = ort.RunOptions()
    options.add_run_config_entry(ARENA_SHRINKAGE_KEY, "cpu:0")
    return options


def default_intra_threads() -> int:
    # Immich's CPU image uses 2 intra-op threads; on small machines more threads oversubscribe
    # once several requests run at once.
    return max(1, min(4, os.cpu_count() or 1))


def fp16_path(path: Path) -> Path:
    """Where a half-precision copy of ``path`` is looked for: ``model.onnx`` -> ``model_fp16.onnx``."""
    return path.with_name(f"{path.stem}{FP16_SUFFIX}{path.suffix}")


def convert_to_fp16(path: Path) -> bytes | None:
    """``path`` converted to float16 with float32 inputs/outputs, serialised; None if it cannot be done here."""
    try:
        import onnx
        from onnxruntime.transformers import float16
    except ImportError:
        log.warning(
            "AI_SERVICE_PRECISION=fp16: %s has no %s and the 'onnx' package, needed to convert it, is not "
            "installed (pip install onnx, or the 'gpu' extra); using float32",
            path,
            fp16_path(path).name,
        )
        return None
    try:
        model = onnx.load(str(path))  # external weights (*.onnx_data) are read from the same folder
        converted = float16.convert_float_to_float16(model, keep_io_types=True)
        return bytes(converted.SerializeToString())
    except Exception as exc:  # the converter raises plain Exceptions; protobuf a ValueError above 2 GB
        log.warning("AI_SERVICE_PRECISION=fp16: cannot convert %s (%s); using float32", path, exc)
        return None


def _has_fp16_io(session: ort.InferenceSession) -> bool:
    return any(arg.type == "tensor(float16)" for arg in (*session.get_inputs(), *session.get_outputs()))


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
    so.enable_cpu_mem_arena = options.cpu_arena
    for key, value in options.extra.items():
        so.add_session_config_entry(key, value)
    providers = choose_providers(options.providers)
    provider_list = [(p, _provider_options(p, options)) for p in providers]

    source: str | bytes = str(path)
    what = str(path)
    if options.precision == "fp16":
        half = fp16_path(path)
        if half.is_file():
            source, what = str(half), f"{half} (fp16)"
        else:
            converted = convert_to_fp16(path)
            if converted is not None:
                source, what = converted, f"{path} (converted to fp16 at load)"
    session = ort.InferenceSession(source, sess_options=so, providers=provider_list)
    if isinstance(source, str) and source != str(path) and _has_fp16_io(session):
        # The encoders feed and read float32; a copy converted without keep_io_types would fail on
        # every request, so it is refused here, at load, with the way to fix it.
        log.warning(
            "%s takes or returns float16 tensors; convert it with keep_io_types=True. Using %s (float32)",
            source,
            path,
        )
        session = ort.InferenceSession(str(path), sess_options=so, providers=provider_list)
        what = str(path)
    active = session.get_providers()
    device = f" device {options.device_id}" if active and active[0] == "CUDAExecutionProvider" else ""
    log.info("loaded %s with %s%s", what, active, device)
    return session
