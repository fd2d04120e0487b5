"""What every backend provides, and the two ways an attempt can fail.

A backend answers one task of one request in Immich's response shape. How a failure is classified
decides what the gateway does next:

* :class:`BackendFailure` - the backend could not serve (down, slow, 5xx, model missing, garbage):
  try the next backend and count it against this backend's breaker.
* :class:`ClientInputError` - a remote backend judged the *request* wrong (bad image, text too long):
  every backend would say the same, so its reply goes back to Immich unchanged.
* one of ``ai_service.errors.CLIENT_ERRORS`` (e.g. ``ImageError``) - the same verdict from code in this
  process (the local backend, the MT Photos adapter's checks); the gateway's edge answers it.
"""

from __future__ import annotations

import abc
from typing import Any

from ai_service.errors import CLIENT_ERRORS, HTTP_STATUS
from gateway.routing import RoutedTask


class BackendFailure(Exception):
    """Fail over. ``kind`` is a short metric label (connect, timeout, http_status, invalid_response, …)."""

    def __init__(self, kind: str, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.status = status


class ClientInputError(Exception):
    """Pass through to Immich as is: ``status``, ``body`` and ``content_type`` of the backend's reply."""

    def __init__(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body
        self.content_type = content_type


# Statuses that mean "your input is wrong" in Immich's ML protocol and the AI service:
# 400 undecodable image / missing field, 413 too large, 422 malformed entries.
CLIENT_INPUT_STATUSES = frozenset(HTTP_STATUS[kind] for kind in CLIENT_ERRORS)

CLIENT_FAULTS: tuple[type[Exception], ...] = (ClientInputError, *CLIENT_ERRORS)
"""What a backend raises when the request, not the backend, is at fault: no failover."""


class Backend(abc.ABC):
    kind: str
    checked_replies = False  # True: replies come from this project's typed task code, the dispatcher skips validation

    def __init__(self, name: str) -> None:
        self.name = name

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open clients / load what is needed; called once from the app's lifespan."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients and threads; called once after in-flight requests finished."""

    def cannot_serve(self, routed: RoutedTask) -> str | None:
        """Why this backend must not get this request (e.g. it runs another model), or None."""
        return None

    @property
    def has_health_check(self) -> bool:
        return True

    @abc.abstractmethod
    async def predict(
        self, routed: RoutedTask, image: bytes | None, text: str | None, *, timeout_s: float, request_id: str
    ) -> dict[str, Any]:
        """Immich's response for this one task: ``{task: output}`` plus imageHeight/imageWidth for images.

        Raises BackendFailure or one of CLIENT_FAULTS; never returns an error disguised as a result.
        """

    @abc.abstractmethod
    async def health(self, timeout_s: float) -> None:
        """Return when the backend answers its health check; raise BackendFailure otherwise."""

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}
