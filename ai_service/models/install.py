"""Installing a model by name from the configured hub: the one entry point for ``models pull`` and
download on first use."""

from __future__ import annotations

from pathlib import Path

from ai_service.models.store import ModelStore, set_hub_timeout
from ai_service.protocol.immich import ModelTask
from ai_service.settings import AIServiceSettings


def pull_model(
    store: ModelStore,
    settings: AIServiceSettings,
    name: str,
    task: ModelTask | None = None,
    revision: str | None = None,
) -> Path:
    set_hub_timeout(settings.hub_timeout_s)
    return store.pull(
        name,
        task,
        endpoint=settings.hf_endpoint,
        repo_owner=settings.model_repo_owner,
        token=settings.hf_token,
        revision=revision,
    )
