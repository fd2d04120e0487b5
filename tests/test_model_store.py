"""Model installs: ``ModelStore.pull`` against a real HTTP server speaking the Hugging Face Hub API,
``ModelStore.install``'s all-or-nothing swap, and the ``models`` CLI. The fake hub is
:class:`tests.fake_hub.FakeHub`.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from ai_service.inference import build_registry
from ai_service.models.base import InvalidModelNameError, ModelError
from ai_service.models.cli import run
from ai_service.models.clip import ClipFamily
from ai_service.models.store import LayoutError, ModelPullError, ModelStore, split_repo_name
from ai_service.protocol.immich import ModelTask, ModelType
from ai_service.runtime.onnx import SessionOptions
from ai_service.settings import AIServiceSettings
from tests.builders.clip_models import build_clip_model
from tests.fake_hub import OWNER, FakeHub, files_of, isolate_hf
from tests.servers import free_port


@pytest.fixture(autouse=True)
def _isolated_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_hf(tmp_path, monkeypatch)


@pytest.fixture()
def hub() -> Iterator[FakeHub]:
    server = FakeHub()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """Two versions of a tiny CLIP model (different weights) and a face pack, as repository files."""
    src = tmp_path_factory.mktemp("repo-src")
    v1 = files_of(build_clip_model(src / "v1", "test-clip-tiny", kind="openclip", seed=1))
    v2 = files_of(build_clip_model(src / "v2", "test-clip-tiny", kind="openclip", seed=2))
    assert v1["visual/model.onnx"] != v2["visual/model.onnx"]
    extras = {
        "visual/model.armnn": b"armnn build we never run",
        "rknn/rk3588/visual/model.rknn": b"rknn build we never run",
        "README.md": b"# model card",
        ".gitattributes": b"*.onnx filter=lfs",
    }
    face = {"detection/model.onnx": b"detector-bytes", "recognition/model.onnx": b"recognizer-bytes"}
    return {"v1": {**v1, **extras}, "v2": v2, "face": face}


def _store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models")


def _pull(store: ModelStore, hub: FakeHub, name: str, **kwargs: object) -> Path:
    return store.pull(name, endpoint=hub.url, repo_owner=OWNER, **kwargs)  # type: ignore[arg-type]


def _incoming_leftovers(store: ModelStore) -> list[str]:
    incoming = store.root / ".incoming"
    return sorted(p.name for p in incoming.iterdir() if not p.name.endswith(".lock")) if incoming.exists() else []


def test_pull_installs_the_layout_and_only_what_the_service_runs(
    tmp_path: Path, hub: FakeHub, model_files: dict[str, dict[str, bytes]]
) -> None:
    hub.add(f"{OWNER}/test-clip-tiny", model_files["v1"])
    store = _store(tmp_path)

    path = _pull(store, hub, "test-clip-tiny")

    assert path == store.model_dir(ModelTask.CLIP, "test-clip-tiny")
    installed = files_of(path)
    expected = {k: v for k, v in model_files["v1"].items() if k.endswith((".onnx", ".json"))}
    assert installed == expected, "exactly the ONNX/JSON files, byte for byte"
    fetched = hub.file_requests()
    assert not any(p.endswith((".armnn", ".rknn", "README.md", ".gitattributes")) for p in fetched)
    assert _incoming_leftovers(store) == []
    assert not (tmp_path / "hf-home").exists() or not any((tmp_path / "hf-home").rglob("*.onnx"))
    # The pulled model loads through the real CLIP code.
    family = ClipFamily(store, SessionOptions(), AIServiceSettings(model_dir=store.root))
    assert family.installed() == ["test-clip-tiny"]
    vector = family.load("test-clip-tiny", "textual").encode_text("a photo of a dog")  # type: ignore[attr-defined]
    assert vector.shape == (16,) and abs(float(np.linalg.norm(vector)) - 1) < 1e-5


def test_pull_infers_the_face_task_and_accepts_owner_slash_name(
    tmp_path: Path, hub: FakeHub, model_files: dict[str, dict[str, bytes]]
) -> None:
    hub.add(f"{OWNER}/buffalo_l", model_files["face"])
    hub.add("someone-else/test-clip-tiny", model_files["v1"])
    store = _store(tmp_path)

    face = _pull(store, hub, "buffalo_l")
    clip = _pull(store, hub, "someone-else/test-clip-tiny")

    assert face == store.model_dir(ModelTask.FACIAL_RECOGNITION, "buffalo_l")
    assert (face / "recognition" / "model.onnx").read_bytes() == b"recognizer-bytes"
    assert clip == store.model_dir(ModelTask.CLIP, "test-clip-tiny")


@pytest.mark.parametrize("failure", ["500", "truncate"])
def test_failed_pull_installs_nothing_and_keeps_the_old_copy(
    tmp_path: Path, hub: FakeHub, model_files: dict[str, dict[str, bytes]], failure: str
) -> None:
    store = _store(tmp_path)
    repo_id = f"{OWNER}/test-clip-tiny"
    hub.add(repo_id, model_files["v1"])
    path = _pull(store, hub, "test-clip-tiny")
    before = files_of(path)

    # A new revision whose biggest file fails mid-way.
    hub.add(repo_id, model_files["v2"], failures={"visual/model.onnx": failure})
    with pytest.raises(ModelPullError) as err:
        _pull(store, hub, "test-clip-tiny")

    assert "left as it was" in str(err.value)
    assert files_of(path) == before, "the installed copy is untouched"
    assert _incoming_leftovers(store) == [], "no staging folder survives"
    family = ClipFamily(store, SessionOptions(), AIServiceSettings(model_dir=store.root))
    assert family.load("test-clip-tiny", "visual").embedding_size == 16  # type: ignore[attr-defined]

    # Once the server recovers, the same pull replaces the model completely.
    hub.add(repo_id, model_files["v2"])
    _pull(store, hub, "test-clip-tiny")
    assert files_of(path) == {k: v for k, v in model_files["v2"].items() if k.endswith((".onnx", ".json"))}
    assert _incoming_leftovers(store) == []


def test_failed_first_pull_leaves_no_model_folder(
    tmp_path: Path, hub: FakeHub, model_files: dict[str, dict[str, bytes]]
) -> None:
    hub.add(f"{OWNER}/test-clip-tiny", model_files["v1"], failures={"textual/model.onnx": "500"})
    store = _store(tmp_path)
    with pytest.raises(ModelPullError, match="HTTP 500"):
        _pull(store, hub, "test-clip-tiny")
    assert not store.model_dir(ModelTask.CLIP, "test-clip-tiny").exists()
    assert store.installed(ModelTask.CLIP) == []


def test_incomplete_repository_is_refused(
    tmp_path: Path, hub: FakeHub, model_files: dict[str, dict[str, bytes]]
) -> None:
    files = {k: v for k, v in model_files["v1"].items() if not k.startswith("textual/model")}
    hub.add(f"{OWNER}/test-clip-tiny", files)
    store = _store(tmp_path)
    with pytest.raises(ModelPullError, match=r"textual/model\.onnx is missing"):
        _pull(store, hub, "test-clip-tiny")
    assert store.installed(ModelTask.CLIP) == []


@pytest.mark.parametrize(
    "name", ["../evil", "a/../b", "/etc/passwd", "owner/repo/extra", "..\\evil", "", "..", "bad name", "x/y:z/w"]
)
def test_names_with_path_tricks_are_refused(tmp_path: Path, hub: FakeHub, name: str) -> None:
    store = _store(tmp_path)
    with pytest.raises(InvalidModelNameError):
        _pull(store, hub, name)
    assert hub.requests == [], "refused before any request"
    assert not (tmp_path / "evil").exists() and not (tmp_path / "models" / "evil").exists()


def test_repository_names_follow_immichs_cleaning() -> None:
    assert split_repo_name("ViT-B-32::openai", "immich-app") == ("immich-app/ViT-B-32__openai", "ViT-B-32__openai")
    assert split_repo_name("me/ViT-B-16__cn-clip", "immich-app") == ("me/ViT-B-16__cn-clip", "ViT-B-16__cn-clip")


def test_offline_mode_gives_a_clear_error(tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    store = _store(tmp_path)
    with pytest.raises(ModelPullError, match="HF_HUB_OFFLINE") as err:
        _pull(store, hub, "test-clip-tiny")
    assert "by hand" in str(err.value)
    assert hub.requests == []


def test_unreachable_endpoint_gives_a_clear_error(tmp_path: Path) -> None:
    store = _store(tmp_path)
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(ModelPullError, match="cannot reach") as err:
        store.pull("test-clip-tiny", endpoint=endpoint, repo_owner=OWNER)
    assert "AI_SERVICE_HF_ENDPOINT" in str(err.value)
    assert store.installed(ModelTask.CLIP) == []


def test_unknown_repository_gives_a_clear_error(tmp_path: Path, hub: FakeHub) -> None:
    with pytest.raises(ModelPullError, match="not found") as err:
        _pull(_store(tmp_path), hub, "no-such-model")
    assert f"{OWNER}/no-such-model" in str(err.value)


def test_saved_tokens_are_not_sent_to_mirrors(
    tmp_path: Path, hub: FakeHub, model_files: dict[str, dict[str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_saved_token_for_huggingface_co")
    hub.add(f"{OWNER}/test-clip-tiny", model_files["v1"])
    _pull(_store(tmp_path), hub, "test-clip-tiny")
    assert all("authorization" not in {k.lower() for k in headers} for _, _, headers in hub.requests)

    hub.requests.clear()
    _pull(_store(tmp_path / "second"), hub, "test-clip-tiny", token="explicit-token")
    sent = {v for _, _, headers in hub.requests for k, v in headers.items() if k.lower() == "authorization"}
    assert sent == {"Bearer explicit-token"}


def test_install_swaps_whole_folders(tmp_path: Path) -> None:
    store = _store(tmp_path)
    with store.staging(ModelTask.CLIP, "test-cn-clip-tiny") as staging:
        folder = build_clip_model(staging, "test-cn-clip-tiny")
        with pytest.raises(LayoutError, match=r"config\.json"):
            broken = staging / "broken"
            broken.mkdir()
            store.install(ModelTask.CLIP, "test-cn-clip-tiny", broken)
        path = store.install(ModelTask.CLIP, "test-cn-clip-tiny", folder)
    assert store.installed(ModelTask.CLIP) == ["test-cn-clip-tiny"]
    assert (path / "textual" / "tokenizer.json").is_file()
    assert _incoming_leftovers(store) == []


# ---- the CLI --------------------------------------------------------------------------------------


def _cli(argv: list[str], settings: AIServiceSettings) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = run(argv, settings)
    return code, out.getvalue(), err.getvalue()


def test_cli_pull_then_list(tmp_path: Path, hub: FakeHub, model_files: dict[str, dict[str, bytes]]) -> None:
    hub.add(f"{OWNER}/test-clip-tiny", model_files["v1"])
    settings = AIServiceSettings(model_dir=tmp_path / "models", hf_endpoint=hub.url, model_repo_owner=OWNER)

    code, out, err = _cli(["pull", "test-clip-tiny"], settings)
    assert code == 0 and "error" not in err  # stderr carries huggingface_hub's progress bars
    assert "installed" in out

    code, out, _ = _cli(["list"], settings)
    assert code == 0
    installed_part, known_part = out.split("clip: known, not installed")
    assert "test-clip-tiny 16-d [textual, visual]" in installed_part
    assert "ViT-B-16__cn-clip 512-d, cn-clip" in known_part
    assert "ViT-B-32__openai 512-d, openclip" in known_part
    assert "XLM-Roberta-Large-Vit-B-32 512-d, mclip" in known_part
    assert "buffalo_l" in out


def test_cli_errors_and_exit_codes(tmp_path: Path) -> None:
    settings = AIServiceSettings(model_dir=tmp_path / "models", hf_endpoint=f"http://127.0.0.1:{free_port()}")
    code, _, err = _cli(["pull", "../../etc"], settings)
    assert code == 1 and "invalid model name" in err
    code, _, err = _cli(["pull", "ViT-B-32__openai"], settings)
    assert code == 1 and "cannot reach" in err
    code, _, _ = _cli(["no-such-command"], settings)
    assert code == 2
    code, _, err = _cli(["export-cn-clip", "--arch", "ViT-B-99"], settings)
    assert code == 2 and "invalid choice" in err


def test_registry_caches_found_models_and_sees_installs_and_removals(tmp_path: Path) -> None:
    """resolve() checks the disk once per model, yet a model installed or removed later (here, or by
    `models pull` in another process) is seen on the next request."""
    store = _store(tmp_path)
    registry = build_registry(AIServiceSettings(model_dir=store.root))
    family = registry.families[ModelTask.CLIP]
    checks: list[str] = []
    real_is_installed = family.is_installed

    def counted(name: str, component: str) -> bool:
        checks.append(name)
        return real_is_installed(name, component)

    family.is_installed = counted  # type: ignore[method-assign]
    with pytest.raises(ModelError):
        registry.resolve(ModelTask.CLIP, ModelType.TEXTUAL, "test-cn-clip-tiny")
    with store.staging(ModelTask.CLIP, "test-cn-clip-tiny") as staging:
        store.install(ModelTask.CLIP, "test-cn-clip-tiny", build_clip_model(staging, "test-cn-clip-tiny"))
    ref = registry.resolve(ModelTask.CLIP, ModelType.TEXTUAL, "test-cn-clip-tiny")
    assert registry.resolve(ModelTask.CLIP, ModelType.TEXTUAL, "test-cn-clip-tiny") == ref
    assert len(checks) == 2, "the second request for an installed model is answered without the disk checks"
    shutil.rmtree(store.root / "clip" / "test-cn-clip-tiny")
    with pytest.raises(ModelError):
        registry.resolve(ModelTask.CLIP, ModelType.TEXTUAL, "test-cn-clip-tiny")
