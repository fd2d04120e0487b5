"""The one way a model gets installed by name: ``models pull`` and download-on-first-use both call
:func:`pull_model`, which picks the source.

* A Chinese-CLIP name (or an alias of one, see ``catalog.canonical_clip_name``) with a repository in
  ``AI_SERVICE_CN_CLIP_REPOS`` is converted from that transformers.js ONNX export, without torch
  (``clip.transformers_js``), using ``AI_SERVICE_CN_CLIP_VARIANT``.
* Everything else is downloaded as an Immich-layout repository, ``AI_SERVICE_MODEL_REPO_OWNER/<name>``
  (or ``OWNER/NAME`` as given), by :meth:`ModelStore.pull`.

Both run inside :meth:`ModelStore.staging` (``<model_dir>/.incoming/<task>.<name>.pull-*``, whose size
is the download's progress) and install atomically: an interrupted pull installs nothing.
"""

from __future__ import annotations

from pathlib import Path

from ai_service.models.base import InvalidModelNameError, clean_name
from ai_service.models.clip.catalog import canonical_clip_name
from ai_service.models.clip.transformers_js import TransformersJsSource, pull_transformers_js
from ai_service.models.store import ModelStore, set_hub_timeout
from ai_service.protocol.immich import ModelTask
from ai_service.settings import AIServiceSettings


def resolve_name(store: ModelStore, name: str, task: ModelTask | None = None) -> tuple[str, ModelTask]:
    """The installed name and task a pull of ``name`` produces (aliases of Chinese-CLIP canonicalised)."""
    task = task if task is not None else store.infer_task(name.rpartition("/")[2])
    if "/" not in name and task == ModelTask.CLIP:
        name = canonical_clip_name(name)  # e.g. chinese-clip-vit-base-patch16 -> ViT-B-16__cn-clip
    return name, task


def transformers_js_source(settings: AIServiceSettings, name: str, task: ModelTask) -> TransformersJsSource | None:
    """The transformers.js export ``name`` is converted from, or None when it is pulled as it is."""
    repo = settings.cn_clip_repos.get(name) if task == ModelTask.CLIP and "/" not in name else None
    return TransformersJsSource(repo, settings.cn_clip_variant) if repo else None


def pull_model(
    store: ModelStore,
    settings: AIServiceSettings,
    name: str,
    task: ModelTask | None = None,
    revision: str | None = None,
) -> Path:
    """Download (and, for Chinese-CLIP, convert) ``name`` and install it in ``store``; returns its folder.

    Raises :class:`~ai_service.models.store.ModelPullError` (a message a user can act on) when the
    download or the conversion fails, and ``InvalidModelNameError`` for names that are not names."""
    set_hub_timeout(settings.hub_timeout_s)
    name, task = resolve_name(store, name, task)
    source = transformers_js_source(settings, name, task)
    if source is not None:
        if clean_name(name) != name:  # the name becomes a folder: same rule as ModelStore.pull's names
            raise InvalidModelNameError(f"invalid model name {name!r}")
        return pull_transformers_js(
            store, name, source, endpoint=settings.hf_endpoint, token=settings.hf_token, revision=revision
        )
    return store.pull(
        name,
        task,
        endpoint=settings.hf_endpoint,
        repo_owner=settings.model_repo_owner,
        token=settings.hf_token,
        revision=revision,
    )
