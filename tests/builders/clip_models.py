"""CLIP models built with ``onnx.helper``, written in Immich's exact on-disk layout.

Weights are random: outputs have the right shapes, dtypes and determinism, never meaning. Tests use
them to exercise the real loading code; benchmarks use the full-size ViT-B/16-shaped encoder.

Layout written by :func:`build_clip_model` (``<model_dir>/clip/<name>/``)::

    config.json                 embed_dim, vision_cfg, text_cfg
    visual/model.onnx           image [batch, 3, S, S] float32 -> embedding [batch, E]
    visual/preprocess_cfg.json
    textual/model.onnx          text [batch, ctx] (int32/int64)  or  input_ids + attention_mask
    textual/tokenizer.json, textual/tokenizer_config.json  (or only textual/vocab.txt)
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.implementations import BertWordPieceTokenizer
from tokenizers.models import WordLevel
from tokenizers.processors import TemplateProcessing

TextKind = Literal["cn-clip", "openclip", "mclip"]
OPSET = 17  # LayerNormalization is an ONNX op from 17 on; ONNX Runtime fuses the Erf-GELU below
IR_VERSION = 8

# ---- vocabularies -----------------------------------------------------------------------------------

# A tiny cn-clip-style vocab.txt: the same special-token ids as cn-clip's 21128-token vocabulary
# ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103), then punctuation, Chinese characters and
# English wordpieces (with ## continuations).
_CN_TOKENS = (
    list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~，。！？、：；（）「」")
    + list("0123456789")
    + ["##0", "##1", "##2", "##5"]
    + list("一只猫狗在海滩上的照片小红花我爱北京天安门山水人大中国日月飞机")
    + ["a", "an", "the", "photo", "of", "dog", "cat", "on", "beach", "play", "##ing", "##s", "##ed"]
    + ["un", "##aff", "##able", "cafe", "hello", "world", "big", "red", "car"]
)
TINY_CN_VOCAB: list[str] = (
    ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + _CN_TOKENS
)

_WORDS = ["a", "photo", "of", "dog", "cat", "on", "the", "beach", "red", "car", "hello", "world", "big"]
# OpenCLIP-like: lower-cased words; start/end-of-text are the two highest ids, as in CLIP's BPE vocab.
TINY_OPENCLIP_VOCAB: list[str] = ["!", "<unk>", *_WORDS, ",", ".", "<|startoftext|>", "<|endoftext|>"]
# XLM-Roberta-like (M-CLIP): <s>=0, <pad>=1, </s>=2, <unk>=3.
TINY_MCLIP_VOCAB: list[str] = ["<s>", "<pad>", "</s>", "<unk>", *_WORDS, "猫", "狗", ",", "."]
NLLB_CODES = ("eng_Latn", "zho_Hans", "zho_Hant", "deu_Latn", "jpn_Hira")


def write_vocab(path: Path, tokens: Sequence[str] = TINY_CN_VOCAB) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{t}\n" for t in tokens), encoding="utf-8")
    return path


# ---- a small ONNX graph builder ---------------------------------------------------------------------


class _Graph:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def const(self, value: object, dtype: type | None = None) -> str:
        name = self._name("const")
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def random(self, shape: tuple[int, ...], std: float = 0.02) -> str:
        return self.const(self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std))

    def op(self, op_type: str, *inputs: str, output: str | None = None, **attrs: object) -> str:
        out = output or self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def layer_norm(self, x: str, width: int) -> str:
        gamma = self.const(np.ones(width, np.float32))
        beta = self.const(np.zeros(width, np.float32))
        return self.op("LayerNormalization", x, gamma, beta, axis=-1, epsilon=1e-5)

    def linear(self, x: str, d_in: int, d_out: int, bias: bool = True) -> str:
        y = self.op("MatMul", x, self.random((d_in, d_out), std=1.0 / math.sqrt(d_in)))
        return self.op("Add", y, self.const(np.zeros(d_out, np.float32))) if bias else y

    def gelu(self, x: str) -> str:
        # x * 0.5 * (1 + erf(x / sqrt 2)): the pattern torch exports and ONNX Runtime fuses into Gelu.
        scaled = self.op("Div", x, self.const(np.float32(math.sqrt(2.0))))
        inner = self.op("Add", self.op("Erf", scaled), self.const(np.float32(1.0)))
        return self.op("Mul", self.op("Mul", x, inner), self.const(np.float32(0.5)))

    def attention(self, x: str, width: int, heads: int, mask: str | None) -> str:
        head_dim = width // heads
        split = self.const(np.array([0, 0, heads, head_dim], np.int64))
        q = self.op("Transpose", self.op("Reshape", self.linear(x, width, width), split), perm=[0, 2, 1, 3])
        k = self.op("Transpose", self.op("Reshape", self.linear(x, width, width), split), perm=[0, 2, 3, 1])
        v = self.op("Transpose", self.op("Reshape", self.linear(x, width, width), split), perm=[0, 2, 1, 3])
        scores = self.op("Mul", self.op("MatMul", q, k), self.const(np.float32(1.0 / math.sqrt(head_dim))))
        if mask is not None:
            scores = self.op("Add", scores, mask)
        context = self.op("MatMul", self.op("Softmax", scores, axis=-1), v)
        merged = self.op(
            "Reshape",
            self.op("Transpose", context, perm=[0, 2, 1, 3]),
            self.const(np.array([0, 0, width], np.int64)),
        )
        return self.linear(merged, width, width)

    def block(self, x: str, width: int, heads: int, mlp: int, mask: str | None = None) -> str:
        x = self.op("Add", x, self.attention(self.layer_norm(x, width), width, heads, mask))
        hidden = self.gelu(self.linear(self.layer_norm(x, width), width, mlp))
        return self.op("Add", x, self.linear(hidden, mlp, width))

    def model(
        self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], name: str
    ) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tests.builders")
        model.ir_version = IR_VERSION
        return model


# ---- encoders -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionSpec:
    image_size: int = 32
    patch_size: int = 16
    width: int = 32
    layers: int = 1
    heads: int = 2
    mlp_dim: int = 64
    embed_dim: int = 16


@dataclass(frozen=True)
class TextSpec:
    kind: TextKind = "cn-clip"
    context_length: int = 52
    vocab_size: int = len(TINY_CN_VOCAB)
    width: int = 32
    layers: int = 1
    heads: int = 2
    mlp_dim: int = 64
    embed_dim: int = 16
    input_dtype: type = np.int64  # cn-clip's official export takes int64, Immich's exports int32
    pad_id: int = 0


def visual_graph(spec: VisionSpec, *, seed: int = 0, symbolic_output: bool = False) -> onnx.ModelProto:
    """A pre-LN ViT: patch conv, class token, positions, blocks, LN on the class token, projection."""
    g = _Graph(seed)
    size, patch, width = spec.image_size, spec.patch_size, spec.width
    grid = size // patch
    tokens = grid * grid + 1
    patches = g.op(
        "Conv",
        "image",
        g.random((width, 3, patch, patch), std=0.02),
        kernel_shape=[patch, patch],
        strides=[patch, patch],
    )
    flat = g.op("Transpose", g.op("Reshape", patches, g.const(np.array([0, width, -1], np.int64))), perm=[0, 2, 1])
    batch = g.op(
        "Slice",
        g.op("Shape", "image"),
        g.const(np.array([0], np.int64)),
        g.const(np.array([1], np.int64)),
    )
    cls_shape = g.op("Concat", batch, g.const(np.array([1, width], np.int64)), axis=0)
    cls = g.op("Expand", g.random((1, 1, width)), cls_shape)
    x = g.op("Add", g.op("Concat", cls, flat, axis=1), g.random((tokens, width)))
    x = g.layer_norm(x, width)
    for _ in range(spec.layers):
        x = g.block(x, width, spec.heads, spec.mlp_dim)
    pooled = g.layer_norm(g.op("Gather", x, g.const(np.int64(0)), axis=1), width)
    g.op("MatMul", pooled, g.random((width, spec.embed_dim), std=1.0 / math.sqrt(width)), output="embedding")
    out_dim: int | str = "dim" if symbolic_output else spec.embed_dim
    return g.model(
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", out_dim])],
        "clip_visual",
    )


def textual_graph(spec: TextSpec, *, seed: int = 1, symbolic_output: bool = False) -> onnx.ModelProto:
    """A text transformer. cn-clip: padding mask, [CLS] pooling (BERT); openclip: causal mask,
    pooling at the highest id (end of text); mclip: ``input_ids`` + ``attention_mask``, masked mean."""
    g = _Graph(seed)
    ctx, width = spec.context_length, spec.width
    elem = TensorProto.INT64 if spec.input_dtype == np.int64 else TensorProto.INT32
    ids = "input_ids" if spec.kind == "mclip" else "text"
    x = g.op("Add", g.op("Gather", g.random((spec.vocab_size, width)), ids), g.random((ctx, width)))
    x = g.layer_norm(x, width)
    if spec.kind == "openclip":
        mask = g.const(np.triu(np.full((ctx, ctx), -1e4, np.float32), k=1))
    else:
        if spec.kind == "mclip":
            keep = g.op("Cast", "attention_mask", to=TensorProto.FLOAT)
        else:
            pad = g.op("Equal", ids, g.const(np.array(spec.pad_id, dtype=spec.input_dtype)))
            keep = g.op("Sub", g.const(np.float32(1.0)), g.op("Cast", pad, to=TensorProto.FLOAT))
        additive = g.op("Mul", g.op("Sub", keep, g.const(np.float32(1.0))), g.const(np.float32(1e4)))
        mask = g.op("Unsqueeze", additive, g.const(np.array([1, 2], np.int64)))
    for _ in range(spec.layers):
        x = g.block(x, width, spec.heads, spec.mlp_dim, mask)
    x = g.layer_norm(x, width)
    if spec.kind == "cn-clip":
        pooled = g.op("Gather", x, g.const(np.int64(0)), axis=1)
    else:
        if spec.kind == "openclip":
            position = g.op("ArgMax", g.op("Cast", ids, to=TensorProto.FLOAT), axis=1, keepdims=0)
            weights = g.op(
                "OneHot", position, g.const(np.array(ctx, np.int64)), g.const(np.array([0.0, 1.0], np.float32)), axis=-1
            )
        else:
            total = g.op("ReduceSum", keep, g.const(np.array([1], np.int64)), keepdims=1)
            weights = g.op("Div", keep, total)
        picked = g.op("MatMul", g.op("Unsqueeze", weights, g.const(np.array([1], np.int64))), x)
        pooled = g.op("Reshape", picked, g.const(np.array([0, width], np.int64)))
    g.op("MatMul", pooled, g.random((width, spec.embed_dim), std=1.0 / math.sqrt(width)), output="embedding")
    inputs = [helper.make_tensor_value_info(ids, elem, ["batch", ctx])]
    if spec.kind == "mclip":
        inputs.append(helper.make_tensor_value_info("attention_mask", elem, ["batch", ctx]))
    out_dim: int | str = "dim" if symbolic_output else spec.embed_dim
    return g.model(
        inputs, [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", out_dim])], "clip_textual"
    )


# ---- tokenizers -----------------------------------------------------------------------------------


def _word_level_tokenizer(vocab: Sequence[str], bos: str, eos: str, lowercase: bool) -> Tokenizer:
    tokenizer = Tokenizer(WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    if lowercase:
        tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab.index(bos)), (eos, vocab.index(eos))]
    )
    return tokenizer


def _write_tokenizer(folder: Path, kind: TextKind, tokenizer_style: str, nllb: bool) -> None:
    if kind == "cn-clip":
        vocab_file = write_vocab(folder / "vocab.txt")
        if tokenizer_style == "vocab-only":  # cn-clip's official ONNX release ships no tokenizer.json
            return
        # What a Hugging Face BERT tokenizer.json looks like (tokenizers' BertWordPieceTokenizer).
        BertWordPieceTokenizer(str(vocab_file), lowercase=True).save(str(folder / "tokenizer.json"))
        config = {"tokenizer_class": "BertTokenizer", "pad_token": "[PAD]", "do_lower_case": True}
    elif kind == "openclip":
        vocab = list(TINY_OPENCLIP_VOCAB)
        tokenizer = _word_level_tokenizer(vocab, "<|startoftext|>", "<|endoftext|>", lowercase=True)
        if nllb:
            tokenizer.add_special_tokens(list(NLLB_CODES))
        tokenizer.save(str(folder / "tokenizer.json"))
        config = {"pad_token": "<|endoftext|>", "model_max_length": 77}
    else:
        tokenizer = _word_level_tokenizer(list(TINY_MCLIP_VOCAB), "<s>", "</s>", lowercase=False)
        tokenizer.save(str(folder / "tokenizer.json"))
        config = {"pad_token": {"content": "<pad>", "special": True}, "model_max_length": 512}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def text_vocab_size(kind: TextKind, nllb: bool = False) -> int:
    if kind == "cn-clip":
        return len(TINY_CN_VOCAB)
    if kind == "openclip":
        return len(TINY_OPENCLIP_VOCAB) + (len(NLLB_CODES) if nllb else 0)
    return len(TINY_MCLIP_VOCAB)


# ---- whole models -----------------------------------------------------------------------------------


def _save(model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))


def build_clip_model(
    model_dir: Path,
    name: str,
    *,
    kind: TextKind = "cn-clip",
    vision: VisionSpec | None = None,
    text: TextSpec | None = None,
    embed_dim: int = 16,
    config_embed_dim: int | None = None,
    preprocess: dict[str, object] | None = None,
    text_cfg_extra: dict[str, object] | None = None,
    tokenizer_style: str = "tokenizer.json",
    components: Sequence[str] = ("visual", "textual"),
    symbolic_output: bool = False,
    seed: int = 0,
) -> Path:
    """Write ``<model_dir>/clip/<name>/`` and return that folder.

    ``config_embed_dim`` writes a different ``embed_dim`` into config.json than the graphs output
    (to provoke the load-time check); ``tokenizer_style="vocab-only"`` leaves a cn-clip textual
    folder with just ``vocab.txt``."""
    folder = Path(model_dir) / "clip" / name
    nllb = name.startswith("nllb")
    vision = replace(vision or VisionSpec(), embed_dim=embed_dim)
    default_ctx = 52 if kind == "cn-clip" else 16
    text = text or TextSpec(
        kind=kind,
        context_length=default_ctx,
        vocab_size=text_vocab_size(kind, nllb),
        input_dtype=np.int64 if kind == "cn-clip" else np.int32,
        pad_id={"cn-clip": 0, "openclip": TINY_OPENCLIP_VOCAB.index("<|endoftext|>"), "mclip": 1}[kind],
    )
    text = replace(text, embed_dim=embed_dim, kind=kind)
    config: dict[str, object] = {
        "embed_dim": config_embed_dim if config_embed_dim is not None else embed_dim,
        "vision_cfg": {
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "width": vision.width,
            "layers": vision.layers,
        },
        "text_cfg": {
            "context_length": text.context_length,
            "vocab_size": text.vocab_size,
            "width": text.width,
            "layers": text.layers,
            "heads": text.heads,
            **(text_cfg_extra or {}),
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    if "visual" in components:
        _save(visual_graph(vision, seed=seed, symbolic_output=symbolic_output), folder / "visual" / "model.onnx")
        cfg = {
            "size": [vision.image_size, vision.image_size],
            "mode": "RGB",
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
            "interpolation": "bicubic",
            "resize_mode": "squash" if kind == "cn-clip" else "shortest",
            **(preprocess or {}),
        }
        (folder / "visual" / "preprocess_cfg.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    if "textual" in components:
        _save(textual_graph(text, seed=seed + 1, symbolic_output=symbolic_output), folder / "textual" / "model.onnx")
        _write_tokenizer(folder / "textual", kind, tokenizer_style, nllb)
    return folder


def build_test_models(model_dir: Path) -> Path:
    """The standard tiny test models; returns ``model_dir``.

    ``test-cn-clip-tiny`` (cn-clip layout, 16-d), ``test-clip-tiny`` (OpenCLIP-like, 16-d),
    ``test-mclip-tiny`` (M-CLIP inputs, 16-d), ``test-cn-clip-512`` (cn-clip layout with ViT-B/16's
    512-d output, tiny towers: for tests that store vectors in Immich's 512-d column)."""
    build_clip_model(model_dir, "test-cn-clip-tiny", kind="cn-clip")
    build_clip_model(model_dir, "test-clip-tiny", kind="openclip", seed=10)
    build_clip_model(model_dir, "test-mclip-tiny", kind="mclip", seed=20)
    build_clip_model(model_dir, "test-cn-clip-512", kind="cn-clip", embed_dim=512, seed=30)
    return Path(model_dir)


# Full-size ViT-B/16 (cn-clip ViT-B-16's image tower): 224 px, patch 16, width 768, 12 layers, 12 heads,
# MLP 3072, projection to 512. Random weights, ~86 M parameters (~345 MB): for speed measurements only.
VIT_B16_VISION = VisionSpec(image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp_dim=3072, embed_dim=512)
# RoBERTa-wwm-ext-base-sized text tower (12 x 768, MLP 3072) over the tiny vocabulary: the embedding
# table's size does not change latency, the 12 layers over 52 tokens do.
VIT_B16_TEXT = TextSpec(
    kind="cn-clip",
    context_length=52,
    vocab_size=len(TINY_CN_VOCAB),
    width=768,
    layers=12,
    heads=12,
    mlp_dim=3072,
    embed_dim=512,
)


def build_vit_b16_model(model_dir: Path, name: str = "bench-vit-b-16", *, with_text: bool = False) -> Path:
    """A cn-clip ViT-B-16-shaped model folder (random weights) for benchmarks."""
    return build_clip_model(
        model_dir,
        name,
        kind="cn-clip",
        vision=VIT_B16_VISION,
        text=VIT_B16_TEXT,
        embed_dim=512,
        components=("visual", "textual") if with_text else ("visual",),
    )


# ---- a reference for cn-clip's tokenizer ---------------------------------------------------------------


def reference_cn_clip_tokenize(text: str, vocab: Sequence[str], context_length: int = 52) -> list[int]:
    """What ``cn_clip.clip.tokenize`` computes (BERT BasicTokenizer + WordPiece, lower case),
    written out independently of the ``tokenizers`` package, for comparison in tests."""
    ids = {token: i for i, token in enumerate(vocab)}

    def is_punct(ch: str) -> bool:
        cp = ord(ch)
        if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
            return True
        return unicodedata.category(ch).startswith("P")

    def is_cjk(cp: int) -> bool:
        ranges = (
            (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
            (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
        )  # fmt: skip
        return any(lo <= cp <= hi for lo, hi in ranges)

    cleaned = []
    for ch in text:
        cp = ord(ch)
        if cp in (0, 0xFFFD) or (ch not in "\t\n\r" and unicodedata.category(ch) in ("Cc", "Cf")):
            continue
        if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
            cleaned.append(" ")
        elif is_cjk(cp):
            cleaned.append(f" {ch} ")
        else:
            cleaned.append(ch)
    words: list[str] = []
    for word in "".join(cleaned).split():
        word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
        current = ""
        for ch in word:
            if is_punct(ch):
                if current:
                    words.append(current)
                    current = ""
                words.append(ch)
            else:
                current += ch
        if current:
            words.append(current)
    pieces: list[str] = []
    for word in words:
        if len(word) > 200:
            pieces.append("[UNK]")
            continue
        start, sub = 0, []
        while start < len(word):
            end = len(word)
            while end > start:
                candidate = ("##" if start else "") + word[start:end]
                if candidate in ids:
                    break
                end -= 1
            if end == start:
                sub = ["[UNK]"]
                break
            sub.append(candidate)
            start = end
        pieces.extend(sub)
    tokens = [ids["[CLS]"], *(ids[p] for p in pieces[: context_length - 2]), ids["[SEP]"]]
    return tokens + [ids["[PAD]"]] * (context_length - len(tokens))
