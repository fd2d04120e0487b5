"""Backends the gateway routes to; :func:`build_backends` makes them from the settings."""

from __future__ import annotations

from ai_service.protocol.immich import ModelTask
from gateway.backends.base import Backend, BackendFailure, ClientInputError
from gateway.settings import BackendKind, GatewaySettings

__all__ = ["Backend", "BackendFailure", "ClientInputError", "build_backends"]


def build_backends(settings: GatewaySettings) -> dict[str, Backend]:
    """One object per configured backend that some route uses (an unused local backend loads nothing)."""
    used = {name for task in ModelTask for name in settings.route(task)}
    backends: dict[str, Backend] = {}
    for name, conf in settings.backends.items():
        if name not in used:
            continue
        # Imported per kind: a gateway without a local backend never imports the model families.
        if conf.kind is BackendKind.LOCAL:
            from gateway.backends.local import LocalBackend

            backends[name] = LocalBackend(name)
        elif conf.kind is BackendKind.IMMICH:
            from gateway.backends.immich import ImmichBackend

            backends[name] = ImmichBackend(name, conf, settings)
        else:
            from gateway.backends.mtphotos import MtPhotosBackend

            backends[name] = MtPhotosBackend(name, conf, settings)
    return backends
