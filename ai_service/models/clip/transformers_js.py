"""Chinese-CLIP without torch: install ``<arch>__cn-clip`` from an ONNX export made for transformers.js.

The ``Xenova/chinese-clip-vit-*`` repositories (and any export made the same way: optimum's
``ChineseCLIPOnnxConfig``, which transformers.js' conversion script drives) hold::

    onnx/model.onnx              one graph for both towers: input_ids, attention_mask (int64) and
                                 pixel_values (float32) -> logits_per_image, logits_per_text,
                                 text_embeds, image_embeds (both L2-normalised)
    onnx/model_fp16.onnx, onnx/model_quantized.onnx    the same graph in half precision / 8-bit weights
    config.json                  transformers' ChineseCLIPConfig (projection_dim, vision_config, ...)
    preprocessor_config.json     image size, mean/std, resampling
    vocab.txt, tokenizer.json, tokenizer_config.json   the BERT tokenizer

Only the chosen variant's graph and the small files are downloaded. The graph is cut into the two
towers with ``onnx.utils.Extractor`` (no torch, no weights copied through protobuf's 2 GB limit:
the weights are moved to a side file first and each tower takes back only its own), and written in
Immich's layout (see ``family.py``), shaped like ``models export-cn-clip``'s output so that the
existing loaders (and immich-machine-learning) serve it unchanged:

* ``textual/model.onnx`` takes one int32 ``text`` [batch, tokens] input, as Immich feeds it; nodes
  added in front derive ``input_ids``, ``attention_mask`` (token != [PAD], which is what BERT's
  tokenizer returns for cn-clip's queries) and, if the graph has it, ``token_type_ids`` (zeros).
* ``visual/model.onnx`` takes ``image`` [batch, 3, S, S] float32.
* Both output float32 ``embedding`` [batch, D]; half-precision graphs get Casts at both ends.
* ``visual/preprocess_cfg.json``: resize straight to S x S (``squash``, Chinese-CLIP's training
  transform and the ``do_center_crop: false`` of its image processor), mean/std and resampling
  from ``preprocessor_config.json`` (OpenAI's statistics and bicubic when absent).
* ``textual/tokenizer.json``: the service's cn-clip BERT WordPiece tokenizer over the repository's
  ``vocab.txt`` (or the vocabulary inside its ``tokenizer.json``), context length 52.

The result is loaded through the service's own CLIP loaders before it is installed, and installed
atomically through :meth:`ModelStore.install`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ai_service.models.clip.catalog import CN_CLIP_CONTEXT_LENGTH, CN_CLIP_MEAN, CN_CLIP_STD, cn_clip_arch
from ai_service.models.clip.common import read_json
from ai_service.models.clip.family import ClipFamily
from ai_service.models.clip.preprocess import PreprocessConfig
from ai_service.models.clip.textual import (
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    VOCAB_FILE,
    ClipTextualEncoder,
    bert_tokenizer_config,
    bert_wordpiece_tokenizer,
    read_vocab,
)
from ai_service.models.clip.visual import PREPROCESS_FILE, ClipVisualEncoder
from ai_service.models.store import ModelPullError, ModelStore, download_snapshot
from ai_service.protocol.immich import ModelTask
from ai_service.runtime.onnx import SessionOptions
from ai_service.settings import AIServiceSettings

log = logging.getLogger(__name__)

Variant = Literal["fp32", "fp16", "quantized"]
# transformers.js' file names: onnx/<stem>.onnx, with external weights (if any) next to it.
VARIANT_STEMS: dict[str, str] = {"fp32": "model", "fp16": "model_fp16", "quantized": "model_quantized"}
SMALL_FILES = [
    "config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
]
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
IMAGE_INPUT = "pixel_values"
TEXT_OUTPUT, IMAGE_OUTPUT = "text_embeds", "image_embeds"
# protobuf cannot hold more than 2 GiB: a tower whose weights pass this goes out with one side file.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
EXTERNAL_DATA_FILE = "model.onnx_data"
# transformers' PILImageResampling values, as preprocessor_config.json's "resample" holds them.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box"}


class ConversionError(ModelPullError):
    """The repository is not a Chinese-CLIP transformers.js export this converter understands."""


@dataclass(frozen=True)
class TransformersJsSource:
    repo_id: str
    variant: Variant = "fp32"

    @property
    def graph_path(self) -> str:
        return f"onnx/{VARIANT_STEMS[self.variant]}.onnx"

    def allow_patterns(self) -> list[str]:
        # The graph, its external weights under either spelling, and the small files: never the other variants.
        return [self.graph_path, f"{self.graph_path}_data*", f"{self.graph_path}.data", *SMALL_FILES]


def pull_transformers_js(
    store: ModelStore,
    name: str,
    source: TransformersJsSource,
    *,
    endpoint: str,
    token: str | None = None,
    revision: str | None = None,
) -> Path:
    """Download ``source`` from ``endpoint``, convert it and install it as ``<root>/clip/<name>``.

    Everything happens in ``store.staging`` (download, conversion, the check that the loaders accept
    it), so an interrupted or failed pull installs nothing and keeps an existing copy."""
    target = store.model_dir(ModelTask.CLIP, name)
    with store.staging(ModelTask.CLIP, name) as staging:
        files = download_snapshot(
            source.repo_id,
            staging,
            endpoint=endpoint,
            token=token,
            revision=revision,
            allow_patterns=source.allow_patterns(),
            target=target,
            repo_setting="AI_SERVICE_CN_CLIP_REPOS",
        )
        staged = ModelStore(staging / "store")
        folder = staged.model_dir(ModelTask.CLIP, name)
        what = f"{endpoint.rstrip('/')}/{source.repo_id} ({source.graph_path})"
        started = time.monotonic()
        log.info("converting %s into %s's image and text encoders", what, name)
        convert_transformers_js(files, folder, name=name, source=source, scratch=staging / "scratch", what=what)
        check_loads(staged, name)
        log.info("converted %s in %.1f s", what, time.monotonic() - started)
        return store.install(ModelTask.CLIP, name, folder)


def convert_transformers_js(
    files: Path, folder: Path, *, name: str, source: TransformersJsSource, scratch: Path, what: str
) -> None:
    """Write Immich's layout for ``name`` in ``folder`` from a downloaded repository in ``files``."""
    graph = files / source.graph_path
    if not graph.is_file():
        raise ConversionError(
            f"{what}: the repository has no {source.graph_path}; choose another AI_SERVICE_CN_CLIP_VARIANT"
        )
    hf_config = read_json(files / "config.json", what, ConversionError)
    embed_dim, vision, text = _model_facts(hf_config, what)
    arch = cn_clip_arch(name)
    if arch is not None and embed_dim != arch.embed_dim:
        raise ConversionError(
            f"{what} gives {embed_dim}-d vectors but {name} is {arch.embed_dim}-d (the size Immich's database "
            "expects for it); point AI_SERVICE_CN_CLIP_REPOS at an export of that model"
        )
    vocab = _vocabulary(files, what)
    image_size = int(vision.get("image_size") or (arch.image_size if arch else 224))

    (folder / "textual").mkdir(parents=True, exist_ok=True)
    (folder / "visual").mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    split_combined_graph(
        graph, folder / "textual" / "model.onnx", folder / "visual" / "model.onnx",
        scratch=scratch, pad_id=vocab["[PAD]"], image_size=image_size, what=what,
    )  # fmt: skip
    # The towers hold everything now: free the disk (up to twice the graph's size) before the load check.
    shutil.rmtree(scratch, ignore_errors=True)
    for leftover in graph.parent.glob(f"{graph.name}*"):
        leftover.unlink()
    _write_json(folder / "config.json", _layout_config(embed_dim, vision, text, image_size, source, arch, len(vocab)))
    processor_file = files / "preprocessor_config.json"
    processor = read_json(processor_file, what, ConversionError) if processor_file.is_file() else {}
    _write_json(folder / "visual" / PREPROCESS_FILE, preprocess_config(processor, image_size).to_dict())
    textual = folder / "textual"
    bert_wordpiece_tokenizer(vocab, CN_CLIP_CONTEXT_LENGTH).save(str(textual / TOKENIZER_FILE))
    _write_json(textual / TOKENIZER_CONFIG_FILE, bert_tokenizer_config(CN_CLIP_CONTEXT_LENGTH))
    if (files / VOCAB_FILE).is_file():
        shutil.copyfile(files / VOCAB_FILE, textual / VOCAB_FILE)
    else:  # line number = id; ids the vocabulary skips get placeholders so the lines stay aligned
        by_id = {index: token for token, index in vocab.items()}
        lines = (by_id.get(i, f"[unused-{i}]") for i in range(max(by_id) + 1))
        (textual / VOCAB_FILE).write_text("".join(f"{token}\n" for token in lines), encoding="utf-8")


def check_loads(store: ModelStore, name: str) -> None:
    """Load both towers through the service's CLIP loaders (on the CPU) and run each once."""
    options = SessionOptions(providers=("CPUExecutionProvider",))
    family = ClipFamily(store, options, AIServiceSettings(model_dir=store.root))
    try:
        visual = family.load(name, "visual")
        textual = family.load(name, "textual")
        assert isinstance(visual, ClipVisualEncoder) and isinstance(textual, ClipTextualEncoder)
        textual.encode_text("一张照片 a photo")
        visual.encode_image(np.full((32, 48, 3), 128, np.uint8))
    except Exception as exc:  # a load or run failure of the converted graphs, whatever ONNX Runtime raised
        raise ConversionError(f"the converted {name} does not load or run: {exc}") from exc
    if visual.embedding_size != textual.embedding_size:
        raise ConversionError(
            f"the converted {name} gives {visual.embedding_size}-d image and {textual.embedding_size}-d text vectors"
        )


# ---- the graph -------------------------------------------------------------------------------------------


def split_combined_graph(
    graph: Path, textual: Path, visual: Path, *, scratch: Path, pad_id: int, image_size: int, what: str
) -> None:
    """Cut transformers.js' combined Chinese-CLIP graph into the text and image towers."""
    import onnx
    from onnx.utils import Extractor

    try:
        model, weights_dir = _without_weights(graph, scratch)
    except Exception as exc:  # protobuf / onnx raise several types for a broken file
        raise ConversionError(f"{what} is not a readable ONNX model ({exc})") from exc
    inputs = {i.name: i for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    missing = [n for n in ("input_ids", IMAGE_INPUT) if n not in inputs] + [
        n for n in (TEXT_OUTPUT, IMAGE_OUTPUT) if n not in outputs
    ]
    if missing:
        raise ConversionError(
            f"{what} is not a combined CLIP graph: it lacks {', '.join(missing)} (inputs: {sorted(inputs)}, "
            f"outputs: {sorted(outputs)})"
        )
    extractor = Extractor(model)
    text_inputs = [n for n in TEXT_INPUTS if n in inputs]
    try:
        text_model = extractor.extract_model(text_inputs, [TEXT_OUTPUT])
        image_model = extractor.extract_model([IMAGE_INPUT], [IMAGE_OUTPUT])
    except Exception as exc:
        raise ConversionError(f"{what}: cannot separate the text and image towers ({exc})") from exc
    del extractor, model
    _text_tower_io(text_model, pad_id)
    _save(onnx, text_model, textual, weights_dir)
    del text_model
    _image_tower_io(image_model, image_size)
    _save(onnx, image_model, visual, weights_dir)


def _without_weights(graph: Path, scratch: Path) -> tuple[Any, Path]:
    """The graph with its weights as external-data references, and the folder those are relative to.

    A single-file graph (weights inline) is re-saved with its weights in one side file, which also
    empties them from the in-memory model; the towers later load back only the weights they use."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(graph), load_external_data=False)
    if any(uses_external_data(t) for t in model.graph.initializer):
        return model, graph.parent
    onnx.save_model(
        model,
        str(scratch / "combined.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="combined.onnx_data",
        size_threshold=1024,
        convert_attribute=True,  # large Constant nodes too
    )
    return model, scratch


def _text_tower_io(model: Any, pad_id: int) -> None:
    """One int32 ``text`` input in front; ``embedding`` float32 out."""
    from onnx import TensorProto, helper

    graph = model.graph
    original = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    nodes = [helper.make_node("Cast", ["text"], ["input_ids"], to=original["input_ids"])]
    if "attention_mask" in original:
        pad = helper.make_tensor("cn_clip_pad_id", TensorProto.INT32, [], [pad_id])
        nodes += [
            helper.make_node("Constant", [], ["cn_clip_pad_id"], value=pad),
            helper.make_node("Equal", ["text", "cn_clip_pad_id"], ["cn_clip_is_pad"]),
            helper.make_node("Not", ["cn_clip_is_pad"], ["cn_clip_is_token"]),
            helper.make_node("Cast", ["cn_clip_is_token"], ["attention_mask"], to=original["attention_mask"]),
        ]
    if "token_type_ids" in original:
        nodes += [
            helper.make_node("Sub", ["text", "text"], ["cn_clip_zeros"]),
            helper.make_node("Cast", ["cn_clip_zeros"], ["token_type_ids"], to=original["token_type_ids"]),
        ]
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *body])
    del graph.input[:]
    graph.input.append(helper.make_tensor_value_info("text", TensorProto.INT32, ["batch", "tokens"]))
    _float32_output(graph, TEXT_OUTPUT)


def _image_tower_io(model: Any, image_size: int) -> None:
    """``image`` float32 [batch, 3, S, S] in (cast for a half-precision graph); ``embedding`` float32 out."""
    from onnx import TensorProto, helper

    graph = model.graph
    dtype = next(i.type.tensor_type.elem_type for i in graph.input if i.name == IMAGE_INPUT)
    cast = (
        helper.make_node("Cast", ["image"], [IMAGE_INPUT], to=dtype)
        if dtype != TensorProto.FLOAT
        else helper.make_node("Identity", ["image"], [IMAGE_INPUT])
    )
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend([cast, *body])
    del graph.input[:]
    graph.input.append(
        helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, image_size, image_size])
    )
    _float32_output(graph, IMAGE_OUTPUT)


def _float32_output(graph: Any, name: str) -> None:
    from onnx import TensorProto, helper

    tensor = next(o.type.tensor_type for o in graph.output if o.name == name)
    if tensor.elem_type == TensorProto.FLOAT:
        graph.node.append(helper.make_node("Identity", [name], ["embedding"]))
    else:
        graph.node.append(helper.make_node("Cast", [name], ["embedding"], to=TensorProto.FLOAT))
    # The vector size stays in the declared shape, so the loaders read it without running the graph.
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    shape = ["batch", *dims[1:]] if len(dims) == 2 else ["batch", None]
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("embedding", TensorProto.FLOAT, shape))


def _save(onnx: Any, model: Any, path: Path, weights_dir: Path) -> None:
    """Take back this tower's weights and write it as one file, or with one side file over ~2 GB."""
    from onnx.external_data_helper import load_external_data_for_model

    load_external_data_for_model(model, str(weights_dir))
    constants = (a.t for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR)
    weight_bytes = sum(len(t.raw_data) for t in (*model.graph.initializer, *constants))
    path.parent.mkdir(parents=True, exist_ok=True)
    if weight_bytes > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=EXTERNAL_DATA_FILE,
            convert_attribute=True,
        )
    else:
        onnx.save_model(model, str(path))
    # No onnx.checker pass here: check_loads has ONNX Runtime load and run both towers, which checks more
    # and costs less (the checker re-reads and re-parses the whole file, ~1 s per tower for ViT-B-16).


# ---- the small files ------------------------------------------------------------------------------------


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _model_facts(config: dict[str, Any], what: str) -> tuple[int, dict[str, Any], dict[str, Any]]:
    """(projection size, vision_config, text_config) of a transformers ChineseCLIPConfig."""
    model_type = config.get("model_type")
    if model_type not in (None, "chinese_clip"):
        raise ConversionError(f"{what}: config.json is a {model_type!r} model, not chinese_clip")
    embed_dim = config.get("projection_dim", 512)  # transformers' default when the file leaves it out
    vision = config.get("vision_config") or {}
    text = config.get("text_config") or {}
    if not isinstance(embed_dim, int) or embed_dim <= 0 or not isinstance(vision, dict) or not isinstance(text, dict):
        raise ConversionError(f"{what}: config.json has no usable projection_dim / vision_config / text_config")
    return embed_dim, vision, text


def _vocabulary(files: Path, what: str) -> dict[str, int]:
    """vocab.txt, else the WordPiece vocabulary inside tokenizer.json."""
    vocab_file = files / VOCAB_FILE
    if vocab_file.is_file():
        vocab = read_vocab(vocab_file)
    else:
        tokenizer = read_json(files / TOKENIZER_FILE, what, ConversionError)
        model = tokenizer.get("model") or {}
        vocab = model.get("vocab") if isinstance(model, dict) and model.get("type") == "WordPiece" else None
        if not isinstance(vocab, dict):
            raise ConversionError(f"{what}: neither vocab.txt nor a WordPiece tokenizer.json to tokenise with")
    missing = [t for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]") if t not in vocab]
    if missing:
        raise ConversionError(f"{what}: the vocabulary lacks the BERT special tokens {missing}")
    return vocab


def preprocess_config(processor: dict[str, Any], image_size: int) -> PreprocessConfig:
    """Chinese-CLIP's image transform: resize straight to the square; statistics from the processor file."""
    resample = processor.get("resample", 3)
    return PreprocessConfig(
        size=image_size,
        mean=tuple(processor.get("image_mean") or CN_CLIP_MEAN),  # type: ignore[arg-type]
        std=tuple(processor.get("image_std") or CN_CLIP_STD),  # type: ignore[arg-type]
        interpolation=_RESAMPLE.get(resample, "bicubic") if isinstance(resample, int) else "bicubic",
        resize_mode="squash",
    )


def _layout_config(
    embed_dim: int,
    vision: dict[str, Any],
    text: dict[str, Any],
    image_size: int,
    source: TransformersJsSource,
    arch: Any,
    vocab_size: int,
) -> dict[str, Any]:
    """``config.json`` in the shape ``export_cn_clip.build_config`` writes (OpenCLIP's keys + provenance)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "patch_size": vision.get("patch_size"),
            "width": vision.get("hidden_size"),
            "layers": vision.get("num_hidden_layers"),
        },
        "text_cfg": {
            "context_length": CN_CLIP_CONTEXT_LENGTH,
            "vocab_size": vocab_size,
            "tokenizer": "bert-wordpiece",
            "width": text.get("hidden_size"),
            "heads": text.get("num_attention_heads"),
            "layers": text.get("num_hidden_layers"),
        },
        "source": {
            "family": "cn-clip",
            "arch": arch.arch if arch is not None else None,
            "project": "https://github.com/OFA-Sys/Chinese-CLIP",
            "repository": source.repo_id,
            "file": source.graph_path,
            "variant": source.variant,
            "converter": __name__,
            "normalized_output": True,
            "text_input_dtype": "int32",
        },
    }
