"""A small random-weight ``transformers.ChineseCLIPModel`` in the layout of the transformers.js exports
(``Xenova/chinese-clip-vit-*``), with the reference implementation kept alongside for comparisons.

Repository layout written by :func:`build_transformers_js_repo` (what the Xenova repos hold)::

    config.json                  ChineseCLIPConfig (projection_dim, text_config, vision_config)
    preprocessor_config.json     OFA-Sys' Chinese-CLIP image processor settings (224 x 224, no crop)
    tokenizer.json               BertTokenizerFast over vocab.txt
    tokenizer_config.json, special_tokens_map.json, vocab.txt
    onnx/model.onnx              the combined graph: input_ids, pixel_values, attention_mask ->
                                 logits_per_image, logits_per_text, text_embeds, image_embeds
    onnx/model_quantized.onnx    dynamically quantised (onnxruntime.quantization, as transformers.js does)
    onnx/model_fp16.onnx         float16 with float16 inputs and outputs (the harder case for the converter)

Input and output names, their order and dynamic axes follow optimum's ``ChineseCLIPOnnxConfig``
(= ``CLIPOnnxConfig``), which transformers.js' conversion script drives.

Needs ``torch`` (the CPU wheel) and ``transformers``; no torchvision (the PIL image processor is used).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tests.builders.clip_models import TINY_CN_VOCAB, write_vocab

# Extra CJK characters and English words beyond the shared tiny vocabulary, so that mixed queries
# exercise real WordPiece splits and [UNK] for characters the vocabulary lacks.
_EXTRA_TOKENS = [*"猫咪春节放鞭炮长城故宫西湖雪景夜晚城市灯光", "sunset", "over", "sea", "##set", "sun", "night"]
VOCAB: list[str] = list(dict.fromkeys([*TINY_CN_VOCAB, *_EXTRA_TOKENS]))

PREPROCESSOR_CONFIG: dict[str, Any] = {
    # OFA-Sys/chinese-clip-vit-base-patch16's file, which the Xenova repos copy.
    "crop_size": 224,
    "do_center_crop": False,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "ChineseCLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": {"height": 224, "width": 224},
}

# transformers' default (0.02) leaves a tiny random model's attention almost uniform: every query then gets
# nearly the same vector (cosine 0.99999 between different texts) and a wrong attention mask goes unnoticed.
# At 0.3 different queries are ~0.5-0.85 apart and ignoring the mask moves a padded query's vector to ~0.8.
INIT_STD = 0.3
FULL_VOCAB_SIZE = 21128  # cn-clip's vocabulary

INPUT_NAMES = ["input_ids", "pixel_values", "attention_mask"]
OUTPUT_NAMES = ["logits_per_image", "logits_per_text", "text_embeds", "image_embeds"]


@dataclass
class TinyChineseClip:
    """The reference model and tokenizer, and the repository files built from them."""

    model: Any  # transformers.ChineseCLIPModel, eval mode
    tokenizer: Any  # transformers.BertTokenizer (the slow one, as Chinese-CLIP's model card uses)
    fast_tokenizer: Any  # transformers.BertTokenizerFast
    image_processor: Any
    files: dict[str, bytes]
    projection_dim: int
    image_size: int

    def text_features(self, texts: list[str], context_length: int = 52) -> np.ndarray:
        import torch

        batch = self.tokenizer(
            texts, padding="max_length", max_length=context_length, truncation=True, return_tensors="pt"
        )
        with torch.no_grad():
            out = self.model.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return _normalised(_features(out))

    def image_features(self, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(pixel_values as the transformers image processor makes them, normalised image features)."""
        import torch

        pixels = self.image_processor(images=list(images), return_tensors="np")["pixel_values"]
        with torch.no_grad():
            out = self.model.get_image_features(pixel_values=torch.from_numpy(np.asarray(pixels, np.float32)))
        return np.asarray(pixels, np.float32), _normalised(_features(out))


def _features(out: Any) -> np.ndarray:
    # transformers 5 returns a BaseModelOutputWithPooling whose pooler_output is the projection; 4.x a tensor.
    tensor = getattr(out, "pooler_output", out)
    return tensor.detach().numpy().astype(np.float32)


def _normalised(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def build_transformers_js_repo(
    folder: Path,
    *,
    projection_dim: int = 512,
    image_size: int = 224,
    patch_size: int = 16,
    seed: int = 0,
    variants: tuple[str, ...] = ("fp32", "quantized", "fp16"),
    full_size: bool = False,
) -> TinyChineseClip:
    """Build the model, export it, write the repository under ``folder``; returns files + reference.

    ``full_size``: the shapes of OFA-Sys' ViT-B-16 (RoBERTa-wwm-ext-base, 21128-token vocabulary, ViT-B/16)
    for benchmarks; about 750 MB of random weights, a minute or two to build and export."""
    import torch
    from transformers import BertTokenizer, BertTokenizerFast, ChineseCLIPConfig, ChineseCLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    vocab = VOCAB + [f"[unused-{i}]" for i in range(len(VOCAB), FULL_VOCAB_SIZE)] if full_size else VOCAB
    vocab_file = write_vocab(folder / "vocab.txt", vocab)
    width, layers, heads = (768, 12, 12) if full_size else (32, 2, 2)
    common = {
        "hidden_size": width,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": 4 * width if full_size else 64,
        "initializer_range": INIT_STD,
    }
    config = ChineseCLIPConfig(
        text_config={
            **common,
            "vocab_size": len(vocab),
            "max_position_embeddings": 512 if full_size else 64,
            "type_vocab_size": 2,
        },
        vision_config={**common, "image_size": image_size, "patch_size": patch_size, "projection_dim": projection_dim},
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = ChineseCLIPModel(config).eval()
    model.config.save_pretrained(str(folder))  # config.json as save_pretrained writes it on the hub

    tokenizer = BertTokenizer(str(vocab_file), do_lower_case=True, tokenize_chinese_chars=True)
    fast = BertTokenizerFast(str(vocab_file), do_lower_case=True, tokenize_chinese_chars=True)
    fast.save_pretrained(str(folder / "tok"))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        source = folder / "tok" / name
        if source.is_file():
            (folder / name).write_bytes(source.read_bytes())
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2), encoding="utf-8")

    onnx_dir = folder / "onnx"
    onnx_dir.mkdir(exist_ok=True)
    _export_combined(torch, model, onnx_dir / "model.onnx", image_size)
    if "quantized" in variants:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            str(onnx_dir / "model.onnx"), str(onnx_dir / "model_quantized.onnx"), weight_type=QuantType.QUInt8
        )
    if "fp16" in variants:
        import onnx
        from onnxruntime.transformers import float16

        half = float16.convert_float_to_float16(onnx.load(str(onnx_dir / "model.onnx")), keep_io_types=False)
        onnx.save(half, str(onnx_dir / "model_fp16.onnx"))

    files = {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.relative_to(folder).parts[0] != "tok"
    }
    # transformers 5 splits the image processor by backend: the default one needs torchvision, the PIL one
    # does not. In 4.x the plain ChineseCLIPImageProcessor is the PIL/numpy one.
    import transformers

    processor_class = getattr(transformers, "ChineseCLIPImageProcessorPil", None)
    processor_class = processor_class or transformers.ChineseCLIPImageProcessor

    settings = {k: v for k, v in PREPROCESSOR_CONFIG.items() if k not in ("feature_extractor_type",)}
    settings["size"] = {"height": image_size, "width": image_size}
    processor = processor_class(**settings)
    return TinyChineseClip(model, tokenizer, fast, processor, files, projection_dim, image_size)


def export_combined(model: Any, path: Path, image_size: int, *, token_type_ids: bool = False) -> None:
    """The combined graph as optimum exports it; ``token_type_ids`` adds that input (BERT's third one),
    which an export made another way may have."""
    import torch

    _export_combined(torch, model, path, image_size, token_type_ids=token_type_ids)


def _export_combined(torch: Any, model: Any, path: Path, image_size: int, *, token_type_ids: bool = False) -> None:
    class Combined(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, pixel_values: Any, attention_mask: Any, *types: Any) -> tuple[Any, ...]:
            out = self.model(
                input_ids=input_ids,
                pixel_values=pixel_values,
                attention_mask=attention_mask,
                token_type_ids=types[0] if types else None,
            )
            return out.logits_per_image, out.logits_per_text, out.text_embeds, out.image_embeds

    ids = torch.tensor([[101, 110, 120, 102, 0], [101, 130, 102, 0, 0]], dtype=torch.long)
    example: tuple[Any, ...] = (ids, torch.randn(3, 3, image_size, image_size), (ids != 0).long())
    input_names = list(INPUT_NAMES)
    if token_type_ids:
        example += (torch.zeros_like(ids),)
        input_names.append("token_type_ids")
    dynamic_axes = {
        "input_ids": {0: "text_batch_size", 1: "sequence_length"},
        "pixel_values": {0: "image_batch_size", 1: "num_channels", 2: "height", 3: "width"},
        "attention_mask": {0: "text_batch_size", 1: "sequence_length"},
        "logits_per_image": {0: "image_batch_size", 1: "text_batch_size"},
        "logits_per_text": {0: "text_batch_size", 1: "image_batch_size"},
        "text_embeds": {0: "text_batch_size"},
        "image_embeds": {0: "image_batch_size"},
        "token_type_ids": {0: "text_batch_size", 1: "sequence_length"},
    }
    with torch.no_grad():
        torch.onnx.export(
            Combined().eval(),
            example,
            str(path),
            input_names=input_names,
            output_names=OUTPUT_NAMES,
            dynamic_axes=dynamic_axes,
            opset_version=14,
            do_constant_folding=True,
            dynamo=False,
        )
