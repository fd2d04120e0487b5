"""Loaded models: lazy load once, optional preload, unload after an idle TTL.

Loads are serialised by one lock (two big models loading at once can exhaust memory on a small
box). Unloading drops the cache's reference so ONNX Runtime frees the session; a request that is
still using the model keeps its own reference until it returns, so unloading never breaks a
request in flight and the process never restarts.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass

from ai_service.models.base import ModelError, ModelLoadError
from ai_service.models.registry import ModelRef, ModelRegistry

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Entry:
    model: object
    last_used: float
    loaded_at: float


class ModelCache:
    def __init__(self, registry: ModelRegistry, ttl_s: float) -> None:
        self.registry = registry
        self.ttl_s = ttl_s
        self._entries: dict[ModelRef, _Entry] = {}
        self._load_lock = threading.Lock()

    def get(self, ref: ModelRef) -> object:
        """Return the loaded model for ``ref``, loading it first if needed (blocking; call off the event loop)."""
        entry = self._entries.get(ref)
        if entry is None:
            with self._load_lock:
                entry = self._entries.get(ref)
                if entry is None:
                    entry = self._load(ref)
                    self._entries[ref] = entry
        entry.last_used = time.monotonic()
        return entry.model

    def _load(self, ref: ModelRef) -> _Entry:
        started = time.monotonic()
        try:
            model = self.registry.load(ref)
        except ModelLoadError as exc:
            raise self._load_failed(ref, exc) from exc
        except ModelError:
            raise
        except (OSError, RuntimeError, ValueError) as exc:
            raise self._load_failed(ref, exc) from exc
        now = time.monotonic()
        log.info("loaded %s/%s/%s in %.2fs", ref.task, ref.name, ref.component, now - started)
        return _Entry(model=model, last_used=now, loaded_at=now)

    @staticmethod
    def _load_failed(ref: ModelRef, exc: Exception) -> ModelLoadError:
        """The error a client sees: which model failed, and where to look. File paths and the loader's
        own words (ONNX Runtime, dlib, JSON parsers) go to the log only."""
        log.error("%s model '%s' (%s) failed to load: %s", ref.task, ref.name, ref.component, exc)
        return ModelLoadError(
            f"{ref.task} model '{ref.name}' ({ref.component}) could not be loaded: its files are damaged, "
            "incomplete or not a model this service can run. The AI service's log says why; reinstalling "
            "the model usually fixes it."
        )

    def unload_idle(self, now: float | None = None) -> list[ModelRef]:
        """Drop models idle longer than the TTL; returns what was dropped."""
        if self.ttl_s <= 0:
            return []
        now = time.monotonic() if now is None else now
        with self._load_lock:
            stale = [ref for ref, e in self._entries.items() if now - e.last_used > self.ttl_s]
            for ref in stale:
                del self._entries[ref]
        if stale:
            gc.collect()
            for ref in stale:
                log.info("unloaded idle model %s/%s/%s", ref.task, ref.name, ref.component)
        return stale

    def unload_all(self) -> None:
        with self._load_lock:
            self._entries.clear()
        gc.collect()

    def loaded(self) -> list[ModelRef]:
        return list(self._entries)
