"""Face models built with ``onnx.helper``: SCRFD- and ArcFace-shaped, never meaningful.

They have the input/output names, shapes and layouts of InsightFace's ``det_10g`` / ``w600k_r50``
(``input.1`` -> nine score/box/landmark heads; ``input.1`` N x 3 x 112 x 112 -> N x 512), so the
service's real loading, decoding, alignment and batching code runs on them. Their outputs are random
or planted constants: they exercise plumbing, and must never be presented as face recognition.

* :func:`scrfd_random_model`: per stride, average-pool + 1x1 conv heads on a dynamic input, laid out
  like the real heads (N x C x H x W -> NHWC -> rows x k, anchors innermost).
* :func:`scrfd_planted_model`: a fixed 640x640 input whose heads are constants built from
  :class:`PlantedFace` records, so a test knows exactly which boxes must come out.
* :func:`arcface_random_model`, :func:`arcface_probe_model` (outputs 512 chosen input values, to
  check preprocessing), :func:`decoy_model` (a non-face model found in InsightFace packs).
* :func:`write_immich_pack`, :func:`write_insightface_pack`: the two on-disk layouts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
STRIDES = (8, 16, 32)
NUM_ANCHORS = 2
INPUT = "input.1"
# det_10g's output names, grouped by kind then stride (scores 8/16/32, boxes, landmarks).
DET_10G_OUTPUTS = ("448", "471", "494", "451", "474", "497", "454", "477", "500")
KIND_COLUMNS = {"score": 1, "bbox": 4, "kps": 10}
OutputOrder = Literal["kind", "stride"]

TEST_SCRFD_NAME = "test-scrfd-tiny"


def _model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto],
    name: str,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="immich-zh-ai-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def _output_names(order: OutputOrder, with_kps: bool) -> list[tuple[str, int, str]]:
    """(kind, stride, output name) in the file's output order."""
    kinds = ["score", "bbox", "kps"] if with_kps else ["score", "bbox"]
    if order == "kind":
        names = iter(DET_10G_OUTPUTS)
        return [(k, s, next(names)) for k in kinds for s in STRIDES]
    return [(k, s, f"{k}_{s}") for s in STRIDES for k in kinds]


# ---- SCRFD ------------------------------------------------------------------------------------------


def scrfd_random_model(
    seed: int = 0,
    *,
    order: OutputOrder = "kind",
    batched: bool = False,
    with_kps: bool = True,
    input_size: int | None = None,
) -> onnx.ModelProto:
    """Random-weight SCRFD-shaped detector. ``input_size`` None: dynamic H x W, as ``det_10g``."""
    rng = np.random.default_rng(seed)
    hw: list[int | str] = [input_size, input_size] if input_size else ["height", "width"]
    inputs = [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [1, 3, *hw])]
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    outputs: list[onnx.ValueInfoProto] = []
    shape_name = "rows_shape_b" if batched else "rows_shape"
    for kind, stride, name in _output_names(order, with_kps):
        cols = KIND_COLUMNS[kind]
        pooled = f"pool_{stride}_{kind}"
        nodes.append(
            helper.make_node("AveragePool", [INPUT], [pooled], kernel_shape=[stride, stride], strides=[stride, stride])
        )
        weight = rng.normal(0, 0.5, (NUM_ANCHORS * cols, 3, 1, 1)).astype(np.float32)
        bias = rng.normal(-1.0, 0.5, NUM_ANCHORS * cols) if kind == "score" else rng.uniform(0.5, 3, NUM_ANCHORS * cols)
        inits += [_const(f"w_{name}", weight), _const(f"b_{name}", bias.astype(np.float32))]
        conv = f"conv_{name}"
        nodes.append(helper.make_node("Conv", [pooled, f"w_{name}", f"b_{name}"], [conv]))
        if kind == "score":
            nodes.append(helper.make_node("Sigmoid", [conv], [f"{conv}_sig"]))
            conv = f"{conv}_sig"
        nodes.append(helper.make_node("Transpose", [conv], [f"{conv}_nhwc"], perm=[0, 2, 3, 1]))
        inits.append(_const(f"{shape_name}_{name}", np.array([1, -1, cols] if batched else [-1, cols], np.int64)))
        nodes.append(helper.make_node("Reshape", [f"{conv}_nhwc", f"{shape_name}_{name}"], [name]))
        outputs.append(
            helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, None, cols] if batched else [None, cols])
        )
    return _model(nodes, inputs, outputs, inits, "test_scrfd_random")


@dataclass(frozen=True)
class PlantedFace:
    """One anchor the planted model fires on. Distances are in strides, as SCRFD heads output them."""

    stride: int
    x: int  # grid column
    y: int  # grid row
    score: float
    distances: tuple[float, float, float, float]  # left, top, right, bottom
    kps: tuple[float, ...] = field(default=(-1.0, -1.0, 1.0, -1.0, 0.0, 0.0, -0.8, 1.0, 0.8, 1.0))
    anchor: int = 0

    def row(self, input_size: int = 640) -> int:
        return (self.y * (input_size // self.stride) + self.x) * NUM_ANCHORS + self.anchor

    def center(self) -> np.ndarray:
        return np.array([self.x * self.stride, self.y * self.stride], np.float64)

    def box(self) -> np.ndarray:
        """x1, y1, x2, y2 in the 640x640 letterboxed input."""
        c = self.center()
        d = np.asarray(self.distances, np.float64) * self.stride
        return np.array([c[0] - d[0], c[1] - d[1], c[0] + d[2], c[1] + d[3]])

    def landmarks(self) -> np.ndarray:
        """5 x 2 in the 640x640 letterboxed input."""
        return self.center() + np.asarray(self.kps, np.float64).reshape(5, 2) * self.stride


def planted_heads(
    faces: Iterable[PlantedFace], background: float = 0.01, input_size: int = 640
) -> dict[tuple[str, int], np.ndarray]:
    """Head arrays (rows x 1/4/10) where only the planted anchors score above ``background``."""
    heads: dict[tuple[str, int], np.ndarray] = {}
    for stride in STRIDES:
        rows = (input_size // stride) ** 2 * NUM_ANCHORS
        heads["score", stride] = np.full((rows, 1), background, np.float32)
        heads["bbox", stride] = np.ones((rows, 4), np.float32)
        heads["kps", stride] = np.zeros((rows, 10), np.float32)
    for face in faces:
        r = face.row(input_size)
        heads["score", face.stride][r] = face.score
        heads["bbox", face.stride][r] = face.distances
        heads["kps", face.stride][r] = face.kps
    return heads


def scrfd_planted_model(
    faces: Sequence[PlantedFace], *, order: OutputOrder = "kind", batched: bool = False, background: float = 0.01
) -> onnx.ModelProto:
    """Fixed 640x640 input; each head = its planted constant + 0 * mean(input) (so the input is used)."""
    heads = planted_heads(faces, background)
    inputs = [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [1, 3, 640, 640])]
    nodes = [
        helper.make_node("ReduceMean", [INPUT], ["input_mean"], keepdims=0),
        helper.make_node("Mul", ["input_mean", "zero"], ["input_zero"]),
    ]
    inits = [_const("zero", np.array(0.0, np.float32))]
    outputs: list[onnx.ValueInfoProto] = []
    for kind, stride, name in _output_names(order, with_kps=True):
        array = heads[kind, stride]
        if batched:
            array = array[None]
        inits.append(_const(f"const_{name}", array))
        nodes.append(helper.make_node("Add", [f"const_{name}", "input_zero"], [name]))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(array.shape)))
    return _model(nodes, inputs, outputs, inits, "test_scrfd_planted")


# ---- ArcFace ------------------------------------------------------------------------------------------


def arcface_random_model(
    seed: int = 0, *, batch: int | None = None, weights_as_inputs: bool = False, embedding_size: int = 512
) -> onnx.ModelProto:
    """N x 3 x 112 x 112 -> N x 512 (8x8 average pool, then a random projection).

    ``batch``: None for a dynamic batch axis (as Immich's re-exported models), an int for a fixed one.
    ``weights_as_inputs``: also list the weights as graph inputs, as old-IR InsightFace exports do."""
    rng = np.random.default_rng(seed)
    n: int | str = batch if batch is not None else "None"
    inputs = [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [n, 3, 112, 112])]
    weight = rng.normal(0, 1 / np.sqrt(588), (588, embedding_size)).astype(np.float32)
    bias = rng.normal(0, 0.01, embedding_size).astype(np.float32)
    inits = [_const("fc_w", weight), _const("fc_b", bias)]
    if weights_as_inputs:
        inputs += [
            helper.make_tensor_value_info("fc_w", TensorProto.FLOAT, list(weight.shape)),
            helper.make_tensor_value_info("fc_b", TensorProto.FLOAT, list(bias.shape)),
        ]
    nodes = [
        helper.make_node("AveragePool", [INPUT], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "fc_w"], ["proj"]),
        helper.make_node("Add", ["proj", "fc_b"], ["683"]),
    ]
    outputs = [helper.make_tensor_value_info("683", TensorProto.FLOAT, [n, embedding_size])]
    return _model(nodes, inputs, outputs, inits, "test_arcface_random")


def probe_indices(count: int = 512) -> np.ndarray:
    """Which flattened 3 x 112 x 112 input values :func:`arcface_probe_model` outputs (all channels)."""
    return np.linspace(0, 3 * 112 * 112 - 1, count).round().astype(np.int64)


def arcface_probe_model(batch: int | None = None) -> onnx.ModelProto:
    """Outputs the input blob's values at :func:`probe_indices`: the preprocessing made visible."""
    n: int | str = batch if batch is not None else "None"
    inputs = [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [n, 3, 112, 112])]
    nodes = [
        helper.make_node("Flatten", [INPUT], ["flat"], axis=1),
        helper.make_node("Gather", ["flat", "idx"], ["683"], axis=1),
    ]
    outputs = [helper.make_tensor_value_info("683", TensorProto.FLOAT, [n, 512])]
    return _model(nodes, inputs, outputs, [_const("idx", probe_indices())], "test_arcface_probe")


def decoy_model(side: int = 96, outputs: int = 3) -> onnx.ModelProto:
    """A non-face-recognition model as found in InsightFace packs (genderage: 96 -> 3; 2d106det: 192 -> 212)."""
    pool = side // 8
    feats = 3 * 8 * 8
    inputs = [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, side, side])]
    nodes = [
        helper.make_node("AveragePool", ["data"], ["pooled"], kernel_shape=[pool, pool], strides=[pool, pool]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["fc1"]),
    ]
    w = np.full((feats, outputs), 0.01, np.float32)
    return _model(
        nodes,
        inputs,
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, outputs])],
        [_const("w", w)],
        "test_decoy",
    )


# ---- layouts --------------------------------------------------------------------------------------------


def write_immich_pack(
    model_dir: Path,
    name: str = TEST_SCRFD_NAME,
    detection: onnx.ModelProto | None = None,
    recognition: onnx.ModelProto | None = None,
) -> Path:
    """``<model_dir>/facial-recognition/<name>/{detection,recognition}/model.onnx``; returns the pack folder."""
    pack = Path(model_dir) / "facial-recognition" / name
    for component, model in (("detection", detection), ("recognition", recognition)):
        if model is not None:
            (pack / component).mkdir(parents=True, exist_ok=True)
            onnx.save(model, pack / component / "model.onnx")
    return pack


def write_insightface_pack(folder: Path, name: str, files: dict[str, onnx.ModelProto]) -> Path:
    """``<folder>/<name>/<file>.onnx`` for each entry, as InsightFace unpacks its model zips."""
    pack = Path(folder) / name
    pack.mkdir(parents=True, exist_ok=True)
    for filename, model in files.items():
        onnx.save(model, pack / filename)
    return pack


# ---- full-size-shaped models (benchmarks only) ----------------------------------------------------------


class _GraphBuilder:
    """Just enough to write conv nets with random weights and count their multiply-adds."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.macs = 0
        self._n = 0

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def conv(
        self, x: str, cin: int, cout: int, hw: int, *, k: int = 3, stride: int = 1, relu: bool = True, bias: float = 0.0
    ) -> str:
        """``hw``: output side length (for the multiply-add count)."""
        w, b, out = self.name("w"), self.name("b"), self.name("conv")
        # He initialisation, halved: activations stay O(1) through deep stacks (no inf, no denormals).
        std = 0.5 * np.sqrt(2.0 / (cin * k * k))
        self.inits += [
            _const(w, self.rng.normal(0, std, (cout, cin, k, k)).astype(np.float32)),
            _const(b, np.full(cout, bias, np.float32)),
        ]
        pad = k // 2
        self.nodes.append(
            helper.make_node("Conv", [x, w, b], [out], kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)
        )
        self.macs += cin * cout * k * k * hw * hw
        if relu:
            self.nodes.append(helper.make_node("Relu", [out], [out + "_r"]))
            out += "_r"
        return out

    def add(self, a: str, b: str) -> str:
        out = self.name("add")
        self.nodes.append(helper.make_node("Add", [a, b], [out]))
        return out


def scrfd_fullsize_model(seed: int = 0) -> tuple[onnx.ModelProto, float]:
    """A random conv net with ``det_10g``'s interface and roughly its compute (~8 GMAC at 640x640).

    The real SCRFD-10G is a different (searched) architecture; this only makes ONNX Runtime do a
    comparable amount of convolution work so the decode/NMS/letterbox overheads are seen in context.
    Returns the model and its multiply-adds at 640x640, in GMAC."""
    g = _GraphBuilder(seed)
    x = g.conv(INPUT, 3, 32, 320, stride=2)
    x = g.conv(x, 32, 64, 160, stride=2)
    features: dict[int, tuple[str, int, int]] = {}
    for stride, cin, cout in ((8, 64, 96), (16, 96, 192), (32, 192, 384)):
        side = 640 // stride
        x = g.conv(x, cin, cout, side, stride=2)
        for _ in range(3):
            x = g.add(x, g.conv(x, cout, cout, side))
        features[stride] = (x, cout, side)
    outputs: list[onnx.ValueInfoProto] = []
    named = {(k, s): n for k, s, n in _output_names("kind", with_kps=True)}
    for stride, (feat, channels, side) in features.items():
        head = g.conv(feat, channels, 96, side)
        head = g.conv(head, 96, 96, side)
        for kind, cols in KIND_COLUMNS.items():
            out_name = named[kind, stride]
            # scores biased low: like a real detector, only a handful of anchors pass minScore
            bias = -6.0 if kind == "score" else 1.0
            raw = g.conv(head, 96, NUM_ANCHORS * cols, side, k=1, relu=False, bias=bias)
            if kind == "score":
                g.nodes.append(helper.make_node("Sigmoid", [raw], [raw + "_s"]))
                raw += "_s"
            g.nodes.append(helper.make_node("Transpose", [raw], [raw + "_t"], perm=[0, 2, 3, 1]))
            g.inits.append(_const(f"shape_{out_name}", np.array([-1, cols], np.int64)))
            g.nodes.append(helper.make_node("Reshape", [raw + "_t", f"shape_{out_name}"], [out_name]))
            outputs.append(helper.make_tensor_value_info(out_name, TensorProto.FLOAT, [None, cols]))
    inputs = [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [1, 3, "height", "width"])]
    return _model(g.nodes, inputs, outputs, g.inits, "bench_scrfd_fullsize"), g.macs / 1e9


def arcface_r50_shaped_model(seed: int = 0) -> tuple[onnx.ModelProto, float]:
    """IResNet-50's layout (stages of 3/4/14/3 basic blocks at 64/128/256/512 channels, 25088 -> 512
    FC, ~43 M parameters, ~6.3 GMAC per face) with random weights, batch axis dynamic, as
    ``w600k_r50``. BatchNorm/PReLU are left out: they fold into the convs at inference time anyway.
    Returns the model and its multiply-adds per face, in GMAC."""
    g = _GraphBuilder(seed)
    x = g.conv(INPUT, 3, 64, 112)
    cin, side = 64, 112
    for cout, blocks in ((64, 3), (128, 4), (256, 14), (512, 3)):
        for i in range(blocks):
            stride = 2 if i == 0 else 1
            out_side = side // stride
            y = g.conv(x, cin, cout, side)
            y = g.conv(y, cout, cout, out_side, stride=stride, relu=False)
            shortcut = (
                x if stride == 1 and cin == cout else g.conv(x, cin, cout, out_side, k=1, stride=stride, relu=False)
            )
            x = g.add(y, shortcut)
            cin, side = cout, out_side
    g.nodes.append(helper.make_node("Flatten", [x], ["flat"], axis=1))
    fc = g.rng.normal(0, 1 / np.sqrt(512 * 7 * 7), (512 * 7 * 7, 512)).astype(np.float32)
    g.inits.append(_const("fc_w", fc))
    g.macs += fc.size
    g.nodes.append(helper.make_node("MatMul", ["flat", "fc_w"], ["683"]))
    inputs = [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["None", 3, 112, 112])]
    outputs = [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", 512])]
    return _model(g.nodes, inputs, outputs, g.inits, "bench_arcface_r50_shaped"), g.macs / 1e9
