"""Export an official Chinese-CLIP checkpoint to ONNX in Immich's model layout.

Needs the optional ``export`` extra (``cn_clip`` + ``torch`` + ``torchvision`` + ``onnx``) and a machine
that can download the checkpoint from OFA-Sys' bucket (or a checkpoint file already on disk); the
service itself never imports torch. ViT-B-16, ViT-L-14 and ViT-L-14-336 need none of this:
``models pull`` converts the ONNX exports published for transformers.js (``clip.transformers_js``).
The result is ``<model_dir>/clip/<arch>__cn-clip/``::

    config.json                  embed_dim, vision_cfg, text_cfg (context_length 52), export facts
    visual/model.onnx            image  [batch, 3, S, S] float32 -> embedding [batch, D]
    visual/preprocess_cfg.json   size S, OpenAI mean/std, bicubic, resize_mode "squash"
    textual/model.onnx           text   [batch, 52] int32        -> embedding [batch, D]
    textual/tokenizer.json       cn-clip's BERT WordPiece over its vocab.txt ([CLS] ... [SEP], pad 0)
    textual/tokenizer_config.json, textual/vocab.txt

Decisions, chosen so the folder also works unchanged in immich-machine-learning:

* L2 normalisation is **in the graph** (as in Immich's own exports). The service normalises again,
  which changes nothing for a unit vector.
* The text input is **int32** (what Immich feeds); the graph casts to int64 for cn-clip's BERT.
* ``resize_mode`` is ``squash``: cn-clip's ``image_transform`` resizes straight to S x S. (Immich's
  service always center-crops; this service honours the field.)
* Opset 17 (>= 14 needed for the attention ops), dynamic batch axis on both graphs.

The export is verified before it is installed: token ids must equal ``cn_clip.clip.tokenize``'s,
and both graphs, run through this service's own loaders, must match the torch model's normalised
features (cosine >= 0.9999). Nothing is installed unless that passes (see ``ModelStore.install``).
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ai_service.models.base import ModelError
from ai_service.models.clip.catalog import (
    CN_CLIP_ARCHS,
    CN_CLIP_CONTEXT_LENGTH,
    CN_CLIP_MEAN,
    CN_CLIP_STD,
    CN_CLIP_VOCAB_SIZE,
    CnClipArch,
)
from ai_service.models.clip.family import ClipFamily
from ai_service.models.clip.preprocess import PreprocessConfig
from ai_service.models.clip.textual import (
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    VOCAB_FILE,
    ClipTextualEncoder,
    bert_tokenizer_config,
    bert_wordpiece_tokenizer,
)
from ai_service.models.clip.visual import PREPROCESS_FILE, ClipVisualEncoder
from ai_service.models.store import ModelStore
from ai_service.protocol.immich import ModelTask
from ai_service.runtime.onnx import SessionOptions
from ai_service.settings import AIServiceSettings

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
# protobuf cannot hold a model over 2 GiB; larger graphs (ViT-H-14's image tower) keep their weights
# in one side file next to model.onnx, which ONNX Runtime loads from the same folder.
_EXTERNAL_DATA_THRESHOLD = 1_800_000_000
EXTERNAL_DATA_FILE = "model.onnx_data"
MIN_COSINE = 0.9999

INSTALL_EXTRA_HINT = (
    "pip install 'immich-zh-ai[export]' in a virtual environment of its own (cn_clip, onnx, and torch with the "
    "torchvision built for it, pinned together; a torchvision of another torch release fails to import)"
)


class ExportError(ModelError):
    """The export could not run or did not verify; nothing was installed."""


class ExportDependencyError(ExportError):
    """torch / cn_clip / onnx are not installed."""


# ---- layout (no torch needed) ------------------------------------------------------------------------


def build_config(
    arch: CnClipArch, *, context_length: int = CN_CLIP_CONTEXT_LENGTH, opset: int = DEFAULT_OPSET
) -> dict[str, Any]:
    """``config.json``: OpenCLIP's keys that Immich and this service read, plus how it was made."""
    return {
        "embed_dim": arch.embed_dim,
        "vision_cfg": {"image_size": arch.image_size, **arch.vision},
        "text_cfg": {
            "context_length": context_length,
            "vocab_size": CN_CLIP_VOCAB_SIZE,
            "tokenizer": "bert-wordpiece",
            **arch.text,
        },
        "source": {
            "family": "cn-clip",
            "arch": arch.arch,
            "project": "https://github.com/OFA-Sys/Chinese-CLIP",
            "exporter": __name__,
            "opset": opset,
            "normalized_output": True,
            "text_input_dtype": "int32",
        },
    }


def preprocess_config(arch: CnClipArch) -> PreprocessConfig:
    return PreprocessConfig(
        size=arch.image_size, mean=CN_CLIP_MEAN, std=CN_CLIP_STD, interpolation="bicubic", resize_mode="squash"
    )


def write_layout(
    folder: Path,
    arch: CnClipArch,
    vocab_file: Path,
    *,
    context_length: int = CN_CLIP_CONTEXT_LENGTH,
    opset: int = DEFAULT_OPSET,
) -> None:
    """Everything but the two ``model.onnx`` files: config, preprocessing, tokenizer (from cn-clip's vocab)."""
    (folder / "visual").mkdir(parents=True, exist_ok=True)
    textual = folder / "textual"
    textual.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "config.json", build_config(arch, context_length=context_length, opset=opset))
    _write_json(folder / "visual" / PREPROCESS_FILE, preprocess_config(arch).to_dict())
    bert_wordpiece_tokenizer(vocab_file, context_length).save(str(textual / TOKENIZER_FILE))
    _write_json(textual / TOKENIZER_CONFIG_FILE, bert_tokenizer_config(context_length))
    shutil.copyfile(vocab_file, textual / VOCAB_FILE)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---- export (needs the extra) ---------------------------------------------------------------------------


@dataclass
class ExportReport:
    name: str
    path: Path
    embed_dim: int
    verified: bool
    image_cosines: list[float] = field(default_factory=list)
    text_cosines: list[float] = field(default_factory=list)
    preprocess_max_abs_diff: float | None = None


def _import_export_deps() -> tuple[Any, Any, Any]:
    """torch, onnx and cn_clip's utilities, or :class:`ExportDependencyError` whatever way importing fails.

    Not only ImportError: a torchvision built for another torch raises RuntimeError ("operator
    torchvision::nms does not exist"), a CUDA build without its libraries OSError. torchvision is
    imported on its own first because cn_clip needs it and that is where mismatches show."""
    module = "onnx"
    try:
        import onnx

        module = "torch"
        import torch

        module = "torchvision"
        import torchvision  # noqa: F401

        module = "cn_clip"
        from cn_clip.clip import utils as cn_utils
    except (ImportError, RuntimeError, OSError, AttributeError) as exc:
        missing = isinstance(exc, ImportError) and exc.name is not None and exc.name.split(".")[0] == module
        problem = f"{module} is missing" if missing else f"importing {module} failed: {_first_line(exc)}"
        raise ExportDependencyError(
            f"exporting Chinese-CLIP needs the 'export' extra ({problem}): {INSTALL_EXTRA_HINT}. "
            "No torch at all is needed for ViT-B-16, ViT-L-14 and ViT-L-14-336: "
            "`python -m ai_service models pull <arch>__cn-clip` converts a published ONNX export."
        ) from exc
    return torch, onnx, cn_utils


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def export_cn_clip(
    arch_name: str,
    store: ModelStore,
    *,
    checkpoint: Path | None = None,
    checkpoint_dir: Path | None = None,
    name: str | None = None,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    allow_pickle: bool = False,
    session_options: SessionOptions | None = None,
    settings: AIServiceSettings | None = None,
) -> ExportReport:
    """Export ``arch_name`` (``ViT-B-16``, ``ViT-L-14``, ``ViT-L-14-336``, ``ViT-H-14``, ``RN50``),
    verify it, and install it as ``name`` (default ``<arch>__cn-clip``) in ``store``."""
    arch = CN_CLIP_ARCHS.get(arch_name)
    if arch is None:
        raise ExportError(f"unknown Chinese-CLIP architecture {arch_name!r}; choose one of {', '.join(CN_CLIP_ARCHS)}")
    if opset < 14:
        raise ExportError("opset must be >= 14")
    torch, onnx, cn_utils = _import_export_deps()
    name = name or arch.name
    model = _load_checkpoint(torch, cn_utils, arch, checkpoint, checkpoint_dir, allow_pickle)
    from cn_clip.clip.bert_tokenizer import default_vocab

    with store.staging(ModelTask.CLIP, name) as staging:
        # The staging folder doubles as a one-model store, so verification loads the export through
        # ClipFamily exactly as the service will, before anything is installed.
        staged_store = ModelStore(staging / "store")
        folder = staged_store.root / str(ModelTask.CLIP) / name
        write_layout(folder, arch, Path(default_vocab()), opset=opset)
        _export_towers(torch, onnx, model, arch, folder, staging / "scratch", opset)
        report = ExportReport(name, store.model_dir(ModelTask.CLIP, name), arch.embed_dim, verified=False)
        if verify:
            family = ClipFamily(
                staged_store, session_options or SessionOptions(), settings or AIServiceSettings(model_dir=store.root)
            )
            _verify(torch, cn_utils, model, arch, family, name, report)
        store.install(ModelTask.CLIP, name, folder)
    return report


def _load_checkpoint(
    torch: Any,
    cn_utils: Any,
    arch: CnClipArch,
    checkpoint: Path | None,
    checkpoint_dir: Path | None,
    allow_pickle: bool,
) -> Any:
    if checkpoint is None:
        root = Path(checkpoint_dir).expanduser() if checkpoint_dir else Path.home() / ".cache" / "clip"
        log.info("fetching the %s checkpoint into %s (if not there yet)", arch.arch, root)
        try:
            checkpoint = Path(cn_utils._download(cn_utils._MODELS[arch.arch], str(root)))
        except OSError as exc:
            raise ExportError(
                f"cannot download the official {arch.arch} checkpoint ({exc}); download "
                f"{cn_utils._MODELS[arch.arch]} elsewhere and pass --checkpoint FILE"
            ) from exc
    if not Path(checkpoint).is_file():
        raise ExportError(f"checkpoint {checkpoint} does not exist")
    try:
        # weights_only first: a checkpoint is a pickle, and only plain tensors and numbers are expected.
        state = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    except Exception as exc:
        if not allow_pickle:
            raise ExportError(
                f"{checkpoint} could not be read as plain weights ({exc}). A truncated download? Delete it and "
                "retry. If the file is complete and you trust it, pass --allow-pickle."
            ) from exc
        state = torch.load(str(checkpoint), map_location="cpu", weights_only=False)
    model = cn_utils.create_model(cn_utils._MODEL_INFO[arch.arch]["struct"], state)
    return model.float().eval()


def _export_towers(
    torch: Any, onnx: Any, model: Any, arch: CnClipArch, folder: Path, scratch: Path, opset: int
) -> None:
    class ImageTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, image: Any) -> Any:
            features = self.model.encode_image(image)
            return features / features.norm(dim=-1, keepdim=True)

    class TextTower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, text: Any) -> Any:
            features = self.model.encode_text(text.long())
            return features / features.norm(dim=-1, keepdim=True)

    image = torch.zeros(1, 3, arch.image_size, arch.image_size, dtype=torch.float32)
    text = torch.zeros(1, CN_CLIP_CONTEXT_LENGTH, dtype=torch.int32)
    text[0, 0], text[0, 1] = 101, 102  # "[CLS] [SEP]": the empty query
    with torch.no_grad():
        for tower, example, input_name, part in (
            (ImageTower(), image, "image", "visual"),
            (TextTower(), text, "text", "textual"),
        ):
            raw = scratch / part / "model.onnx"
            raw.parent.mkdir(parents=True, exist_ok=True)
            _torch_export(torch, tower.eval(), example, raw, input_name, opset)
            _finalise_onnx(onnx, raw, folder / part / "model.onnx")


def _torch_export(torch: Any, module: Any, example: Any, path: Path, input_name: str, opset: int) -> None:
    kwargs: dict[str, Any] = {
        "input_names": [input_name],
        "output_names": ["embedding"],
        "dynamic_axes": {input_name: {0: "batch"}, "embedding": {0: "batch"}},
        "opset_version": opset,
        "do_constant_folding": True,
        "export_params": True,
    }
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        # The TorchScript exporter first: the path cn-clip's own deploy script takes, with complete
        # dynamic_axes support. Newer torch versions may only offer the torch.export-based one.
        try:
            torch.onnx.export(module, (example,), str(path), dynamo=False, **kwargs)
            return
        except Exception as exc:
            log.warning("TorchScript ONNX export failed (%s); trying the torch.export-based exporter", exc)
        torch.onnx.export(module, (example,), str(path), dynamo=True, **kwargs)
        return
    torch.onnx.export(module, (example,), str(path), **kwargs)


def _finalise_onnx(onnx: Any, raw: Path, final: Path) -> None:
    """Check the graph and write it as one file, or one file + one weights file when over 2 GB
    (the exporters scatter large models over many files)."""
    model = onnx.load(str(raw), load_external_data=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    if weight_bytes > _EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(
            model, str(final), save_as_external_data=True, all_tensors_to_one_file=True, location=EXTERNAL_DATA_FILE
        )
        onnx.checker.check_model(str(final))
    else:
        onnx.checker.check_model(model)
        onnx.save_model(model, str(final))


def verification_images(size: int) -> list[np.ndarray]:
    """Deterministic RGB test images: a gradient, noise, a non-square photo-like picture."""
    rng = np.random.default_rng(1234)
    yy, xx = np.mgrid[0:size, 0:size]
    gradient = np.stack([xx * 255 // size, yy * 255 // size, (xx + yy) * 255 // (2 * size)], axis=-1).astype(np.uint8)
    noise = rng.integers(0, 256, (size + 37, size - 11, 3), dtype=np.uint8)
    h, w = 3 * size // 2, size
    blobs = np.zeros((h, w, 3), np.uint8)
    blobs[: h // 2] = (70, 130, 200)  # sky
    blobs[h // 2 :] = (200, 180, 120)  # sand
    blobs[h // 3 : h // 2 + 10, w // 4 : w // 2] = (250, 250, 250)
    return [gradient, noise, blobs]


VERIFICATION_TEXTS = (
    "",
    "一只猫",
    "皮卡丘",
    "海滩上的一只狗 a dog on the beach",
    "Hello, World! naïve café 123",
    "春节放鞭炮，" * 12,  # longer than the context: truncation
)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _verify(
    torch: Any,
    cn_utils: Any,
    model: Any,
    arch: CnClipArch,
    family: ClipFamily,
    name: str,
    report: ExportReport,
) -> None:
    visual = family.load(name, "visual")
    textual = family.load(name, "textual")
    assert isinstance(visual, ClipVisualEncoder) and isinstance(textual, ClipTextualEncoder)
    problems: list[str] = []

    from PIL import Image

    reference_transform = cn_utils.image_transform(arch.image_size)
    for index, image in enumerate(verification_images(arch.image_size)):
        ours = visual.preprocess(image)
        theirs = reference_transform(Image.fromarray(image)).numpy()
        diff = float(np.max(np.abs(ours - theirs)))
        report.preprocess_max_abs_diff = max(report.preprocess_max_abs_diff or 0.0, diff)
        if diff > 1e-3:
            problems.append(f"image {index}: preprocessing differs from cn_clip's by {diff:.2e}")
        with torch.no_grad():
            expected = model.encode_image(torch.from_numpy(ours[None]))
            expected = (expected / expected.norm(dim=-1, keepdim=True)).numpy()[0]
        cosine = _cosine(visual.run(ours[None])[0], expected)
        report.image_cosines.append(cosine)
        if cosine < MIN_COSINE:
            problems.append(f"image {index}: ONNX vs torch cosine {cosine:.6f}")
    for text in VERIFICATION_TEXTS:
        expected_ids = cn_utils.tokenize([text], context_length=CN_CLIP_CONTEXT_LENGTH)[0].tolist()
        our_ids = textual.tokenize(text)["text"][0].tolist()
        if our_ids != expected_ids:
            problems.append(f"text {text[:20]!r}: token ids differ from cn_clip.clip.tokenize")
            continue
        with torch.no_grad():
            expected = model.encode_text(torch.tensor([expected_ids], dtype=torch.long))
            expected = (expected / expected.norm(dim=-1, keepdim=True)).numpy()[0]
        cosine = _cosine(textual.encode_text(text), expected)
        report.text_cosines.append(cosine)
        if cosine < MIN_COSINE:
            problems.append(f"text {text[:20]!r}: ONNX vs torch cosine {cosine:.6f}")
    if visual.embedding_size != arch.embed_dim or textual.embedding_size != arch.embed_dim:
        problems.append(f"embedding sizes {visual.embedding_size}/{textual.embedding_size}, expected {arch.embed_dim}")
    if problems:
        raise ExportError("the export did not verify, nothing was installed: " + "; ".join(problems))
    report.verified = True
