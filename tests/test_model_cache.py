"""Model handling: lazy load once, one load at a time, preload, idle unload without a restart,
and execution-provider choice. Real model families on the tiny CLIP test models and bundled OCR."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from ai_service.inference import InferenceService
from ai_service.models.base import ClipTextualModel, ModelLoadError
from ai_service.protocol.immich import ModelTask, ModelType
from ai_service.runtime.onnx import available_providers, choose_providers
from ai_service.settings import AIServiceSettings, PreloadSettings

MODEL = "test-cn-clip-512"


def _service(model_dir: Path, **overrides: object) -> InferenceService:
    return InferenceService(AIServiceSettings(model_dir=model_dir, **overrides))  # type: ignore[arg-type]


class LoadRecorder:
    """Wraps the registry's real ``load`` to record how many loads overlap (instrumentation only)."""

    def __init__(self, service: InferenceService) -> None:
        self.calls = 0
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        real_load = service.registry.load

        def load(ref):  # type: ignore[no-untyped-def]
            with self._lock:
                self.calls += 1
                self.active += 1
                self.max_active = max(self.max_active, self.active)
            try:
                time.sleep(0.05)  # widen the window in which a second load could start
                return real_load(ref)
            finally:
                with self._lock:
                    self.active -= 1

        service.registry.load = load  # type: ignore[method-assign]


def test_concurrent_requests_load_a_model_once_and_loads_never_overlap(clip_model_dir: Path) -> None:
    service = _service(clip_model_dir)
    recorder = LoadRecorder(service)
    textual = service.registry.resolve(ModelTask.CLIP, ModelType.TEXTUAL, MODEL)
    visual = service.registry.resolve(ModelTask.CLIP, ModelType.VISUAL, MODEL)
    refs = [textual, visual] * 8
    with ThreadPoolExecutor(8) as pool:
        models = list(pool.map(service.cache.get, refs))
    assert recorder.calls == 2, "each model is loaded exactly once"
    assert recorder.max_active == 1, "two loads never run at the same time"
    assert len({id(m) for m, ref in zip(models, refs, strict=True) if ref == textual}) == 1
    assert set(service.cache.loaded()) == {textual, visual}


def test_idle_models_are_unloaded_and_reloaded_without_breaking_a_request_in_flight(clip_model_dir: Path) -> None:
    service = _service(clip_model_dir, model_ttl=0.2)
    ref = service.registry.resolve(ModelTask.CLIP, ModelType.TEXTUAL, MODEL)
    first = service.cache.get(ref)
    assert isinstance(first, ClipTextualModel)
    assert service.cache.unload_idle() == [], "a model used just now stays"
    dropped = service.cache.unload_idle(now=time.monotonic() + 1.0)
    assert dropped == [ref] and service.cache.loaded() == []
    # A request still holding the model keeps working after the cache let go of it ...
    vector = first.encode_text("北京")
    assert vector.shape == (512,)
    # ... and the next request loads a fresh copy that gives the same answer.
    second = service.cache.get(ref)
    assert second is not first
    np.testing.assert_allclose(second.encode_text("北京"), vector, rtol=1e-5, atol=1e-6)


def test_ttl_zero_keeps_models_forever(clip_model_dir: Path) -> None:
    service = _service(clip_model_dir, model_ttl=0)
    ref = service.registry.resolve(ModelTask.CLIP, ModelType.TEXTUAL, MODEL)
    service.cache.get(ref)
    assert service.cache.unload_idle(now=time.monotonic() + 10**6) == []


def test_background_reaper_unloads_idle_models(clip_model_dir: Path) -> None:
    async def scenario() -> list[object]:
        service = _service(clip_model_dir, model_ttl=0.2, model_ttl_poll_s=0.05)
        await service.start()
        try:
            ref = service.registry.resolve(ModelTask.CLIP, ModelType.TEXTUAL, MODEL)
            await service.run_blocking(service.cache.get, ref)
            assert service.cache.loaded() == [ref]
            deadline = time.monotonic() + 5
            while service.cache.loaded() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return list(service.cache.loaded())
        finally:
            await service.stop()

    assert asyncio.run(scenario()) == []


def test_preload_loads_at_start_and_a_missing_preload_does_not_stop_the_service(
    clip_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    preload = PreloadSettings(clip_textual=[MODEL, "ViT-B-16__cn-clip"], ocr=["PP-OCRv5_mobile"])

    async def scenario() -> list[tuple[str, str, str]]:
        service = _service(clip_model_dir, preload=preload, model_ttl=0)
        await service.start()
        try:
            return sorted((str(r.task), r.name, r.component) for r in service.cache.loaded())
        finally:
            await service.stop()

    loaded = asyncio.run(scenario())
    assert ("clip", MODEL, "textual") in loaded
    assert ("ocr", "PP-OCRv6_small", "pipeline") in loaded
    assert not any(name == "ViT-B-16__cn-clip" for _, name, _ in loaded)
    assert "ViT-B-16__cn-clip" in caplog.text, "the failed preload is logged with its name"


def test_provider_choice() -> None:
    available = available_providers()
    assert "CPUExecutionProvider" in available
    automatic = choose_providers(None)
    assert automatic[-1] == "CPUExecutionProvider"
    if "CUDAExecutionProvider" in available:
        assert automatic[0] == "CUDAExecutionProvider"
    else:
        assert automatic == ["CPUExecutionProvider"]
        # Asking for CUDA on a CPU-only build keeps the providers that exist, in the order asked for ...
        assert choose_providers(("CUDAExecutionProvider", "CPUExecutionProvider")) == ["CPUExecutionProvider"]
        # ... and asking only for ones that do not exist is an error, not a silent fallback.
        with pytest.raises(RuntimeError, match="none of the requested"):
            choose_providers(("CUDAExecutionProvider",))


def test_a_corrupt_model_is_reported_by_name_and_the_details_are_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # An OCR recogniser folder in Immich's layout whose model.onnx is a truncated download.
    broken = tmp_path / "ocr" / "MY__broken" / "recognition"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"truncated download")
    service = _service(tmp_path)
    ref = service.registry.resolve(ModelTask.OCR, ModelType.DETECTION, "MY__broken")
    with caplog.at_level("ERROR", logger="ai_service.models.cache"), pytest.raises(ModelLoadError) as raised:
        service.cache.get(ref)
    message = str(raised.value)
    # The client learns which model failed and where to look, not ONNX Runtime's words or server paths.
    assert "'MY__broken'" in message and "log" in message
    assert str(tmp_path) not in message and "ONNX" not in message and "protobuf" not in message.lower()
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "MY__broken" in logged and str(tmp_path) in logged
