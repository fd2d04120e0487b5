"""The model folder, in Immich's cache layout: ``<root>/<task>/<name>/<type>/model.onnx``.

Pointing ``AI_SERVICE_MODEL_DIR`` at an immich-machine-learning cache folder reuses the models it
already downloaded. Names reaching this module are already cleaned (see ``base.clean_name``), so a
path built here never leaves ``root``.

Installing (``pull`` from a Hugging Face-compatible endpoint, or ``install`` of a folder the cn-clip
exporter or the transformers.js converter wrote, the latter after ``download_snapshot``) is
all-or-nothing: files land in a staging folder under ``<root>/.incoming/`` (same filesystem, so the
final move is a rename), the layout is checked, and only then is the folder renamed into place. An
existing copy stays where it is until the new one is complete, and a failed
or interrupted install leaves nothing under ``<root>/<task>/``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ai_service.errors import UpstreamFailed
from ai_service.models.base import InvalidModelNameError, ModelError, ModelLoadError, clean_name
from ai_service.protocol.immich import ModelTask
from ai_service.protocol.immich_face_models import INSIGHTFACE_PACKS

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
INCOMING_DIR = ".incoming"


# The parts every installed model of a task must have.
REQUIRED_COMPONENTS: dict[str, tuple[str, ...]] = {
    str(ModelTask.CLIP): ("visual", "textual"),
    str(ModelTask.FACIAL_RECOGNITION): ("detection", "recognition"),
}

# What a pull downloads: ONNX graphs (with external weights for >2 GB models), JSON configs and
# tokenizer vocabularies. Immich's repos also carry ARM NN and RKNN builds we never run.
PULL_ALLOW_PATTERNS = ["*.onnx", "*.onnx_data", "*.onnx.data", "*.json", "*.txt"]
PULL_IGNORE_PATTERNS = ["*.armnn", "*.rknn", "rknn/*", "*/rknn/*", ".gitattributes", "README*"]

# An owner or repository name on the endpoint (Hugging Face's rules, minus anything path-like).
_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]{0,95}$")
_OFFICIAL_HUB_HOSTS = ("huggingface.co", "hf.co")


class ModelPullError(ModelError, UpstreamFailed):
    """Downloading a model failed; nothing was installed. The message says what to do."""


class InstallBusyError(ModelPullError):
    """Another install of the same model (maybe in another process) is running."""


class LayoutError(ModelLoadError):
    """A folder does not have the files its task needs."""


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()

    def model_dir(self, task: ModelTask | str, name: str) -> Path:
        path = (self.root / str(task) / name).resolve()
        root = self.root.resolve()
        if root not in path.parents:
            raise ValueError(f"model path {path} escapes the model folder {root}")
        return path

    def stamp(self, task: ModelTask | str) -> int:
        """Changes whenever a model folder of ``task`` is added, replaced or removed (the folder's mtime,
        in ns; -1 while it does not exist). One stat: cheap enough to check on every request."""
        try:
            return os.stat(self.root / str(task)).st_mtime_ns
        except OSError:
            return -1

    def has_files(self, task: ModelTask | str, name: str, types: tuple[str, ...]) -> bool:
        base = self.model_dir(task, name)
        return all((base / t / MODEL_FILE).is_file() for t in types)

    def installed(self, task: ModelTask | str) -> list[str]:
        """Names under ``<root>/<task>/`` that hold at least one ``<type>/model.onnx``."""
        task_dir = self.root / str(task)
        if not task_dir.is_dir():
            return []
        return sorted(d.name for d in task_dir.iterdir() if d.is_dir() and any(d.glob(f"*/{MODEL_FILE}")))

    # ---- installing ------------------------------------------------------------------------------

    @staticmethod
    def infer_task(name: str) -> ModelTask:
        """The task a bare name belongs to: Immich's face packs are face models, the rest CLIP."""
        return ModelTask.FACIAL_RECOGNITION if name in INSIGHTFACE_PACKS else ModelTask.CLIP

    def validate_layout(self, task: ModelTask | str, folder: Path) -> None:
        """Raise :class:`LayoutError` unless ``folder`` holds a complete model of ``task``."""
        task = str(task)
        if not folder.is_dir():
            raise LayoutError(f"{folder} is not a folder")
        links = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_symlink()]
        if links:
            raise LayoutError(f"{folder} contains symbolic links ({', '.join(links[:3])}); refusing to install it")
        problems = []
        for component in REQUIRED_COMPONENTS.get(task, ()):
            graph = folder / component / MODEL_FILE
            if not graph.is_file():
                problems.append(f"{component}/{MODEL_FILE} is missing")
            elif graph.stat().st_size == 0:
                problems.append(f"{component}/{MODEL_FILE} is empty")
        for json_file in sorted(folder.rglob("*.json")):
            try:
                json.loads(json_file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                problems.append(f"{json_file.relative_to(folder)} is not valid JSON ({exc})")
        if task == str(ModelTask.CLIP):
            config = folder / "config.json"
            if not config.is_file():
                problems.append("config.json is missing")
            elif not problems and not isinstance(json.loads(config.read_text(encoding="utf-8")), dict):
                problems.append("config.json is not a JSON object")
            textual = folder / "textual"
            if textual.is_dir() and not any((textual / f).is_file() for f in ("tokenizer.json", "vocab.txt")):
                problems.append("textual/tokenizer.json is missing")
            visual = folder / "visual"
            if visual.is_dir() and not (visual / "preprocess_cfg.json").is_file():
                problems.append("visual/preprocess_cfg.json is missing")
        if problems:
            raise LayoutError(f"not a complete {task} model: {'; '.join(problems)}")

    @contextlib.contextmanager
    def staging(self, task: ModelTask | str, name: str) -> Iterator[Path]:
        """An empty folder to assemble ``name`` in, removed afterwards whatever happens.

        Only one install of a given model runs at a time (a lock file); leftovers of an earlier
        install of the same model that was killed are removed first."""
        clean_name(name)  # a staging name is a path component: same rule as model names
        task = str(task)
        incoming = self.root / INCOMING_DIR
        incoming.mkdir(parents=True, exist_ok=True)
        # "." never occurs in a cleaned name or a task, so these globs cannot match another model.
        prefix = f"{task}.{name}."
        with _exclusive_lock(incoming / f"{prefix}lock", f"{task} model '{name}'"):
            for stale in incoming.glob(f"{prefix}pull-*"):
                shutil.rmtree(stale, ignore_errors=True)
            path = Path(tempfile.mkdtemp(prefix=f"{prefix}pull-", dir=incoming))
            try:
                yield path
            finally:
                shutil.rmtree(path, ignore_errors=True)

    def install(self, task: ModelTask | str, name: str, folder: Path) -> Path:
        """Move a complete model folder (inside :meth:`staging`) to ``<root>/<task>/<name>``.

        The old copy is renamed aside, the new one renamed in, then the old one deleted; the two
        renames are the only moment the name is absent, and a failure there puts the old copy back."""
        self.validate_layout(task, folder)
        target = self.model_dir(task, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        previous = folder.parent / f"{folder.name}.previous"
        had_previous = target.exists()
        if had_previous:
            os.replace(target, previous)
        try:
            os.replace(folder, target)
        except OSError:
            if had_previous:
                os.replace(previous, target)
            raise
        if had_previous:
            shutil.rmtree(previous, ignore_errors=True)
        log.info("installed %s model %s at %s", task, name, target)
        return target

    def pull(
        self,
        name: str,
        task: ModelTask | str | None = None,
        *,
        endpoint: str,
        repo_owner: str,
        token: str | None = None,
        revision: str | None = None,
    ) -> Path:
        """Download ``<repo_owner>/<name>`` (or ``name`` when it is ``owner/repo``) from a Hugging
        Face-compatible ``endpoint`` and install it as ``<root>/<task>/<name>``; returns that path.

        Without an explicit ``token`` a token saved for huggingface.co is only sent to
        huggingface.co, never to a mirror."""
        repo_id, local_name = split_repo_name(name, repo_owner)
        task = ModelTask(task) if task is not None else self.infer_task(local_name)
        if str(task) not in REQUIRED_COMPONENTS:
            raise ModelPullError(
                f"{task} models are not pulled from a model endpoint (OCR models are fetched by RapidOCR)"
            )
        target = self.model_dir(task, local_name)
        with self.staging(task, local_name) as staging:
            files = download_snapshot(
                repo_id,
                staging,
                endpoint=endpoint,
                token=token,
                revision=revision,
                allow_patterns=PULL_ALLOW_PATTERNS,
                ignore_patterns=PULL_IGNORE_PATTERNS,
                target=target,
            )
            try:
                return self.install(task, local_name, files)
            except LayoutError as exc:
                raise ModelPullError(
                    f"{endpoint}/{repo_id} is not a usable {task} model: {exc}.{_kept(target)}"
                ) from exc


def _kept(target: Path) -> str:
    return f" The installed copy at {target} was left as it was." if target.exists() else ""


def download_snapshot(
    repo_id: str,
    staging: Path,
    *,
    endpoint: str,
    token: str | None,
    revision: str | None,
    allow_patterns: list[str],
    ignore_patterns: list[str] | None = None,
    target: Path,
    repo_setting: str = "AI_SERVICE_MODEL_REPO_OWNER",
) -> Path:
    """Download the matching files of ``repo_id`` into ``staging/download`` (returned) and nothing else
    anywhere: huggingface_hub's cache and partial files stay inside ``staging`` too, so the folder's
    size is the download's progress and a cut download vanishes with it.

    ``target`` (where the model will be installed) and ``repo_setting`` (the setting that names the
    repository) only shape the error messages. Without an explicit ``token`` a token saved for
    huggingface.co is only sent to huggingface.co, never to a mirror."""
    kept = _kept(target)
    if _hub_offline():
        raise ModelPullError(
            f"cannot download {repo_id}: Hugging Face downloads are switched off (HF_HUB_OFFLINE is set). "
            f"Unset HF_HUB_OFFLINE, or copy the model folder to {target} by hand.{kept}"
        )
    if token is None and urlparse(endpoint).hostname not in _OFFICIAL_HUB_HOSTS:
        send_token: str | bool | None = False
    else:
        send_token = token
    from huggingface_hub import snapshot_download  # imported here: only downloads need it

    files = staging / "download"
    try:
        snapshot_download(
            repo_id,
            revision=revision,
            endpoint=endpoint.rstrip("/"),
            token=send_token,
            local_dir=files,
            # Keep huggingface_hub's own cache inside the staging folder: the model folder is
            # the only copy we keep, and a half-finished download disappears with staging.
            cache_dir=staging / "hf-cache",
            allow_patterns=allow_patterns,
            ignore_patterns=ignore_patterns,
        )
    except Exception as exc:  # huggingface_hub raises many types across versions
        message = _describe_download_error(exc, repo_id, endpoint, target, repo_setting)
        raise ModelPullError(f"{message}{kept}") from exc
    # huggingface_hub's bookkeeping for local_dir downloads; not part of the model.
    shutil.rmtree(files / ".cache", ignore_errors=True)
    if not files.is_dir() or not any(files.iterdir()):
        raise ModelPullError(f"{endpoint}/{repo_id} has none of the files needed ({', '.join(allow_patterns)}).{kept}")
    return files


_hub_timeout_s: float | None = None


class _BoundedTimeouts:
    """Wraps the transport of huggingface_hub's HTTP client so that no wait is unbounded.

    huggingface_hub passes ``timeout=None`` on some calls (the repository listing of
    ``snapshot_download``), which overrides any client default: a hub that accepts connections but never
    answers would hang a download, and every request waiting for it, forever. The transport sees each
    request's timeouts and caps them. A read timeout is per read, so a slow but moving download is never cut."""

    def __init__(self, inner: Any, seconds: float) -> None:
        self.inner = inner
        self.seconds = seconds

    def handle_request(self, request: Any) -> Any:
        asked = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {
            key: min(asked[key], self.seconds) if asked.get(key) else self.seconds
            for key in ("connect", "read", "write", "pool")
        }
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> _BoundedTimeouts:
        self.inner.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.__exit__(*exc)


def set_hub_timeout(seconds: float) -> None:
    """Bound every network wait of huggingface_hub (connect, each read, write) to ``seconds``."""
    global _hub_timeout_s
    if _hub_timeout_s == seconds:
        return
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    default_factory = _http.default_client_factory

    def factory() -> Any:
        client = default_factory()
        # httpx's transport attribute (the same in huggingface_hub's httpx fork); the proxies' mounts too.
        client._transport = _BoundedTimeouts(client._transport, seconds)
        client._mounts = {pattern: _BoundedTimeouts(t, seconds) if t else t for pattern, t in client._mounts.items()}
        return client

    set_client_factory(factory)
    _hub_timeout_s = seconds


def split_repo_name(name: str, repo_owner: str) -> tuple[str, str]:
    """``NAME`` or ``OWNER/NAME`` -> (repository id on the endpoint, local folder name).

    The repository part goes through Immich's ``clean_name`` (``ViT-B-32::openai`` ->
    ``ViT-B-32__openai``); anything path-like (``..``, ``\\``, absolute paths, more than one ``/``)
    is refused rather than cleaned, since a pull writes files."""
    if not name or "\\" in name or ".." in name or name.startswith("/") or name.count("/") > 1:
        raise InvalidModelNameError(f"invalid model name {name!r}: expected NAME or OWNER/NAME")
    owner, _, repo = name.rpartition("/")
    owner = owner or repo_owner
    local_name = clean_name(repo)
    if not _REPO_PART.fullmatch(owner) or ".." in owner:
        raise InvalidModelNameError(f"invalid repository owner {owner!r}")
    return f"{owner}/{local_name}", local_name


def _hub_offline() -> bool:
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if callable(check) else getattr(constants, "HF_HUB_OFFLINE", False))


def _error_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _describe_download_error(
    exc: Exception, repo_id: str, endpoint: str, target: Path, repo_setting: str = "AI_SERVICE_MODEL_REPO_OWNER"
) -> str:
    """A message a user can act on, from whatever huggingface_hub (any version) raised."""
    chain = _error_chain(exc)
    names = {cls.__name__ for e in chain for cls in type(e).__mro__}
    url = f"{endpoint.rstrip('/')}/{repo_id}"
    by_hand = f"copy the model folder to {target} by hand"
    status = None
    for e in chain:
        response = getattr(e, "response", None)
        status = getattr(response, "status_code", None)
        if status is not None:
            break
    if "OfflineModeIsEnabled" in names:
        return (
            f"cannot download {repo_id}: Hugging Face downloads are switched off (HF_HUB_OFFLINE). "
            f"Unset it, or {by_hand}."
        )
    if "GatedRepoError" in names or status in (401, 403):
        return f"{url} refused access (HTTP {status or 'gated'}); set AI_SERVICE_HF_TOKEN to a token that may read it."
    if "RepositoryNotFoundError" in names or "RevisionNotFoundError" in names or status == 404:
        return (
            f"{url} was not found on the endpoint (HTTP 404). Check the name, {repo_setting} and "
            "AI_SERVICE_HF_ENDPOINT; a private repository also needs AI_SERVICE_HF_TOKEN."
        )
    network = {"ConnectError", "ConnectionError", "ConnectTimeout", "Timeout", "TimeoutException", "ProxyError"}
    if names & network or "LocalEntryNotFoundError" in names:
        return (
            f"cannot reach {endpoint} to download {repo_id} ({_first_line(chain[-1])}). Check the network or "
            f"proxy, point AI_SERVICE_HF_ENDPOINT at a reachable mirror, or {by_hand}. Nothing was installed."
        )
    detail = f"HTTP {status}: " if status is not None else ""
    return f"downloading {url} failed ({detail}{_first_line(exc)}). Nothing was installed; retry the pull."


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


@contextlib.contextmanager
def _exclusive_lock(path: Path, what: str) -> Iterator[None]:
    """A non-blocking advisory lock (POSIX); elsewhere installs simply do not guard each other."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InstallBusyError(f"another install of {what} is running; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
