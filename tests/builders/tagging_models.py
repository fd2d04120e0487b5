"""A tiny random-weight tagger in the RAM++ export layout (see ai_service/models/tagging/ram.py), built with
onnx.helper: image -> global average pool -> linear -> one logit per tag. Its tags mean nothing; it exercises
the layout, the preprocessing, the per-tag thresholds and the plumbing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

TAGS = [("cat", "猫"), ("dog", "狗"), ("beach", "海滩"), ("food", "食物"), ("night", "夜晚"), ("mountain", "山")]


def build_ram_tagger(model_dir: Path, name: str = "test-ram-tiny", *, size: int = 32, seed: int = 0) -> Path:
    """Writes ``<model_dir>/tagging/<name>/`` and returns that folder. Weights are large enough that the
    image's mean colour moves the logits across the thresholds (0.5 for every tag but 'night', 0.9)."""
    rng = np.random.default_rng(seed)
    count = len(TAGS)
    weight = numpy_helper.from_array(rng.normal(0, 3, (3, count)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.normal(0, 0.5, (count,)).astype(np.float32), "b")
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-ram",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", count])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder = model_dir / "tagging" / name
    (folder / "visual").mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "visual" / "model.onnx"))
    (folder / "ram_tag_list.txt").write_text("".join(f"{en}\n" for en, _ in TAGS), encoding="utf-8")
    (folder / "ram_tag_list_chinese.txt").write_text("".join(f"{zh}\n" for _, zh in TAGS), encoding="utf-8")
    thresholds = [0.9 if en == "night" else 0.5 for en, _ in TAGS]
    (folder / "ram_tag_list_threshold.txt").write_text("".join(f"{t}\n" for t in thresholds), encoding="utf-8")
    (folder / "config.json").write_text(json.dumps({"image_size": size, "output": "logits"}), encoding="utf-8")
    return folder
