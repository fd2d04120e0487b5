"""CLIP models through the real loading code (``ClipFamily`` over a model folder in Immich's layout).

The models are tiny random-weight ONNX graphs (``tests.builders.clip_models``): tests check shapes,
norms, determinism, tokenisation and the layout contract, never that a similarity means anything.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer

from ai_service.imaging import decode_image
from ai_service.models.base import ModelLoadError, ModelNotInstalledError, UnknownModelError
from ai_service.models.clip import ClipFamily, ClipTextualEncoder, ClipVisualEncoder, flores200_code
from ai_service.models.clip.catalog import CN_CLIP_ARCHS, KNOWN_CLIP_MODELS
from ai_service.models.clip.preprocess import ImagePreprocessor, PreprocessConfig
from ai_service.models.registry import ModelRegistry
from ai_service.models.store import ModelStore
from ai_service.protocol.immich import ModelTask, ModelType
from ai_service.protocol.immich_clip_models import IMMICH_CLIP_DIMENSIONS
from ai_service.runtime.onnx import SessionOptions
from ai_service.settings import AIServiceSettings
from tests.builders.clip_models import (
    TINY_CN_VOCAB,
    TINY_MCLIP_VOCAB,
    TINY_OPENCLIP_VOCAB,
    TextSpec,
    VisionSpec,
    build_clip_model,
    build_test_models,
    reference_cn_clip_tokenize,
    textual_graph,
    visual_graph,
    write_vocab,
)
from tests.servers import REPO

TINY = ["test-cn-clip-tiny", "test-clip-tiny", "test-mclip-tiny", "test-cn-clip-512"]
CN_ID = {token: i for i, token in enumerate(TINY_CN_VOCAB)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    build_test_models(root)
    build_clip_model(root, "test-cn-clip-vocab-only", kind="cn-clip", tokenizer_style="vocab-only", seed=3)
    build_clip_model(
        root,
        "nllb-clip-test-tiny",
        kind="openclip",
        seed=4,
        text_cfg_extra={"tokenizer_kwargs": {"clean": "canonicalize"}},
    )
    build_clip_model(root, "test-clip-mismatch", kind="openclip", config_embed_dim=32, seed=5)
    build_clip_model(root, "test-clip-symbolic", kind="cn-clip", symbolic_output=True, seed=6)
    build_clip_model(root, "test-clip-symbolic-mismatch", kind="cn-clip", symbolic_output=True, config_embed_dim=8)
    build_clip_model(
        root,
        "test-clip-336",
        kind="openclip",
        vision=VisionSpec(image_size=48, patch_size=16),
        preprocess={"resize_mode": "shortest", "mean": 0.5, "std": 0.5},
    )
    return root


@pytest.fixture(scope="module")
def family(model_dir: Path) -> ClipFamily:
    return ClipFamily(ModelStore(model_dir), SessionOptions(), AIServiceSettings(model_dir=model_dir))


def _visual(family: ClipFamily, name: str) -> ClipVisualEncoder:
    model = family.load(name, "visual")
    assert isinstance(model, ClipVisualEncoder)
    return model


def _textual(family: ClipFamily, name: str) -> ClipTextualEncoder:
    model = family.load(name, "textual")
    assert isinstance(model, ClipTextualEncoder)
    return model


def _image(seed: int, height: int = 60, width: int = 90) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _unit(vector: np.ndarray) -> bool:
    return vector.dtype == np.float32 and abs(float(np.linalg.norm(vector)) - 1.0) < 1e-5


# ---- shapes, norms, determinism ---------------------------------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_visual_vectors_have_the_config_size_and_unit_norm(family: ClipFamily, name: str) -> None:
    model = _visual(family, name)
    expected = 512 if name.endswith("512") else 16
    assert (model.embedding_size, model.input_size) == (expected, 32)
    for image in (_image(1), _image(2, 10, 300), _image(3, 500, 20), np.zeros((1, 1, 3), np.uint8)):
        vector = model.encode_image(image)
        assert vector.shape == (expected,) and _unit(vector)


@pytest.mark.parametrize("name", TINY)
def test_textual_vectors_have_the_config_size_and_unit_norm(family: ClipFamily, name: str) -> None:
    model = _textual(family, name)
    expected = 512 if name.endswith("512") else 16
    assert model.embedding_size == expected
    for text in ("一只在海滩上的狗", "a dog on the beach", "", "字" * 500):
        vector = model.encode_text(text, "zh-CN")
        assert vector.shape == (expected,) and _unit(vector)


def test_outputs_are_deterministic_across_calls_and_loads(family: ClipFamily) -> None:
    first_visual, second_visual = _visual(family, "test-cn-clip-tiny"), _visual(family, "test-cn-clip-tiny")
    image = _image(7)
    np.testing.assert_array_equal(first_visual.encode_image(image), first_visual.encode_image(image.copy()))
    np.testing.assert_array_equal(first_visual.encode_image(image), second_visual.encode_image(image))
    first_text, second_text = _textual(family, "test-cn-clip-tiny"), _textual(family, "test-cn-clip-tiny")
    np.testing.assert_array_equal(first_text.encode_text("一只猫"), second_text.encode_text("一只猫"))
    assert not np.allclose(first_text.encode_text("一只猫"), first_text.encode_text("一只狗"))


def test_a_batch_of_different_images_matches_one_by_one(family: ClipFamily) -> None:
    model = _visual(family, "test-clip-tiny")
    images = [_image(10), _image(11, 40, 40), _image(12, 200, 33)]
    batch = model.encode_images(images)
    assert batch.shape == (3, 16)
    for row, image in zip(batch, images, strict=True):
        np.testing.assert_allclose(row, model.encode_image(image), atol=1e-5)
        assert _unit(row)
    assert not np.allclose(batch[0], batch[1]) and not np.allclose(batch[1], batch[2])
    assert model.encode_images([]).shape == (0, 16)


def test_concurrent_calls_give_the_serial_results(family: ClipFamily) -> None:
    visual, textual = _visual(family, "test-cn-clip-tiny"), _textual(family, "test-cn-clip-tiny")
    images = [_image(i) for i in range(8)]
    texts = [f"一只猫 {i}" for i in range(8)]
    expected = [(visual.encode_image(im), textual.encode_text(t)) for im, t in zip(images, texts, strict=True)]
    results: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def work(i: int) -> None:
        for _ in range(5):
            results[i] = (visual.encode_image(images[i]), textual.encode_text(texts[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (image_vec, text_vec) in enumerate(expected):
        np.testing.assert_array_equal(results[i][0], image_vec)
        np.testing.assert_array_equal(results[i][1], text_vec)


# ---- the dimension check ------------------------------------------------------------------------------


@pytest.mark.parametrize("component", ["visual", "textual"])
def test_a_config_that_disagrees_with_the_graph_fails_at_load(family: ClipFamily, component: str) -> None:
    with pytest.raises(ModelLoadError, match=r"outputs 16-d vectors but config\.json says embed_dim=32"):
        family.load("test-clip-mismatch", component)


def test_symbolic_output_sizes_are_probed(family: ClipFamily) -> None:
    assert _visual(family, "test-clip-symbolic").embedding_size == 16
    assert _textual(family, "test-clip-symbolic").embedding_size == 16
    with pytest.raises(ModelLoadError, match="embed_dim=8"):
        family.load("test-clip-symbolic-mismatch", "visual")


# ---- tokenisation -----------------------------------------------------------------------------------


def _ids(model: ClipTextualEncoder, text: str, language: str | None = None) -> list[int]:
    feeds = model.tokenize(text, language)
    return feeds["input_ids" if model.kind == "mclip" else "text"][0].tolist()


def test_cn_clip_tokenisation_has_the_known_ids(family: ClipFamily) -> None:
    model = _textual(family, "test-cn-clip-tiny")
    assert model.kind == "cn-clip" and model.context_length == 52
    feeds = model.tokenize("一只猫")
    assert list(feeds) == ["text"] and feeds["text"].dtype == np.int64 and feeds["text"].shape == (1, 52)
    assert _ids(model, "一只猫") == [101, CN_ID["一"], CN_ID["只"], CN_ID["猫"], 102] + [0] * 47
    # English: lower-cased, split on punctuation, WordPiece with ## continuations, [UNK] for the rest.
    assert _ids(model, "A Photo of the DOG!")[:8] == [
        101, CN_ID["a"], CN_ID["photo"], CN_ID["of"], CN_ID["the"], CN_ID["dog"], CN_ID["!"], 102,
    ]  # fmt: skip
    assert _ids(model, "unaffable playing zzz")[:7] == [
        101, CN_ID["un"], CN_ID["##aff"], CN_ID["##able"], CN_ID["play"], CN_ID["##ing"], 100,
    ]  # fmt: skip
    # Mixed scripts without spaces: every CJK character is its own token.
    assert _ids(model, "我爱cafe")[:5] == [101, CN_ID["我"], CN_ID["爱"], CN_ID["cafe"], 102]


def test_cn_clip_tokenisation_truncates_to_the_context(family: ClipFamily) -> None:
    model = _textual(family, "test-cn-clip-tiny")
    ids = _ids(model, "海" * 100)
    assert len(ids) == 52 and ids[0] == 101 and ids[-1] == 102
    assert ids[1:51] == [CN_ID["海"]] * 50 and 0 not in ids


TRICKY_TEXTS = [
    "一只在海滩上的狗",
    "A dog on the beach, playing!",
    "Café  naïve\tRÉSUMÉ\n天安门",
    "“北京”，（天安门）。小红花！",
    "a\u200bdog\x00 on\ufffd the beach",  # zero-width / control / replacement characters are dropped
    "1250 cars",
    "[SEP] [CLS] literal specials",
    "x" * 201 + " dog",  # a word over 200 characters is [UNK]
    "猫" * 60,
    "",
]


# tokenizers' stock BertWordPieceTokenizer (what a Hugging Face tokenizer.json holds) differs from
# cn_clip in two corners: it gives up on words at 100 characters, not 200, and matches "[SEP]" typed
# in a query as the special token. The tokenizer this project builds from vocab.txt has neither.
_STOCK_BERT_DIFFERS = {"x" * 201 + " dog", "[SEP] [CLS] literal specials"}


@pytest.mark.parametrize(
    ("name", "text"),
    [("test-cn-clip-vocab-only", t) for t in TRICKY_TEXTS]
    + [("test-cn-clip-tiny", t) for t in TRICKY_TEXTS if t not in _STOCK_BERT_DIFFERS],
)
def test_cn_clip_tokenisation_matches_cn_clips_algorithm(family: ClipFamily, name: str, text: str) -> None:
    """Both a Hugging Face-style tokenizer.json and the tokenizer built from vocab.txt give the ids
    cn_clip.clip.tokenize gives (BasicTokenizer + WordPiece, re-implemented in the builders)."""
    model = _textual(family, name)
    assert _ids(model, text) == reference_cn_clip_tokenize(" ".join(text.split()), TINY_CN_VOCAB)


def test_whitespace_is_collapsed(family: ClipFamily) -> None:
    model = _textual(family, "test-clip-tiny")
    assert model.prepare_text("  a   dog\n\ton  the beach ") == "a dog on the beach"
    assert _ids(model, "  a   dog\n\ton  the beach ") == _ids(model, "a dog on the beach")


def test_openclip_inputs_and_padding(family: ClipFamily) -> None:
    model = _textual(family, "test-clip-tiny")
    assert model.kind == "openclip"
    feeds = model.tokenize("a dog")
    assert list(feeds) == ["text"] and feeds["text"].dtype == np.int32 and feeds["text"].shape == (1, 16)
    sot, eot = TINY_OPENCLIP_VOCAB.index("<|startoftext|>"), TINY_OPENCLIP_VOCAB.index("<|endoftext|>")
    word = {w: i for i, w in enumerate(TINY_OPENCLIP_VOCAB)}
    # Padded with tokenizer_config.json's pad_token (<|endoftext|> for OpenCLIP exports).
    assert _ids(model, "a dog") == [sot, word["a"], word["dog"], eot] + [eot] * 12
    long_ids = _ids(model, "dog " * 40)
    assert len(long_ids) == 16 and long_ids[0] == sot and long_ids[-1] == eot


def test_mclip_inputs(family: ClipFamily) -> None:
    model = _textual(family, "test-mclip-tiny")
    assert model.kind == "mclip"
    feeds = model.tokenize("a dog 猫")
    assert list(feeds) == ["input_ids", "attention_mask"]
    assert feeds["input_ids"].dtype == np.int32 and feeds["attention_mask"].dtype == np.int32
    word = {w: i for i, w in enumerate(TINY_MCLIP_VOCAB)}
    assert feeds["input_ids"][0].tolist() == [0, word["a"], word["dog"], word["猫"], 2] + [1] * 11  # <pad> is 1
    assert feeds["attention_mask"][0].tolist() == [1] * 5 + [0] * 11
    assert _unit(model.encode_text("a dog 猫"))


def test_nllb_models_get_the_flores_prefix(family: ClipFamily) -> None:
    model = _textual(family, "nllb-clip-test-tiny")
    assert model.is_nllb and model.canonicalize
    assert model.prepare_text("一只猫", "zh-CN") == "zho_Hans一只猫"
    assert model.prepare_text("一只猫", "zh-TW") == "zho_Hant一只猫"
    assert model.prepare_text("Ein Hund!", "de-AT") == "deu_Latnein hund"  # region stripped; canonicalised
    assert model.prepare_text("a dog", "xx-YY") == "eng_Latna dog"  # unknown -> English
    assert model.prepare_text("a dog", None) == "a dog"  # Immich adds no code without a language
    ids = _ids(model, "一只猫", "zh-CN")
    assert ids[1] == model.tokenizer.token_to_id("zho_Hans")
    # Other models ignore the language.
    assert _textual(family, "test-clip-tiny").prepare_text("一只猫", "zh-CN") == "一只猫"


def test_flores_lookup() -> None:
    assert flores200_code("zh-CN") == "zho_Hans"
    assert flores200_code("pt_BR") == "por_Latn"
    assert flores200_code("nb-NO") == "nob_Latn"
    assert flores200_code("fr-CA") == "fra_Latn"
    assert flores200_code("tlh") == "eng_Latn"


def test_canonicalize_strips_punctuation_and_case(family: ClipFamily) -> None:
    model = _textual(family, "nllb-clip-test-tiny")
    assert model.prepare_text("A Dog, on the BEACH!") == "a dog on the beach"
    assert not _textual(family, "test-clip-tiny").canonicalize


# ---- names, hints, layout ---------------------------------------------------------------------------


def test_known_names_and_dimensions(family: ClipFamily) -> None:
    known = family.known()
    for name, dim in [
        ("ViT-B-16__cn-clip", 512),
        ("ViT-L-14__cn-clip", 768),
        ("ViT-L-14-336__cn-clip", 768),
        ("ViT-H-14__cn-clip", 1024),
        ("RN50__cn-clip", 1024),
        ("ViT-B-32__openai", 512),
        ("nllb-clip-large-siglip__v1", 1152),
        ("XLM-Roberta-Large-Vit-B-16Plus", 640),
        ("ViT-gopt-16-SigLIP2-384__webli", 1536),
    ]:
        assert name in known and family.embedding_size(name) == dim
    assert {n for n in known if KNOWN_CLIP_MODELS[n].source != "cn-clip"} == set(IMMICH_CLIP_DIMENSIONS)
    assert family.embedding_size("test-cn-clip-512") == 512  # from the installed config.json
    assert family.embedding_size("nothing-like-this") is None


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("chinese-clip-vit-base-patch16", "ViT-B-16__cn-clip"),
        ("chinese-clip-vit-large-patch14-336px", "ViT-L-14-336__cn-clip"),
        ("ViT-B-16", "ViT-B-16__cn-clip"),
        ("vit-h-14__cn-clip", "ViT-H-14__cn-clip"),
        ("RN50__cn_clip", "RN50__cn-clip"),
        ("ViT-B-32__openai", "ViT-B-32__openai"),
        ("test-cn-clip-tiny", "test-cn-clip-tiny"),
    ],
)
def test_canonical_names(family: ClipFamily, alias: str, canonical: str) -> None:
    assert family.canonical_name(alias) == canonical


def test_an_installed_folder_wins_over_an_alias(tmp_path: Path) -> None:
    build_clip_model(tmp_path, "ViT-B-16")
    family = ClipFamily(ModelStore(tmp_path), SessionOptions(), AIServiceSettings(model_dir=tmp_path))
    assert family.canonical_name("ViT-B-16") == "ViT-B-16"


def test_registry_messages(family: ClipFamily) -> None:
    registry = ModelRegistry([family])
    ref = registry.resolve(ModelTask.CLIP, ModelType.TEXTUAL, "test-cn-clip-tiny")
    assert (ref.name, ref.component) == ("test-cn-clip-tiny", "textual")
    with pytest.raises(ModelNotInstalledError, match=r"export-cn-clip --arch ViT-B-16\b"):
        registry.resolve(ModelTask.CLIP, ModelType.VISUAL, "OFA-Sys/chinese-clip-vit-base-patch16")
    with pytest.raises(ModelNotInstalledError, match=r"models pull ViT-B-32__openai"):
        registry.resolve(ModelTask.CLIP, ModelType.VISUAL, "immich-app/ViT-B-32::openai")
    with pytest.raises(UnknownModelError):
        registry.resolve(ModelTask.CLIP, ModelType.VISUAL, "no-such-model")
    with pytest.raises(UnknownModelError):
        family.component(ModelType.DETECTION)


def test_a_visual_only_model_is_installed_for_visual_only(tmp_path: Path) -> None:
    build_clip_model(tmp_path, "test-visual-only", components=("visual",))
    family = ClipFamily(ModelStore(tmp_path), SessionOptions(), AIServiceSettings(model_dir=tmp_path))
    assert family.is_installed("test-visual-only", "visual")
    assert not family.is_installed("test-visual-only", "textual")


def test_broken_files_give_load_errors(tmp_path: Path) -> None:
    folder = build_clip_model(tmp_path, "test-broken")
    family = ClipFamily(ModelStore(tmp_path), SessionOptions(), AIServiceSettings(model_dir=tmp_path))
    (folder / "visual" / "preprocess_cfg.json").write_text('{"size": "big"}')
    with pytest.raises(ModelLoadError, match="size"):
        family.load("test-broken", "visual")
    (folder / "textual" / "tokenizer.json").unlink()
    (folder / "textual" / "vocab.txt").unlink()
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json is missing"):
        family.load("test-broken", "textual")
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="JSON object"):
        family.load("test-broken", "textual")


# ---- images -----------------------------------------------------------------------------------------


def test_preprocessing_modes() -> None:
    # Three vertical bands: red | green | blue, 3:1 aspect.
    image = np.zeros((32, 96, 3), np.uint8)
    image[:, :32, 0] = image[:, 32:64, 1] = image[:, 64:, 2] = 255
    crop = ImagePreprocessor(PreprocessConfig(size=16, mean=(0, 0, 0), std=(1, 1, 1)))(image)
    squash = ImagePreprocessor(PreprocessConfig(size=16, mean=(0, 0, 0), std=(1, 1, 1), resize_mode="squash"))(image)
    assert crop.shape == squash.shape == (3, 16, 16) and crop.dtype == np.float32
    # (bicubic rings a little at the band edges, hence the interior columns / means)
    assert crop[1, :, 1:-1].min() > 0.99 and crop[0].mean() < 0.01, "shortest side + center crop keeps the middle band"
    assert squash[0, :, 0].min() > 0.99 and squash[2, :, -1].min() > 0.99, "squash keeps all three bands"
    assert squash[1].mean() < 0.5
    # Normalisation is (x / 255 - mean) / std per channel.
    grey = np.full((20, 20, 3), 51, np.uint8)
    cfg = PreprocessConfig(size=8, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.1))
    out = ImagePreprocessor(cfg)(grey)
    np.testing.assert_allclose(out[:, 0, 0], [(0.2 - 0.1) / 0.5, (0.2 - 0.2) / 0.25, (0.2 - 0.3) / 0.1], atol=1e-5)
    with pytest.raises(ValueError, match="RGB uint8"):
        ImagePreprocessor(cfg)(grey.astype(np.float32))


def _jpeg(width: int, height: int) -> bytes:
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx * 255 // width, yy * 255 // height, ((xx // 90 + yy // 90) % 2) * 200 + 20], -1)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("name", ["test-cn-clip-tiny", "test-clip-336"])
def test_draft_size_decoding_feeds_the_model(family: ClipFamily, name: str) -> None:
    model = _visual(family, name)
    data = _jpeg(1440, 1080)
    draft = decode_image(data, max_pixels=10**8, min_side=model.input_size)
    full = decode_image(data, max_pixels=10**8)
    assert (draft.width, draft.height) == (1440, 1080)
    assert min(draft.rgb.shape[:2]) >= model.input_size and draft.rgb.shape[0] < 1080 / 2
    vector = model.encode_image(draft.rgb)
    assert vector.shape == (model.embedding_size,) and _unit(vector)
    # The model input from a draft decode is the one a full decode gives, up to resampling noise.
    assert float(np.abs(model.preprocess(draft.rgb) - model.preprocess(full.rgb)).mean()) < 0.05


# ---- the cn-clip exporter's layout (no weights needed) ------------------------------------------------


def test_export_layout_loads_through_clip_family(tmp_path: Path) -> None:
    from ai_service.models.export_cn_clip import write_layout

    arch = CN_CLIP_ARCHS["ViT-B-16"]
    vocab = write_vocab(tmp_path / "vocab.txt")
    folder = tmp_path / "models" / "clip" / arch.name
    write_layout(folder, arch, vocab)

    config = json.loads((folder / "config.json").read_text())
    assert config["embed_dim"] == 512 and config["vision_cfg"]["image_size"] == 224
    assert config["text_cfg"]["context_length"] == 52 and config["source"]["normalized_output"] is True
    preprocess = json.loads((folder / "visual" / "preprocess_cfg.json").read_text())
    assert preprocess["size"] == [224, 224] and preprocess["resize_mode"] == "squash"
    assert preprocess["interpolation"] == "bicubic" and preprocess["mean"][0] == pytest.approx(0.48145466)
    assert json.loads((folder / "textual" / "tokenizer_config.json").read_text())["pad_token"] == "[PAD]"
    # tokenizer.json stands on its own (Immich's service loads it with Tokenizer.from_file).
    standalone = Tokenizer.from_file(str(folder / "textual" / "tokenizer.json"))
    for text in TRICKY_TEXTS:
        assert standalone.encode(text).ids == reference_cn_clip_tokenize(text, TINY_CN_VOCAB)

    # Add graphs shaped like the export (int32 text input, 224 px, 512-d) and load them for real.
    vision = VisionSpec(image_size=224, patch_size=32, width=16, layers=1, heads=2, mlp_dim=32, embed_dim=512)
    text = TextSpec(kind="cn-clip", vocab_size=len(TINY_CN_VOCAB), embed_dim=512, input_dtype=np.int32)
    import onnx

    onnx.save_model(visual_graph(vision), str(folder / "visual" / "model.onnx"))
    onnx.save_model(textual_graph(text), str(folder / "textual" / "model.onnx"))
    store = ModelStore(tmp_path / "models")
    family = ClipFamily(store, SessionOptions(), AIServiceSettings(model_dir=store.root))
    assert family.installed() == [arch.name]
    visual, textual = _visual(family, arch.name), _textual(family, arch.name)
    assert (visual.input_size, visual.embedding_size, textual.embedding_size) == (224, 512, 512)
    assert textual.tokenize("一只猫")["text"].dtype == np.int32
    assert _unit(visual.encode_image(_image(1, 300, 200))) and _unit(textual.encode_text("一只猫"))
    store.validate_layout(ModelTask.CLIP, folder)


def test_export_without_the_extra_says_how_to_install_it(tmp_path: Path) -> None:
    from ai_service.models.export_cn_clip import ExportDependencyError, ExportError, export_cn_clip

    try:
        import cn_clip  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("the export extra is installed here")
    store = ModelStore(tmp_path)
    with pytest.raises(ExportError, match="unknown Chinese-CLIP architecture"):
        export_cn_clip("ViT-Z-99", store)
    with pytest.raises(ExportDependencyError, match=r"immich-zh-ai\[export\]"):
        export_cn_clip("ViT-B-16", store)
    assert store.installed(ModelTask.CLIP) == []


@pytest.mark.parametrize(
    ("torchvision_init", "expected"),
    [
        # PyPI's torchvision next to another torch release fails like this at import.
        (
            "raise RuntimeError('operator torchvision::nms does not exist')",
            "importing torchvision failed: RuntimeError: operator torchvision::nms does not exist",
        ),
        (None, "torchvision is missing"),
    ],
    ids=["broken-torchvision", "no-torchvision"],
)
def test_export_turns_every_import_failure_into_the_install_hint(
    tmp_path: Path, torchvision_init: str | None, expected: str
) -> None:
    """A real ``models export-cn-clip`` process whose torchvision import really fails (torch, from the test
    extra, imports fine): exit 1 and one line that says what to install, no traceback."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchvision is installed here")
    path = [str(tmp_path / "site")]
    if torchvision_init is not None:
        package = tmp_path / "site" / "torchvision"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(torchvision_init + "\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "AI_SERVICE_MODEL_DIR": str(tmp_path / "models")}
    proc = subprocess.run(
        [sys.executable, "-m", "ai_service", "models", "export-cn-clip", "--arch", "ViT-B-16"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert expected in proc.stderr and "immich-zh-ai[export]" in proc.stderr
    assert "models pull <arch>__cn-clip" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "models" / "clip").exists()


def test_large_graphs_get_one_external_weights_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over 2 GB (ViT-H-14's image tower) the exporter writes model.onnx + model.onnx_data; the
    loader must find the weights next to the graph."""
    import onnx

    from ai_service.models import export_cn_clip as exporter

    folder = build_clip_model(tmp_path, "test-cn-clip-tiny")
    family = ClipFamily(ModelStore(tmp_path), SessionOptions(), AIServiceSettings(model_dir=tmp_path))
    image = _image(5)
    before = _visual(family, "test-cn-clip-tiny").encode_image(image)

    raw = tmp_path / "scratch" / "model.onnx"
    raw.parent.mkdir()
    (folder / "visual" / "model.onnx").rename(raw)
    monkeypatch.setattr(exporter, "_EXTERNAL_DATA_THRESHOLD", 0)
    exporter._finalise_onnx(onnx, raw, folder / "visual" / "model.onnx")

    assert (folder / "visual" / exporter.EXTERNAL_DATA_FILE).stat().st_size > (
        folder / "visual" / "model.onnx"
    ).stat().st_size
    np.testing.assert_array_equal(_visual(family, "test-cn-clip-tiny").encode_image(image), before)
