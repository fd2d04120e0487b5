"""Chinese-CLIP without torch: ``models pull ViT-B-16__cn-clip`` converts a transformers.js ONNX export.

The repository is made here the way the ``Xenova/chinese-clip-vit-*`` ones were made: a (tiny,
random-weight) ``transformers.ChineseCLIPModel`` exported to one combined graph with optimum's input
and output names, plus quantised and float16 variants, its BERT tokenizer and image processor
settings (tests/builders/transformers_js_clip.py). It is served by the fake hub, pulled with the
service's real code, and the result is compared with the reference implementation: token ids with
transformers' BertTokenizer, vectors with ``get_text_features`` / ``get_image_features``.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from PIL import Image

from ai_service.models import install
from ai_service.models.base import InvalidModelNameError
from ai_service.models.cli import run
from ai_service.models.clip import ClipFamily, ClipTextualEncoder, ClipVisualEncoder
from ai_service.models.clip import transformers_js as tjs
from ai_service.models.clip.transformers_js import ConversionError
from ai_service.models.store import ModelPullError, ModelStore
from ai_service.protocol.immich import ModelTask
from ai_service.runtime.onnx import SessionOptions
from ai_service.settings import AIServiceSettings
from tests import immich_requests as im
from tests.builders.transformers_js_clip import TinyChineseClip, build_transformers_js_repo, export_combined
from tests.fake_hub import FakeHub, isolate_hf
from tests.servers import python_module_server

REPO = "test-xenova/chinese-clip-vit-base-patch16"
NAME = "ViT-B-16__cn-clip"
QUERIES = [
    "",
    "一只猫",
    "海滩上的一只狗 a dog on the beach",
    "Hello, World! naïve café 123",
    "unaffable cats playing",
    "春节放鞭炮，长城雪景；夜晚城市灯光 sunset over sea",
    "未知字符 and unknown words",  # characters and words the vocabulary lacks: [UNK]
    "我爱北京天安门" * 10,  # longer than the context: truncated to [CLS] + 50 + [SEP]
    "  \t多个   空格\n",
]
MIN_COSINE = 0.999


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyChineseClip:
    """Built once per session (about 10 s, most of it importing torch and transformers)."""
    return build_transformers_js_repo(tmp_path_factory.mktemp("transformers-js-repo"))


@pytest.fixture(autouse=True)
def _isolated_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_hf(tmp_path, monkeypatch)


@pytest.fixture()
def hub(tiny: TinyChineseClip) -> Iterator[FakeHub]:
    server = FakeHub()
    server.add(REPO, tiny.files)
    try:
        yield server
    finally:
        server.close()


def _settings(tmp_path: Path, hub: FakeHub, **kwargs: object) -> AIServiceSettings:
    return AIServiceSettings(
        model_dir=tmp_path / "models",
        hf_endpoint=hub.url,
        model_repo_owner="immich-app-test",
        cn_clip_repos={NAME: REPO},
        **kwargs,  # type: ignore[arg-type]
    )


def _load(store: ModelStore, name: str = NAME) -> tuple[ClipTextualEncoder, ClipVisualEncoder]:
    family = ClipFamily(store, SessionOptions(), AIServiceSettings(model_dir=store.root))
    textual, visual = family.load(name, "textual"), family.load(name, "visual")
    assert isinstance(textual, ClipTextualEncoder) and isinstance(visual, ClipVisualEncoder)
    return textual, visual


def _images(size: int) -> list[np.ndarray]:
    """A gradient, noise, and a non-square picture (so that the resize is not a no-op)."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:size, 0:size]
    gradient = np.stack([xx * 255 // size, yy * 255 // size, (xx + yy) * 255 // (2 * size)], -1).astype(np.uint8)
    noise = rng.integers(0, 256, (size + 37, size - 11, 3), dtype=np.uint8)
    scene = np.zeros((300, 200, 3), np.uint8)
    scene[:150] = (70, 130, 200)
    scene[150:] = (200, 180, 120)
    scene[100:160, 50:100] = (250, 250, 250)
    return [gradient, noise, scene]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _incoming(store: ModelStore) -> list[str]:
    folder = store.root / ".incoming"
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) if folder.exists() else []


# ---- parity with transformers ------------------------------------------------------------------------------


def test_pull_converts_the_export_and_matches_transformers(tmp_path: Path, hub: FakeHub, tiny: TinyChineseClip) -> None:
    settings = _settings(tmp_path, hub)
    store = ModelStore(settings.model_dir)

    started = time.perf_counter()
    path = install.pull_model(store, settings, NAME)
    elapsed = time.perf_counter() - started
    print(f"pull + convert of the tiny model: {elapsed:.2f} s")

    assert path == store.model_dir(ModelTask.CLIP, NAME)
    installed = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert installed == [
        "config.json",
        "textual/model.onnx",
        "textual/tokenizer.json",
        "textual/tokenizer_config.json",
        "textual/vocab.txt",
        "visual/model.onnx",
        "visual/preprocess_cfg.json",
    ]
    assert _incoming(store) == [], "the staging folder is gone"
    fetched = hub.file_requests()
    assert any(p.endswith("/onnx/model.onnx") for p in fetched)
    assert not any("model_fp16" in p or "model_quantized" in p for p in fetched), "only the chosen variant"

    # Immich's layout, as export-cn-clip writes it: one int32 "text" input, one "image" input.
    text_graph = onnx.load(str(path / "textual" / "model.onnx"))
    text_inputs = [(i.name, i.type.tensor_type.elem_type) for i in text_graph.graph.input]
    assert text_inputs == [("text", onnx.TensorProto.INT32)]
    image_graph = onnx.load(str(path / "visual" / "model.onnx"))
    assert [i.name for i in image_graph.graph.input] == ["image"]
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    assert config["embed_dim"] == 512 and config["text_cfg"]["context_length"] == 52
    assert config["source"]["repository"] == REPO and config["source"]["variant"] == "fp32"
    preprocess = json.loads((path / "visual" / "preprocess_cfg.json").read_text(encoding="utf-8"))
    assert preprocess["resize_mode"] == "squash" and preprocess["size"] == [224, 224]

    textual, visual = _load(store)
    assert textual.kind == "cn-clip" and textual.embedding_size == visual.embedding_size == 512

    # Token ids: identical to transformers' BertTokenizer (slow and fast) at Chinese-CLIP's context length.
    for query in QUERIES:
        ours = textual.tokenize(query)["text"][0].tolist()
        for reference in (tiny.tokenizer, tiny.fast_tokenizer):
            theirs = reference(query, padding="max_length", max_length=52, truncation=True)["input_ids"]
            assert ours == theirs, f"{query!r}: {ours} != {theirs} ({type(reference).__name__})"

    # Text vectors: the service's encoder against get_text_features.
    expected_text = tiny.text_features(QUERIES)
    ours_text = np.stack([textual.encode_text(q) for q in QUERIES])
    assert _cosines(ours_text, expected_text).min() >= MIN_COSINE
    assert np.allclose(textual.encode_texts(QUERIES), ours_text, atol=1e-5), "batched = one by one"

    # Images: the service's preprocessing against transformers' image processor, then get_image_features.
    images = _images(224)
    pixels, expected_image = tiny.image_features(images)
    ours_pixels = np.stack([visual.preprocess(image) for image in images])
    assert np.abs(ours_pixels - pixels).max() < 1e-4, "preprocessing: squash resize, OpenAI mean/std"
    assert _cosines(visual.run(pixels), expected_image).min() >= 0.9999, "the graph itself"
    ours_image = np.stack([visual.encode_image(image) for image in images])
    assert _cosines(ours_image, expected_image).min() >= MIN_COSINE


@pytest.mark.parametrize(("variant", "min_cosine"), [("quantized", 0.99), ("fp16", 0.999)])
def test_variants_are_chosen_by_the_setting(
    tmp_path: Path, hub: FakeHub, tiny: TinyChineseClip, variant: str, min_cosine: float
) -> None:
    settings = _settings(tmp_path, hub, cn_clip_variant=variant)
    store = ModelStore(settings.model_dir)
    path = install.pull_model(store, settings, NAME)

    stem = tjs.VARIANT_STEMS[variant]
    graphs = [p.rsplit("/", 1)[1] for p in hub.file_requests() if "/onnx/" in p]
    assert graphs == [f"{stem}.onnx"]
    assert json.loads((path / "config.json").read_text(encoding="utf-8"))["source"]["variant"] == variant
    # The fp16 graph takes and returns float16; the installed towers take and return float32 all the same.
    textual, visual = _load(store)
    for graph in (textual.session, visual.session):
        assert {a.type for a in graph.get_outputs()} == {"tensor(float)"}
    assert visual.session.get_inputs()[0].type == "tensor(float)"
    queries = QUERIES[1:4]
    assert _cosines(textual.encode_texts(queries), tiny.text_features(queries)).min() >= min_cosine
    images = _images(224)
    _, expected = tiny.image_features(images)
    assert _cosines(visual.encode_images(images), expected).min() >= min_cosine


def test_other_spellings_of_an_export(tmp_path: Path, tiny: TinyChineseClip) -> None:
    """An export whose graph also takes token_type_ids, and a repository with tokenizer.json but no vocab.txt."""
    graph = tmp_path / "model.onnx"
    export_combined(tiny.model, graph, tiny.image_size, token_type_ids=True)
    assert "token_type_ids" in {i.name for i in onnx.load(str(graph)).graph.input}
    files = {k: v for k, v in tiny.files.items() if k != "vocab.txt"}
    files["onnx/model.onnx"] = graph.read_bytes()
    hub = FakeHub()
    try:
        hub.add(REPO, files)
        settings = _settings(tmp_path, hub)
        store = ModelStore(settings.model_dir)
        install.pull_model(store, settings, NAME)
    finally:
        hub.close()
    textual, _ = _load(store)
    for query in QUERIES:
        expected = tiny.tokenizer(query, padding="max_length", max_length=52, truncation=True)["input_ids"]
        assert textual.tokenize(query)["text"][0].tolist() == expected, query
    assert _cosines(textual.encode_texts(QUERIES), tiny.text_features(QUERIES)).min() >= MIN_COSINE


# ---- the CLI, aliases, and the service ---------------------------------------------------------------------


def _cli(argv: list[str], settings: AIServiceSettings) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = run(argv, settings)
    return code, out.getvalue(), err.getvalue()


def test_cli_pull_of_an_alias_then_predict_through_the_service(
    tmp_path: Path, hub: FakeHub, tiny: TinyChineseClip
) -> None:
    settings = _settings(tmp_path, hub)
    code, out, err = _cli(["list", "--task", "clip"], settings)
    assert code == 0 and f"{NAME} 512-d, cn-clip (models pull, or models export-cn-clip)" in out
    assert "ViT-H-14__cn-clip 1024-d, cn-clip (models export-cn-clip)" in out

    code, out, err = _cli(["pull", "chinese-clip-vit-base-patch16"], settings)
    assert code == 0, err
    assert f"installed {settings.model_dir / 'clip' / NAME}" in out
    code, out, _ = _cli(["list", "--task", "clip"], settings)
    assert f"{NAME} 512-d [textual, visual]" in out.split("known, not installed")[0]

    env = {"AI_SERVICE_MODEL_DIR": str(settings.model_dir), "AI_SERVICE_MODEL_TTL": "0"}
    image = _images(224)[2]
    png = io.BytesIO()
    Image.fromarray(image).save(png, "PNG")
    query = QUERIES[2]
    log = tmp_path / "ai_service.log"
    with python_module_server("ai_service", env, log=log) as base, httpx.Client(timeout=60) as c:
        text_reply = im.predict(c, base, im.clip_textual(NAME), text=query)
        image_reply = im.predict(c, base, im.clip_visual(NAME), image=png.getvalue())
    assert text_reply.status_code == 200, text_reply.text
    assert image_reply.status_code == 200, image_reply.text
    text_vector = np.array(im.parse_embedding(text_reply.json()["clip"]))
    image_vector = np.array(im.parse_embedding(image_reply.json()["clip"]))
    assert _cosines(text_vector, tiny.text_features([query])[0]) >= MIN_COSINE
    assert _cosines(image_vector, tiny.image_features([image])[1][0]) >= MIN_COSINE


def test_without_a_repo_the_name_is_pulled_as_an_immich_layout_model(tmp_path: Path, hub: FakeHub) -> None:
    settings = _settings(tmp_path, hub).model_copy(update={"cn_clip_repos": {NAME: ""}})
    with pytest.raises(ModelPullError, match=rf"immich-app-test/{NAME} was not found"):
        install.pull_model(ModelStore(settings.model_dir), settings, NAME)
    assert all(REPO not in p for _, p, _ in hub.requests)


def test_settings_merge_repos_over_the_defaults() -> None:
    settings = AIServiceSettings(cn_clip_repos={NAME: "me/my-export"})
    assert settings.cn_clip_repos[NAME] == "me/my-export"
    assert settings.cn_clip_repos["ViT-L-14__cn-clip"] == "Xenova/chinese-clip-vit-large-patch14"
    assert AIServiceSettings().cn_clip_repos["ViT-L-14-336__cn-clip"] == "Xenova/chinese-clip-vit-large-patch14-336px"
    with pytest.raises(ValueError, match="ending in __cn-clip"):
        AIServiceSettings(cn_clip_repos={"ViT-B-32__openai": "me/x"})
    with pytest.raises(ValueError, match="OWNER/NAME"):
        AIServiceSettings(cn_clip_repos={NAME: "../../etc"})


def test_a_configured_name_that_is_not_a_folder_name_is_refused(tmp_path: Path, hub: FakeHub) -> None:
    settings = _settings(tmp_path, hub).model_copy(update={"cn_clip_repos": {"a.b__cn-clip": REPO}})
    with pytest.raises(InvalidModelNameError):
        install.pull_model(ModelStore(settings.model_dir), settings, "a.b__cn-clip")
    assert hub.requests == []


# ---- failures install nothing ----------------------------------------------------------------------------


def test_a_download_cut_mid_file_installs_nothing_and_the_next_pull_works(
    tmp_path: Path, tiny: TinyChineseClip
) -> None:
    hub = FakeHub()
    try:
        hub.add(REPO, tiny.files, failures={"onnx/model.onnx": "truncate"})
        settings = _settings(tmp_path, hub)
        store = ModelStore(settings.model_dir)
        with pytest.raises(ModelPullError, match="Nothing was installed"):
            install.pull_model(store, settings, NAME)
        assert not store.model_dir(ModelTask.CLIP, NAME).exists()
        assert store.installed(ModelTask.CLIP) == [] and _incoming(store) == []

        hub.add(REPO, tiny.files)  # the server recovers
        path = install.pull_model(store, settings, NAME)
        assert store.installed(ModelTask.CLIP) == [NAME] and _incoming(store) == []
        textual, _ = _load(store)
        assert _cosines(textual.encode_text("一只猫"), tiny.text_features(["一只猫"])[0]) >= MIN_COSINE
        assert (path / "visual" / "model.onnx").is_file()
    finally:
        hub.close()


def test_a_model_of_the_wrong_size_is_refused(tmp_path: Path, hub: FakeHub) -> None:
    # A 512-d export configured for ViT-L-14 (768-d in Immich's database): refused before anything is installed.
    settings = _settings(tmp_path, hub).model_copy(update={"cn_clip_repos": {"ViT-L-14__cn-clip": REPO}})
    store = ModelStore(settings.model_dir)
    with pytest.raises(ConversionError, match=r"512-d vectors but ViT-L-14__cn-clip is 768-d"):
        install.pull_model(store, settings, "ViT-L-14__cn-clip")
    assert store.installed(ModelTask.CLIP) == [] and _incoming(store) == []


def test_a_missing_variant_and_a_graph_that_is_not_combined_are_clear_errors(
    tmp_path: Path, hub: FakeHub, tiny: TinyChineseClip
) -> None:
    without_fp16 = {k: v for k, v in tiny.files.items() if "fp16" not in k}
    hub.add(REPO, without_fp16)
    settings = _settings(tmp_path, hub, cn_clip_variant="fp16")
    store = ModelStore(settings.model_dir)
    with pytest.raises(ConversionError, match=r"no onnx/model_fp16\.onnx.*AI_SERVICE_CN_CLIP_VARIANT"):
        install.pull_model(store, settings, NAME)

    # The image tower alone where the combined graph should be.
    combined = onnx.load_from_string(tiny.files["onnx/model.onnx"])
    image_only = onnx.utils.Extractor(combined).extract_model(["pixel_values"], ["image_embeds"])
    hub.add(REPO, {**tiny.files, "onnx/model.onnx": image_only.SerializeToString()})
    with pytest.raises(ConversionError, match="not a combined CLIP graph: it lacks input_ids, text_embeds"):
        install.pull_model(store, settings.model_copy(update={"cn_clip_variant": "fp32"}), NAME)
    assert store.installed(ModelTask.CLIP) == [] and _incoming(store) == []


def test_external_weights_in_the_source_and_the_result(
    tmp_path: Path, tiny: TinyChineseClip, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Graphs over 2 GB keep their weights in a side file, on the hub and once installed; the same code
    paths are taken here by a tiny model whose weights were saved aside and a threshold set low."""
    combined = onnx.load_from_string(tiny.files["onnx/model.onnx"])
    source = tmp_path / "source"
    source.mkdir()
    onnx.save_model(
        combined, str(source / "model.onnx"), save_as_external_data=True, location="model.onnx_data", size_threshold=0
    )
    files = {k: v for k, v in tiny.files.items() if not k.startswith("onnx/")}
    files["onnx/model.onnx"] = (source / "model.onnx").read_bytes()
    files["onnx/model.onnx_data"] = (source / "model.onnx_data").read_bytes()
    assert len(files["onnx/model.onnx"]) < len(files["onnx/model.onnx_data"])
    monkeypatch.setattr(tjs, "EXTERNAL_DATA_THRESHOLD", 50_000)
    hub = FakeHub()
    try:
        hub.add(REPO, files)
        settings = _settings(tmp_path, hub)
        store = ModelStore(settings.model_dir)
        path = install.pull_model(store, settings, NAME)
    finally:
        hub.close()
    for part in ("textual", "visual"):
        graph, weights = path / part / "model.onnx", path / part / tjs.EXTERNAL_DATA_FILE
        assert weights.stat().st_size > 50_000 and graph.stat().st_size < weights.stat().st_size
    textual, visual = _load(store)
    assert _cosines(textual.encode_texts(QUERIES), tiny.text_features(QUERIES)).min() >= MIN_COSINE
    images = _images(224)
    assert _cosines(visual.encode_images(images), tiny.image_features(images)[1]).min() >= MIN_COSINE


def test_first_use_downloads_and_converts_the_export(tmp_path: Path, hub: FakeHub, tiny: TinyChineseClip) -> None:
    """Nothing installed: an MT Photos /clip/txt call (its default model is ViT-B-16__cn-clip) and an
    Immich /predict both trigger the download and conversion, once, then match transformers."""
    env = {
        "AI_SERVICE_MODEL_DIR": str(tmp_path / "models"),
        "AI_SERVICE_MODEL_TTL": "0",
        "AI_SERVICE_HF_ENDPOINT": hub.url,
        "AI_SERVICE_CN_CLIP_REPOS": json.dumps({NAME: REPO}),
        "AI_SERVICE_MTPHOTOS_API_KEY": "test-key",
        "HF_HOME": str(tmp_path / "hf-home"),
    }
    query = QUERIES[1]
    with python_module_server("ai_service", env, log=tmp_path / "ai.log") as base, httpx.Client(timeout=120) as c:
        mt = c.post(f"{base}/clip/txt", json={"text": query}, headers={"api-key": "test-key"})
        immich = im.predict(c, base, im.clip_textual(NAME), text=query)
    assert mt.status_code == 200, mt.text
    assert immich.status_code == 200, immich.text
    reference = tiny.text_features([query])[0]
    assert _cosines(np.array(mt.json()["result"], dtype=np.float32), reference) >= MIN_COSINE
    assert _cosines(np.array(im.parse_embedding(immich.json()["clip"])), reference) >= MIN_COSINE
    graph_downloads = [p for m, p, _ in hub.requests if m == "GET" and p.endswith("onnx/model.onnx")]
    assert len(graph_downloads) == 1, graph_downloads
