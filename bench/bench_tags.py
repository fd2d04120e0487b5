"""Tag assignment cost per image (CPU), for the two taggers of the 'tagging' task.

* Zero-shot (the library's default): the image's CLIP embedding against the vocabulary's 1 136 text
  embeddings (512-d), per-tag thresholds, top-k — what the library adds to its 'clip' step
  (``library.tags.choose_tags``), without the database write. The text matrix is random unit rows: a matrix
  product costs the same whatever the values (``--text`` embeds the real vocabulary with a ViT-B/16-sized
  cn-clip text tower and times that one-time cost too).
* Zero-shot with the visual embedding included: JPEG 1440x1080 -> draft decode -> ViT-B/16-shaped image
  tower (random weights, cn-clip ViT-B-16's shape) -> tags: what tagging costs when no CLIP step ran.
* The RAM++-layout ONNX tagger (``RamTagger``) with RAM's 4 585 tags at 384 px, twice: a trivial graph
  (pool + linear: the plumbing — resize, normalise, sigmoid, thresholds — alone), and a ViT-B/16 tower at
  224 px with a 4 585-way head (a stand-in of known size; a real RAM++ is a Swin-L at 384 px, much heavier,
  and is not measured here: its weights cannot be downloaded in this environment).

    .venv/bin/python bench/bench_tags.py [--runs 20] [--threads N] [--text]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ai_service.imaging import decode_image  # noqa: E402
from ai_service.models.clip import ClipFamily, ClipVisualEncoder  # noqa: E402
from ai_service.models.store import ModelStore  # noqa: E402
from ai_service.models.tagging.ram import RamTagger  # noqa: E402
from ai_service.models.tagging.vocabulary import vocabulary  # noqa: E402
from ai_service.models.tagging.zero_shot import ZeroShotTagger  # noqa: E402
from ai_service.runtime.onnx import SessionOptions, default_intra_threads  # noqa: E402
from ai_service.settings import AIServiceSettings  # noqa: E402
from ai_service.tasks.tagging import choose  # noqa: E402
from bench.bench_clip import HEADER, MAX_PIXELS, photo_jpeg, row, timed  # noqa: E402
from library.tags import choose_tags  # noqa: E402
from tests.builders.clip_models import build_vit_b16_model  # noqa: E402
from tests.builders.tagging_models import build_ram_tagger  # noqa: E402

NAME = "bench-vit-b-16"
RAM_TAGS = 4585  # recognize-anything's ram_tag_list.txt


def unit_rows(rows: int, dim: int, seed: int) -> np.ndarray:
    matrix = np.random.default_rng(seed).normal(size=(rows, dim))
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def write_tag_lists(folder: Path, count: int) -> None:
    (folder / "ram_tag_list.txt").write_text("".join(f"tag{n}\n" for n in range(count)), encoding="utf-8")
    (folder / "ram_tag_list_chinese.txt").write_text("".join(f"标签{n}\n" for n in range(count)), encoding="utf-8")
    for extra in ("ram_tag_list_threshold.txt",):
        (folder / extra).unlink(missing_ok=True)


def trivial_ram(root: Path) -> Path:
    """The test builder's pool + linear tagger, widened to RAM's tag count and 384 px input."""
    folder = build_ram_tagger(root, "bench-ram-trivial", size=384)
    model = onnx.load(str(folder / "visual" / "model.onnx"))
    rng = np.random.default_rng(1)
    init = {t.name: t for t in model.graph.initializer}
    init["w"].CopyFrom(numpy_helper.from_array(rng.normal(0, 1, (3, RAM_TAGS)).astype(np.float32), "w"))
    init["b"].CopyFrom(numpy_helper.from_array(np.zeros(RAM_TAGS, np.float32), "b"))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", RAM_TAGS]))
    onnx.save(model, str(folder / "visual" / "model.onnx"))
    write_tag_lists(folder, RAM_TAGS)
    return folder


def vit_ram(root: Path) -> Path:
    """The ViT-B/16 image tower (224 px, 512-d output) with a 4 585-way linear head, in the RAM++ layout."""
    tower = onnx.load(str(root / "clip" / NAME / "visual" / "model.onnx"))
    graph = tower.graph
    features = graph.output[0].name
    rng = np.random.default_rng(2)
    graph.initializer.append(numpy_helper.from_array(rng.normal(0, 0.05, (512, RAM_TAGS)).astype(np.float32), "head"))
    graph.node.append(helper.make_node("MatMul", [features, "head"], ["logits"]))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", RAM_TAGS]))
    folder = root / "tagging" / "bench-ram-vit"
    (folder / "visual").mkdir(parents=True)
    onnx.save(tower, str(folder / "visual" / "model.onnx"))
    (folder / "config.json").write_text(
        json.dumps({"image_size": 224, "mean": [0.481, 0.458, 0.408], "std": [0.269, 0.261, 0.276]}), encoding="utf-8"
    )
    write_tag_lists(folder, RAM_TAGS)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="timed calls per figure (after 3 warm-up calls)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: service default)")
    parser.add_argument("--text", action="store_true", help="embed the real vocabulary with a ViT-B/16 text tower")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    options = SessionOptions(intra_op_threads=args.threads)
    count = len(vocabulary())

    with tempfile.TemporaryDirectory(prefix="bench-tags-") as tmp:
        root = Path(tmp)
        build_vit_b16_model(root, NAME, with_text=args.text)
        family = ClipFamily(ModelStore(root), options, AIServiceSettings(model_dir=root))
        visual = family.load(NAME, "visual")
        assert isinstance(visual, ClipVisualEncoder)
        texts = unit_rows(count, 512, 0)
        keys = [t.key for t in vocabulary()]
        limits = np.full(count, 0.05)
        jpeg = photo_jpeg()
        embedding = visual.encode_image(decode_image(jpeg, max_pixels=MAX_PIXELS, min_side=224).rgb)

        print(
            f"onnxruntime {ort.__version__}, {os.cpu_count()} CPU cores, intra-op threads "
            f"{args.threads or default_intra_threads()}; vocabulary {count} tags, 512-d; {args.runs} runs"
        )
        if args.text:
            started = time.perf_counter()
            textual = family.load(NAME, "textual")
            ZeroShotTagger(NAME, visual, textual, None)  # type: ignore[arg-type]
            print(f"one-time vocabulary text embeddings (ViT-B/16 text tower): {time.perf_counter() - started:.1f} s")
        print(f"\n  {'ms per image':<50} {HEADER}")
        print(
            row(
                "zero-shot, embedding given (library)",
                timed(lambda: choose_tags(keys, texts, limits, embedding, 5), 200),
            )
        )

        def zero_shot_with_visual() -> object:
            vector = visual.encode_image(decode_image(jpeg, max_pixels=MAX_PIXELS, min_side=224).rgb)
            return choose_tags(keys, texts, limits, vector, 5)

        print(row("zero-shot incl. decode + ViT-B/16 visual", timed(zero_shot_with_visual, args.runs)))
        for folder, label in (
            (trivial_ram(root), "RAM layout, pool+linear (plumbing), 384 px"),
            (vit_ram(root), "RAM layout, ViT-B/16 + 4585 head, 224 px"),
        ):
            tagger = RamTagger(folder.name, folder, options)

            def ram_tags(tagger: RamTagger = tagger) -> object:
                rgb = decode_image(jpeg, max_pixels=MAX_PIXELS, min_side=tagger.input_size).rgb
                return choose(tagger, tagger.scores(rgb), None)

            print(row(f"{label}, decode incl.", timed(ram_tags, args.runs)))


if __name__ == "__main__":
    main()
