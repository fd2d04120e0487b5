"""The one model registry: (task, type, name) -> which family loads it, whether it is installed,
and how to install it when it is not.

Each task has one *family* object (``clip.ClipFamily``, ``faces.FaceFamily``, ``ocr.OcrFamily``)
that knows its on-disk layout and its loaders; the registry adds name cleaning and the error
messages users see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ai_service.models.base import (
    ModelNotInstalledError,
    UnknownModelError,
    clean_name,
)
from ai_service.models.store import ModelStore
from ai_service.protocol.immich import ModelTask, ModelType


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A resolved model: what the cache keys on."""

    task: ModelTask
    name: str  # cleaned / canonical name
    component: str  # e.g. "visual", "textual", "detection", "recognition", "pipeline"


class ModelFamily(Protocol):
    task: ModelTask

    def canonical_name(self, name: str) -> str:
        """Map an alias (e.g. Immich's 'PP-OCRv5_mobile') to the name used on disk; identity otherwise."""
        ...

    def component(self, type_: ModelType) -> str:
        """Which loaded object serves ``type_`` (two types may share one, e.g. an OCR pipeline)."""
        ...

    def installed(self) -> list[str]: ...

    def is_installed(self, name: str, component: str) -> bool: ...

    def known(self) -> list[str]:
        """Names this service can install (pull, export or bundled), installed or not."""
        ...

    def install_hint(self, name: str) -> str: ...

    def downloadable(self, name: str) -> bool:
        """Whether ``name`` can be fetched from the configured hub (download on first use)."""
        ...

    def load(self, name: str, component: str) -> object: ...


_RESOLVED_LIMIT = 1024  # cached answers; names are client input, so the cache is bounded


class ModelRegistry:
    def __init__(self, families: list[ModelFamily], store: ModelStore | None = None) -> None:
        self.families: dict[ModelTask, ModelFamily] = {f.task: f for f in families}
        # Positive answers of resolve(), each with the model folder's stamp when it was found: resolving
        # checks several paths on disk, which is a measurable share of a small model's request. A model
        # installed, replaced or removed (by this process or `models pull` in another) renames a folder in
        # <root>/<task>/, which changes that folder's mtime and so the stamp; misses are never cached.
        self._store = store
        self._resolved: dict[tuple[ModelTask, ModelType, str], tuple[int, ModelRef]] = {}

    def family(self, task: ModelTask) -> ModelFamily:
        try:
            return self.families[task]
        except KeyError:
            raise UnknownModelError(
                f"task '{task}' is not served here; tasks: {', '.join(sorted(self.families))}"
            ) from None

    def resolve(self, task: ModelTask, type_: ModelType, name: str) -> ModelRef:
        if self._store is None:
            return self._resolve(task, type_, name)
        key = (task, type_, name)
        stamp = self._store.stamp(task)
        cached = self._resolved.get(key)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        ref = self._resolve(task, type_, name)
        if len(self._resolved) >= _RESOLVED_LIMIT:
            self._resolved.clear()
        self._resolved[key] = (stamp, ref)
        return ref

    def _resolve(self, task: ModelTask, type_: ModelType, name: str) -> ModelRef:
        family = self.family(task)
        canonical = family.canonical_name(clean_name(name))
        component = family.component(type_)
        if family.is_installed(canonical, component):
            return ModelRef(task, canonical, component)
        installed = family.installed()
        listed = ", ".join(installed) if installed else "none"
        if canonical in family.known():
            raise ModelNotInstalledError(
                f"{task} model '{canonical}' ({component}) is not installed. {family.install_hint(canonical)} "
                f"Installed {task} models: {listed}.",
                task=str(task),
                name=canonical,
                downloadable=family.downloadable(canonical),
            )
        raise UnknownModelError(f"unknown {task} model '{name}'. Installed {task} models: {listed}.")

    def load(self, ref: ModelRef) -> object:
        return self.family(ref.task).load(ref.name, ref.component)

    def installed(self) -> dict[str, list[str]]:
        return {str(task): family.installed() for task, family in self.families.items()}

    def known(self) -> dict[str, list[str]]:
        return {str(task): family.known() for task, family in self.families.items()}
