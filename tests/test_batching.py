"""Micro-batching, fp16 loading and per-worker GPU selection, through the real code paths.

The batcher is driven with plain functions (its own contract), then through the real encoders on the
tiny random-weight CLIP and ArcFace test models, then through :class:`InferenceService`. Vectors of
random-weight models mean nothing; what is checked is that a batched request gets exactly the row an
unbatched one gets (to float tolerance), that a lone request is not held past the configured wait,
and that one failing item fails only its own request.

Timings are asserted generously (CI machines are slow and shared): the bounds prove "not held for
seconds", never millisecond precision.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from PIL import Image

from ai_service.errors import http_status
from ai_service.imaging import ImageError
from ai_service.inference import InferenceService, request_threads
from ai_service.models.base import FaceDetections
from ai_service.models.clip import ClipTextualEncoder, ClipVisualEncoder
from ai_service.models.clip.common import read_json
from ai_service.models.faces import ArcFaceRecognizer
from ai_service.models.faces.arcface import ARCFACE_TEMPLATE
from ai_service.protocol.immich import ModelTask, ModelType
from ai_service.runtime.batching import BatchOptions, MicroBatcher, make_batcher
from ai_service.runtime.onnx import ALLOW_SPINNING_KEY, SessionOptions, create_session, fp16_path
from ai_service.settings import AIServiceSettings
from ai_service.tasks import parse_entries
from tests.builders.clip_models import TextSpec, build_clip_model
from tests.builders.face_models import arcface_random_model
from tests.servers import module_process

REPO = Path(__file__).resolve().parents[1]
CLIP_KINDS = ["test-cn-clip-tiny", "test-clip-tiny", "test-mclip-tiny"]
QUERIES = ["一只猫", "a photo of a dog", "海滩上的狗", "red car", "hello world", "我爱北京天安门", "big cat", "飞机"]


def batching(max_size: int = 8, wait_ms: float = 50.0, concurrency: int = 1) -> SessionOptions:
    return SessionOptions(
        batching=BatchOptions(enabled=True, max_size=max_size, wait_ms=wait_ms, concurrency=concurrency)
    )


def run_concurrently(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """Call ``fn`` on every item from its own thread, all released at once; results (or exceptions) in order."""
    barrier = threading.Barrier(len(items))

    def call(item: Any) -> Any:
        barrier.wait()
        try:
            return fn(item)
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(call, items))


def random_images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 256, (int(rng.integers(40, 90)), int(rng.integers(40, 90)), 3), np.uint8) for _ in range(count)
    ]


def behind_a_held_run(batcher: MicroBatcher[Any, Any] | None, fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """Call ``fn`` on every item from its own thread, with the batcher's first run (``items[0]``'s) held
    until all the others are queued: they then form full batches, whatever the threads' timing. The real
    run goes ahead unchanged once let go. Results (or exceptions) in order."""
    assert batcher is not None
    original = batcher.run_batch
    entered, release = threading.Event(), threading.Event()

    def held(batch: list[Any]) -> Any:
        if not entered.is_set():
            entered.set()
            assert release.wait(30)
        return original(batch)

    def call(item: Any) -> Any:
        try:
            return fn(item)
        except Exception as exc:
            return exc

    batcher.run_batch = held  # type: ignore[method-assign]
    try:
        with ThreadPoolExecutor(max_workers=len(items)) as pool:
            first = pool.submit(call, items[0])
            assert entered.wait(30)
            rest = [pool.submit(call, item) for item in items[1:]]
            deadline = time.monotonic() + 30
            while batcher.queued() < len(rest) and time.monotonic() < deadline:
                time.sleep(0.005)
            release.set()
            return [first.result(), *(f.result() for f in rest)]
    finally:
        batcher.run_batch = original  # type: ignore[method-assign]


# ---- the batcher on its own ------------------------------------------------------------------------------


def test_concurrent_submits_share_batches_and_get_their_own_results() -> None:
    calls: list[list[int]] = []

    def square(items: list[int]) -> list[int]:
        calls.append(list(items))
        time.sleep(0.01)
        return [i * i for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(square, max_size=8, wait_s=0.2)
    items = list(range(24))
    assert run_concurrently(batcher.submit, items) == [i * i for i in items]
    stats = batcher.stats()
    assert stats.items == 24 and stats.largest > 1 and stats.batches < 24
    assert all(len(c) <= 8 for c in calls)
    assert sorted(i for c in calls for i in c) == items


GATE = 10**6  # an item whose run holds the model busy until the test lets it go


class Gate:
    """Keeps a batcher's model busy with one item, so that a test can queue items behind it and know
    exactly which batch they form once it is let go (no reliance on thread timing)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def hold(self, items: list[int]) -> None:
        if GATE in items:
            self.entered.set()
            assert self.release.wait(30), "the test never let the gate go"

    def queue_behind(self, batcher: MicroBatcher[int, Any], items: list[int]) -> list[Any]:
        """Run ``items`` concurrently while the gate item holds the model; results (or exceptions) in order."""
        with ThreadPoolExecutor(max_workers=len(items) + 1) as pool:
            gate = pool.submit(batcher.submit, GATE)
            assert self.entered.wait(30)
            futures = [pool.submit(batcher.submit, item) for item in items]
            deadline = time.monotonic() + 30
            while batcher.queued() < len(items) and time.monotonic() < deadline:
                time.sleep(0.005)
            self.release.set()
            gate.result()
            out: list[Any] = []
            for future in futures:
                try:
                    out.append(future.result())
                except Exception as exc:
                    out.append(exc)
            return out


def test_a_lone_request_on_an_idle_model_is_not_held() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(lambda items: [i + 1 for i in items], max_size=8, wait_s=5.0)
    for value in range(3):
        started = time.monotonic()
        assert batcher.submit(value) == value + 1
        assert time.monotonic() - started < 2.0, "nothing to wait for: an idle model runs a lone request at once"


def test_on_a_busy_model_a_request_waits_for_company_at_most_the_wait() -> None:
    gate = Gate()
    wait_s = 0.3

    def run(items: list[int]) -> list[int]:
        gate.hold(items)
        return items

    # Room for two batches at once: while the gate runs, the next request could start its own batch,
    # but first waits up to wait_s for others to join it.
    batcher: MicroBatcher[int, int] = MicroBatcher(run, max_size=8, wait_s=wait_s, concurrency=2)
    with ThreadPoolExecutor(max_workers=2) as pool:
        held = pool.submit(batcher.submit, GATE)
        assert gate.entered.wait(30)
        started = time.monotonic()
        assert batcher.submit(7) == 7
        elapsed = time.monotonic() - started
        gate.release.set()
        held.result()
    assert wait_s * 0.8 <= elapsed < wait_s + 0.5, elapsed


def test_a_full_batch_runs_without_waiting_out_the_wait() -> None:
    gate = Gate()

    def run(items: list[int]) -> list[int]:
        gate.hold(items)
        return list(items)

    batcher: MicroBatcher[int, int] = MicroBatcher(run, max_size=4, wait_s=30.0)
    started = time.monotonic()
    assert gate.queue_behind(batcher, [1, 2, 3, 4]) == [1, 2, 3, 4]
    assert time.monotonic() - started < 10.0, "a full batch must not wait out the 30 s wait"
    assert batcher.stats().largest == 4


def test_a_failing_item_fails_only_its_own_request() -> None:
    gate = Gate()

    def checked(items: list[int]) -> list[float]:
        gate.hold(items)
        if any(i < 0 for i in items):
            raise ValueError(f"negative input in {items}")
        return [i / 2 for i in items]

    batcher: MicroBatcher[int, float] = MicroBatcher(checked, max_size=4, wait_s=5.0)
    results = gate.queue_behind(batcher, [2, -1, 6, 8])
    assert results[0] == 1.0 and results[2] == 3.0 and results[3] == 4.0
    assert isinstance(results[1], ValueError) and "[-1]" in str(results[1]), "re-run alone, it fails alone"
    assert batcher.stats().split == 1 and batcher.stats().largest == 4

    # A result of the wrong length is a batch failure too, and is split up the same way.
    gate = Gate()

    def short(items: list[int]) -> list[int]:
        gate.hold(items)
        return [0] if len(items) > 1 else items

    odd: MicroBatcher[int, int] = MicroBatcher(short, max_size=4, wait_s=5.0)
    assert gate.queue_behind(odd, [5, 6, 7, 8]) == [5, 6, 7, 8]
    assert odd.stats().split == 1


def test_weights_bound_a_batch_and_a_heavy_item_runs_alone() -> None:
    sizes: list[int] = []

    def total(items: list[list[int]]) -> list[int]:
        sizes.append(sum(len(i) for i in items))
        return [sum(i) for i in items]

    batcher: MicroBatcher[list[int], int] = MicroBatcher(total, max_size=4, wait_s=0.2, weight=len)
    items = [[1], [1, 2], [3], [1, 1, 1, 1, 1, 1], [2, 2], [4]]
    assert run_concurrently(batcher.submit, items) == [sum(i) for i in items]
    assert 6 in sizes, "the six-face item is run on its own"
    assert all(size <= 4 for size in sizes if size != 6)


@pytest.mark.parametrize("concurrency", [1, 2])
def test_concurrency_bounds_the_batches_running_at_once(concurrency: int) -> None:
    running = 0
    most = 0
    lock = threading.Lock()

    def slow(items: list[int]) -> list[int]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(slow, max_size=2, wait_s=0.0, concurrency=concurrency)
    assert run_concurrently(batcher.submit, list(range(16))) == list(range(16))
    assert most <= concurrency
    if concurrency == 2:
        assert most == 2, "with room for two batches, two ran side by side"


def test_options_and_when_no_batcher_is_made(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        BatchOptions(max_size=0)
    with pytest.raises(ValueError):
        BatchOptions(wait_ms=-1)
    path = tmp_path / "a.onnx"
    onnx.save(arcface_random_model(), path)
    session = create_session(path, SessionOptions())
    assert make_batcher(BatchOptions(enabled=False), session, list, fixed_batch=None, name="x") is None
    assert make_batcher(BatchOptions(enabled=True, max_size=1), session, list, fixed_batch=None, name="x") is None
    assert make_batcher(BatchOptions(enabled=True), session, list, fixed_batch=1, name="x") is None
    assert make_batcher(BatchOptions(enabled=None), session, list, fixed_batch=None, name="x") is None, "auto: CPU"
    made = make_batcher(BatchOptions(enabled=True, concurrency=3), session, list, fixed_batch=None, name="x")
    assert made is not None and made.concurrency == 3
    auto = make_batcher(BatchOptions(enabled=True), session, list, fixed_batch=4, name="x")
    threads = session.get_session_options().intra_op_num_threads
    assert auto is not None and auto.concurrency == max(1, (os.cpu_count() or 1) // threads)


# ---- the encoders -----------------------------------------------------------------------------------------


def _clip_encoders(model_dir: Path, name: str, options: SessionOptions) -> tuple[ClipVisualEncoder, ClipTextualEncoder]:
    folder = model_dir / "clip" / name
    config = read_json(folder / "config.json", name)
    return ClipVisualEncoder(name, folder, config, options), ClipTextualEncoder(name, folder, config, options)


@pytest.mark.parametrize("name", CLIP_KINDS)
def test_clip_batched_vectors_equal_single_ones(clip_model_dir: Path, name: str) -> None:
    single_visual, single_text = _clip_encoders(clip_model_dir, name, SessionOptions())
    visual, text = _clip_encoders(clip_model_dir, name, batching(max_size=8, wait_ms=200))
    assert single_visual.batcher is None and visual.batcher is not None and text.batcher is not None

    images = random_images(12)
    got = behind_a_held_run(visual.batcher, visual.encode_image, images)
    for image, vector in zip(images, got, strict=True):
        assert not isinstance(vector, Exception), vector
        np.testing.assert_allclose(vector, single_visual.encode_image(image), rtol=1e-4, atol=1e-5)
        assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5
    assert visual.batcher.stats().largest == 8, "the eleven queued images ran as a batch of 8 and one of 3"

    got = behind_a_held_run(text.batcher, text.encode_text, QUERIES)
    for query, vector in zip(QUERIES, got, strict=True):
        assert not isinstance(vector, Exception), vector
        np.testing.assert_allclose(vector, single_text.encode_text(query), rtol=1e-4, atol=1e-5)
    assert text.batcher.stats().largest == len(QUERIES) - 1

    # Unordered threads, no holding: whatever batches form, every request gets its own vector.
    got = run_concurrently(visual.encode_image, images)
    for image, vector in zip(images, got, strict=True):
        np.testing.assert_allclose(vector, single_visual.encode_image(image), rtol=1e-4, atol=1e-5)

    # The explicit batch paths give the same rows without waiting for anybody.
    expected = np.stack([single_visual.encode_image(i) for i in images[:3]])
    np.testing.assert_allclose(visual.encode_images(images[:3]), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        text.encode_texts(QUERIES[:3]),
        np.stack([single_text.encode_text(q) for q in QUERIES[:3]]),
        rtol=1e-4,
        atol=1e-5,
    )


def _fix_batch_axis(folder: Path, component: str, size: int) -> None:
    """Rewrite a built model's graph inputs and outputs to a constant batch axis, as some exports have."""
    path = folder / component / "model.onnx"
    model = onnx.load(str(path))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = size
    onnx.save(model, str(path))


@pytest.mark.parametrize("fixed", [4, 1])
def test_clip_exports_with_a_fixed_batch_axis(tmp_path: Path, fixed: int) -> None:
    build_clip_model(tmp_path / "dynamic", "m", kind="cn-clip", seed=8)
    build_clip_model(tmp_path / "fixed", "m", kind="cn-clip", seed=8)
    for component in ("visual", "textual"):
        _fix_batch_axis(tmp_path / "fixed" / "clip" / "m", component, fixed)
    ref_visual, ref_text = _clip_encoders(tmp_path / "dynamic", "m", SessionOptions())
    visual, text = _clip_encoders(tmp_path / "fixed", "m", batching(max_size=8, wait_ms=100))
    assert visual.max_batch == fixed and text.max_batch == fixed
    assert (visual.batcher is None) == (fixed == 1) and (text.batcher is None) == (fixed == 1)
    images = random_images(6, seed=11)
    queries = QUERIES[:6]
    got = run_concurrently(visual.encode_image, images) if visual.batcher else [visual.encode_image(i) for i in images]
    for image, vector in zip(images, got, strict=True):
        np.testing.assert_allclose(vector, ref_visual.encode_image(image), rtol=1e-4, atol=1e-5)
    got = run_concurrently(text.encode_text, queries) if text.batcher else [text.encode_text(q) for q in queries]
    for query, vector in zip(queries, got, strict=True):
        np.testing.assert_allclose(vector, ref_text.encode_text(query), rtol=1e-4, atol=1e-5)
    # Explicit batches of any length are chunked to the fixed size (the last chunk padded).
    np.testing.assert_allclose(
        visual.encode_images(images[:5]), ref_visual.encode_images(images[:5]), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(text.encode_texts(queries[:5]), ref_text.encode_texts(queries[:5]), rtol=1e-4, atol=1e-5)


def test_a_lone_encode_is_not_held_past_the_wait(clip_model_dir: Path) -> None:
    wait_ms = 300.0
    single, _ = _clip_encoders(clip_model_dir, "test-cn-clip-tiny", SessionOptions())
    visual, _ = _clip_encoders(clip_model_dir, "test-cn-clip-tiny", batching(wait_ms=wait_ms))
    image = random_images(1)[0]
    single.encode_image(image)
    visual.encode_image(image)  # warm both sessions up
    started = time.monotonic()
    single.encode_image(image)
    alone = time.monotonic() - started
    for _ in range(3):
        started = time.monotonic()
        visual.encode_image(image)
        assert time.monotonic() - started < alone + wait_ms / 1000 + 0.5


def test_a_model_error_for_one_query_fails_only_that_request(tmp_path: Path) -> None:
    """A text tower whose embedding table is smaller than its tokenizer's vocabulary: ONNX Runtime
    refuses any query with an id past the table (Gather out of bounds), which fails the whole batch
    run. Only that query's request may fail; the others must get their normal vectors."""
    build_clip_model(tmp_path, "short-table", kind="cn-clip", text=TextSpec(kind="cn-clip", vocab_size=110))
    folder = tmp_path / "clip" / "short-table"
    config = read_json(folder / "config.json", "short-table")
    single = ClipTextualEncoder("short-table", folder, config, SessionOptions())
    batched = ClipTextualEncoder("short-table", folder, config, batching(max_size=4, wait_ms=5000))
    queries = ["!!", "#", "猫", "#$", "!"]  # ids 104-107 are inside the 110-row table, 猫's is not
    results = behind_a_held_run(batched.batcher, batched.encode_text, queries)
    assert isinstance(results[2], Exception) and "out of data bounds" in str(results[2])
    for i in (0, 1, 3, 4):
        np.testing.assert_allclose(results[i], single.encode_text(queries[i]), rtol=1e-4, atol=1e-5)
    assert batched.batcher is not None and batched.batcher.stats().split == 1
    with pytest.raises(Exception, match="out of data bounds"):
        single.encode_text("猫")  # the same error as unbatched: batching changes nothing a request sees


def _faces(image: np.ndarray, count: int, seed: int) -> FaceDetections:
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    landmarks = []
    for _ in range(count):
        scale = rng.uniform(0.5, 1.0)
        offset = rng.uniform([0, 0], [w - 112 * scale, h - 112 * scale])
        landmarks.append(ARCFACE_TEMPLATE * scale + offset)
    marks = np.array(landmarks, np.float32)
    boxes = np.concatenate([marks.min(axis=1) - 5, marks.max(axis=1) + 5], axis=1)
    return FaceDetections(boxes.astype(np.float32), np.ones(count, np.float32), marks)


@pytest.mark.parametrize("fixed", [None, 4, 1])
def test_arcface_batched_embeddings_equal_single_ones(tmp_path: Path, fixed: int | None) -> None:
    path = tmp_path / "arcface.onnx"
    onnx.save(arcface_random_model(batch=fixed), path)
    single = ArcFaceRecognizer(create_session(path, SessionOptions()))
    options = BatchOptions(enabled=True, max_size=8, wait_ms=200, concurrency=1)
    batched = ArcFaceRecognizer(create_session(path, SessionOptions()), batching=options)
    assert (batched.batcher is None) == (fixed == 1), "a batch-1 export is served per request"
    images = random_images(10, seed=3)
    images = [np.pad(img, ((0, 150), (0, 150), (0, 0))) for img in images]  # room for 112-px faces
    jobs = [(img, _faces(img, 1 + i % 3, seed=i)) for i, img in enumerate(images)]
    jobs.append((images[0], _faces(images[0], 11, seed=99)))  # more faces than a batch holds: runs alone
    got = (
        behind_a_held_run(batched.batcher, lambda job: batched.embed(*job), jobs)
        if batched.batcher is not None
        else run_concurrently(lambda job: batched.embed(*job), jobs)
    )
    for (image, faces), rows in zip(jobs, got, strict=True):
        assert not isinstance(rows, Exception), rows
        assert rows.shape == (len(faces), 512)
        np.testing.assert_allclose(rows, single.embed(image, faces), rtol=1e-4, atol=1e-5)
    if batched.batcher is not None:
        assert batched.batcher.stats().largest > 1, "faces of several requests shared a run"
    empty = FaceDetections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, 5, 2), np.float32))
    assert batched.embed(images[0], empty).shape == (0, 512)


# ---- through the service ------------------------------------------------------------------------------


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def _vector(response: dict[str, Any]) -> np.ndarray:
    return np.asarray(json.loads(response["clip"]), np.float32)


async def gather_behind_a_held_run(batcher: MicroBatcher[Any, Any] | None, calls: list[Any], queued: int) -> list[Any]:
    """``asyncio.gather`` of ``calls`` with the batcher's first run held until ``queued`` more items wait."""
    assert batcher is not None
    original = batcher.run_batch
    entered, release = threading.Event(), threading.Event()

    def held(batch: list[Any]) -> Any:
        if not entered.is_set():
            entered.set()
            assert release.wait(30)
        return original(batch)

    batcher.run_batch = held  # type: ignore[method-assign]
    try:
        results = asyncio.gather(*calls, return_exceptions=True)
        deadline = time.monotonic() + 30
        while not (entered.is_set() and batcher.queued() >= queued) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        release.set()
        return list(await results)
    finally:
        batcher.run_batch = original  # type: ignore[method-assign]


def test_service_batches_concurrent_requests_and_isolates_a_bad_image(clip_model_dir: Path) -> None:
    """Through ``InferenceService.predict`` (decode, thread pool, model cache, batcher): concurrent requests
    get the vectors unbatched ones get, and an undecodable image fails (400) only its own request."""
    name = "test-cn-clip-512"
    entries = parse_entries(json.dumps({"clip": {"visual": {"modelName": name}}}))
    text_entries = parse_entries(json.dumps({"clip": {"textual": {"modelName": name}}}))
    images = [_jpeg(img) for img in random_images(8, seed=7)]
    bodies: list[bytes] = [*images[:3], b"\xff\xd8 not a jpeg at all", *images[3:]]

    async def run(settings: AIServiceSettings) -> tuple[list[Any], list[Any], int]:
        service = InferenceService(settings)
        await service.start()
        try:
            visual = service.cache.get(service.registry.resolve(ModelTask.CLIP, ModelType.VISUAL, name))
            text = service.cache.get(service.registry.resolve(ModelTask.CLIP, ModelType.TEXTUAL, name))
            image_calls = [service.predict(entries, body, None) for body in bodies]
            text_calls = [service.predict(text_entries, None, query) for query in QUERIES]
            if settings.batch_enabled:
                # Seven valid images (the bad one never reaches the model) and seven queries queue behind the first.
                image_results = await gather_behind_a_held_run(visual.batcher, image_calls, queued=len(images) - 1)
                text_results = await gather_behind_a_held_run(text.batcher, text_calls, queued=len(QUERIES) - 1)
                largest = min(visual.batcher.stats().largest, text.batcher.stats().largest)
            else:
                assert visual.batcher is None and text.batcher is None
                image_results = await asyncio.gather(*image_calls, return_exceptions=True)
                text_results = await asyncio.gather(*text_calls, return_exceptions=True)
                largest = 0
        finally:
            await service.stop()
        return image_results, text_results, largest

    common: dict[str, Any] = {
        "model_dir": clip_model_dir,
        "model_ttl": 0,
        "preload": {"clip_visual": [name], "clip_textual": [name]},
    }
    on = AIServiceSettings(**common, batch_enabled=True, batch_max_size=8, batch_wait_ms=100, batch_concurrency=1)
    off = AIServiceSettings(**common, batch_enabled=False)
    assert request_threads(on) >= 8, "the pool holds a whole batch of waiting requests"
    batched_visual, batched_text, largest = asyncio.run(run(on))
    single_visual, single_text, _ = asyncio.run(run(off))
    assert largest == 7

    bad = batched_visual[3]
    assert isinstance(bad, ImageError) and http_status(bad) == 400
    assert isinstance(single_visual[3], ImageError) and http_status(single_visual[3]) == 400
    for i, (got, expected) in enumerate(zip(batched_visual, single_visual, strict=True)):
        if i == 3:
            continue
        assert got["imageWidth"] == expected["imageWidth"] and got["imageHeight"] == expected["imageHeight"]
        np.testing.assert_allclose(_vector(got), _vector(expected), rtol=1e-4, atol=1e-5)
    for got, expected in zip(batched_text, single_text, strict=True):
        np.testing.assert_allclose(_vector(got), _vector(expected), rtol=1e-4, atol=1e-5)


def test_batching_is_auto_off_on_a_cpu(clip_model_dir: Path) -> None:
    """Unset, batching follows the provider: on a GPU it batches, on this CPU the service runs as before
    (no batcher, one pool thread per core)."""
    settings = AIServiceSettings(model_dir=clip_model_dir, model_ttl=0)
    assert settings.batch_enabled is None and settings.batch_options().enabled is None
    assert request_threads(settings) == (os.cpu_count() or 1)
    assert request_threads(AIServiceSettings(batch_enabled=True, batch_max_size=64)) == max(os.cpu_count() or 1, 64)
    visual, text = _clip_encoders(clip_model_dir, "test-cn-clip-tiny", settings.session_options())
    assert visual.batcher is None and text.batcher is None


# ---- fp16 -------------------------------------------------------------------------------------------------


def test_fp16_converted_at_load(clip_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    name = "test-cn-clip-tiny"
    full_visual, full_text = _clip_encoders(clip_model_dir, name, SessionOptions())
    with caplog.at_level(logging.INFO, logger="ai_service.runtime.onnx"):
        half_visual, half_text = _clip_encoders(clip_model_dir, name, SessionOptions(precision="fp16"))
    assert "converted to fp16 at load" in caplog.text
    assert half_visual.session.get_inputs()[0].type == "tensor(float)", "callers still feed float32"
    image = random_images(1)[0]
    a, b = full_visual.encode_image(image), half_visual.encode_image(image)
    assert b.dtype == np.float32 and float(a @ b) > 0.999
    assert not np.array_equal(a, b), "the half-precision graph really ran"
    a, b = full_text.encode_text("一只猫"), half_text.encode_text("一只猫")
    assert float(a @ b) > 0.999 and not np.array_equal(a, b)


def _fp16_copy(source: Path, target: Path, *, keep_io_types: bool) -> None:
    from onnxruntime.transformers import float16

    converted = float16.convert_float_to_float16(onnx.load(str(source)), keep_io_types=keep_io_types)
    onnx.save(converted, str(target))


def test_fp16_file_next_to_the_model_is_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``model_fp16.onnx`` wins over converting; to prove which file ran it holds another model's weights."""
    build_clip_model(tmp_path, "m", kind="cn-clip", seed=1)
    build_clip_model(tmp_path / "other", "m", kind="cn-clip", seed=2)
    visual = tmp_path / "clip" / "m" / "visual" / "model.onnx"
    _fp16_copy(tmp_path / "other" / "clip" / "m" / "visual" / "model.onnx", fp16_path(visual), keep_io_types=True)
    image = random_images(1)[0]
    with caplog.at_level(logging.INFO, logger="ai_service.runtime.onnx"):
        half, _ = _clip_encoders(tmp_path, "m", SessionOptions(precision="fp16"))
    assert f"{fp16_path(visual)} (fp16)" in caplog.text
    other_full, _ = _clip_encoders(tmp_path / "other", "m", SessionOptions())
    own_full, _ = _clip_encoders(tmp_path, "m", SessionOptions())
    vector = half.encode_image(image)
    assert float(vector @ other_full.encode_image(image)) > 0.999
    assert float(vector @ own_full.encode_image(image)) < 0.99


def test_fp16_file_with_half_precision_inputs_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    build_clip_model(tmp_path, "m", kind="cn-clip", seed=1)
    visual = tmp_path / "clip" / "m" / "visual" / "model.onnx"
    _fp16_copy(visual, fp16_path(visual), keep_io_types=False)
    with caplog.at_level(logging.WARNING, logger="ai_service.runtime.onnx"):
        half, _ = _clip_encoders(tmp_path, "m", SessionOptions(precision="fp16"))
    assert "keep_io_types=True" in caplog.text
    full, _ = _clip_encoders(tmp_path, "m", SessionOptions())
    image = random_images(1)[0]
    np.testing.assert_array_equal(half.encode_image(image), full.encode_image(image))


def test_fp16_without_onnx_falls_back_to_fp32(
    clip_model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # what an environment without the package looks like
    with caplog.at_level(logging.WARNING, logger="ai_service.runtime.onnx"):
        half, _ = _clip_encoders(clip_model_dir, "test-cn-clip-tiny", SessionOptions(precision="fp16"))
    assert "using float32" in caplog.text
    full, _ = _clip_encoders(clip_model_dir, "test-cn-clip-tiny", SessionOptions())
    image = random_images(1)[0]
    np.testing.assert_array_equal(half.encode_image(image), full.encode_image(image))


# ---- GPUs per worker --------------------------------------------------------------------------------------


def test_device_ids_setting() -> None:
    assert AIServiceSettings(device_ids="1, 3").device_ids == [1, 3]  # type: ignore[arg-type]
    assert AIServiceSettings(device_ids="[2]").device_ids == [2]  # type: ignore[arg-type]
    assert AIServiceSettings(device_ids="").device_ids is None  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        AIServiceSettings(device_ids="[-1]")  # type: ignore[arg-type]
    assert AIServiceSettings(device_id=5).session_options().device_id == 5
    assert AIServiceSettings(device_id=5, device_ids=[7, 8]).session_options().device_id == 7  # slot 0


def test_sessions_do_not_spin_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every session the service opens has ONNX Runtime's busy-wait off (AI_SERVICE_ONNX_SPINNING turns it on)."""
    path = tmp_path / "a.onnx"
    onnx.save(arcface_random_model(), path)

    def spinning() -> str:
        options = create_session(path, AIServiceSettings().session_options()).get_session_options()
        return options.get_session_config_entry(ALLOW_SPINNING_KEY)

    assert spinning() == "0"
    monkeypatch.setenv("AI_SERVICE_ONNX_SPINNING", "true")
    assert spinning() == "1"


def test_worker_slots_are_claimed_once_and_freed_with_the_process(tmp_path: Path) -> None:
    claim = (
        "import sys, time; from pathlib import Path; from ai_service.runtime import slots; "
        "print(slots.claim_slot(Path(sys.argv[1]), 3), flush=True); time.sleep(float(sys.argv[2]))"
    )

    def start(hold_s: float) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-c", claim, str(tmp_path), str(hold_s)], cwd=REPO, stdout=subprocess.PIPE, text=True
        )

    first, second = start(30), start(30)
    try:
        first_slot = int(first.stdout.readline())  # type: ignore[union-attr]
        second_slot = int(second.stdout.readline())  # type: ignore[union-attr]
        assert {first_slot, second_slot} == {0, 1}
        first.kill()  # its lock goes with it: a restarted worker takes over its slot (and GPU)
        first.wait()
        third = start(0)
        assert int(third.stdout.readline()) == first_slot  # type: ignore[union-attr]
        third.wait()
    finally:
        for proc in (first, second):
            proc.kill()
            proc.wait()


def test_each_worker_process_gets_the_next_device(clip_model_dir: Path, tmp_path: Path) -> None:
    """``python -m ai_service`` with two workers: both answer on one port, worker i uses device_ids[i]."""
    log_path = tmp_path / "workers.log"
    env = {
        "AI_SERVICE_MODEL_DIR": str(clip_model_dir),
        "AI_SERVICE_WORKERS": "2",
        "AI_SERVICE_DEVICE_IDS": "4,7",
    }
    with module_process("ai_service", env, log=log_path, ready_timeout=120):
        pattern = re.compile(r"worker (\d) of 2 \(pid \d+\) uses GPU device (\d)")
        deadline = time.monotonic() + 120
        found: dict[str, str] = {}
        while time.monotonic() < deadline and len(found) < 2:
            found = dict(pattern.findall(log_path.read_text(errors="replace")))
            time.sleep(0.2)
        assert found == {"0": "4", "1": "7"}, log_path.read_text(errors="replace")[-3000:]


# ---- OCR detector input buckets ---------------------------------------------------------------------------


class _ShapeRecorder:
    """The detector session, recording the input shapes it is run with (the run itself is the real one)."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.shapes: set[tuple[int, ...]] = set()

    def run(self, outputs: Any, feeds: dict[str, np.ndarray], run_options: Any = None) -> Any:
        self.shapes |= {tuple(v.shape) for v in feeds.values()}
        return self.session.run(outputs, feeds, run_options)


def _ocr_pipeline(bucket: int | None) -> Any:
    from ai_service.models import ocr

    files = ocr.bundled_files()
    if files is None:
        pytest.skip("rapidocr's bundled OCR model is not installed")
    return ocr.load_pipeline(files, SessionOptions(), None, 6, bucket)


FONT = Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc")  # apt fonts-wqy-zenhei (scripts/bootstrap.sh)
LINES = ["增值税专用发票 No.12345", "北京欢迎你 Hello World 2026", "上海市浦东新区 世纪大道100号"]


def _page(width: int, height: int, seed: int) -> np.ndarray:
    """Real text, rendered with a CJK font, at a few places on a white page of the given size."""
    from PIL import ImageDraw, ImageFont

    if not FONT.is_file():
        pytest.skip(f"CJK font {FONT} not installed (apt fonts-wqy-zenhei)")
    rng = np.random.default_rng(seed)
    font = ImageFont.truetype(str(FONT), 34)
    page = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(page)
    for i, line in enumerate(LINES):
        draw.text((int(rng.integers(10, 60)), 30 + i * 90 + int(rng.integers(0, 20))), line, font=font, fill="black")
    return np.asarray(page)


def test_ocr_buckets_collapse_detector_shapes() -> None:
    from ai_service.models.ocr import bucketed_size, detector_input_size

    # Immich previews (1440 px long side) of common aspect ratios, at Immich's maxResolution 736.
    sizes = [(1440, round(1440 * r)) for r in (0.5, 0.5625, 0.6, 0.618, 0.667, 0.7, 0.75, 0.8, 0.9, 1.0)]
    sizes += [(w, h) for h, w in sizes]
    shapes = {detector_input_size(h, w, 736) for h, w in sizes}
    buckets = {bucketed_size(*s, 128) for s in shapes}
    assert len(buckets) < len(shapes)
    assert all(h % 128 == 0 and w % 128 == 0 for h, w in buckets)
    assert bucketed_size(736, 981, 0) == (736, 981) and bucketed_size(736, 981, 128) == (768, 1024)


def test_ocr_detector_sees_only_bucketed_shapes_and_reads_the_same_lines() -> None:
    bucketed, plain = _ocr_pipeline(128), _ocr_pipeline(0)
    recorder = _ShapeRecorder(bucketed._det)
    bucketed._det = recorder
    for seed, (w, h) in enumerate([(900, 500), (1000, 620), (700, 900)]):
        image = _page(w, h, seed)
        got = bucketed.recognize(image, bucketed.detect(image, 0.5, 736), 0.8)
        expected = plain.recognize(image, plain.detect(image, 0.5, 736), 0.8)
        # Not bit-identical: PP-OCRv6's detector has squeeze-and-excitation blocks whose global average
        # pooling sees the padding, so every probability shifts a little: boxes move by a few pixels, which
        # can add or drop a space the recogniser reads at a box edge. The characters are the same.
        assert len(expected.texts) == len(LINES)
        assert ["".join(t.split()) for t in got.texts] == ["".join(t.split()) for t in expected.texts]
        np.testing.assert_allclose(got.quads, expected.quads, atol=6)
    assert recorder.shapes and all(s[2] % 128 == 0 and s[3] % 128 == 0 for s in recorder.shapes)


def test_ocr_buckets_are_off_on_a_cpu_so_results_stay_identical(tmp_path: Path) -> None:
    from ai_service.models.ocr import BUNDLED_NAME, COMPONENT, OcrFamily
    from ai_service.models.store import ModelStore

    family = OcrFamily(ModelStore(tmp_path), SessionOptions(), AIServiceSettings(model_dir=tmp_path))
    pipeline = family.load(BUNDLED_NAME, COMPONENT)
    assert pipeline._det_bucket == 0, "auto: no padding on the CPU provider"
    plain = _ocr_pipeline(0)
    image = _page(1000, 620, 1)
    got, expected = pipeline.detect(image, 0.5, 736), plain.detect(image, 0.5, 736)
    assert len(expected.quads) == len(LINES)
    np.testing.assert_array_equal(got.quads, expected.quads)
    np.testing.assert_array_equal(got.scores, expected.scores)
    with pytest.raises(ValueError, match="multiple of 32"):
        _ocr_pipeline(100)
    with pytest.raises(ValueError):
        AIServiceSettings(ocr_det_bucket_px=100)
