"""The error model: what can go wrong with a request, as kinds, and the one table that gives each its HTTP status.

Code raises a kind (or a subclass named for the case, e.g. ``ImageError(InvalidInput)``) and never an HTTP
status; the message is the reply's ``detail``. Each app turns errors into replies once, at its edge: the AI
service (``ai_service/app.py``) and the gateway (``gateway/app.py``) look the status up here with
:func:`http_status`. (Library mode's own API keeps its table in ``library/api.py``: there an upload that is
not an image is a 415.) The gateway also reads :data:`CLIENT_ERRORS`: those are the
request's fault, so no other backend is tried.
"""

from __future__ import annotations


class ServiceError(Exception):
    """A request this service cannot answer with a result; ``str(exc)`` says why, for the client."""

    @property
    def detail(self) -> str:
        return str(self)


class InvalidInput(ServiceError):
    """The input is unusable: an undecodable image, an empty text, a dependent task without its dependency."""


class InputTooLarge(ServiceError):
    """An image, a text or a body over a configured limit."""


class Unprocessable(ServiceError):
    """The request is well formed but cannot be done as asked: malformed ``entries``, a model the routing
    cannot serve."""


class Unauthenticated(ServiceError):
    """No credentials, or credentials the server does not accept."""


class Forbidden(ServiceError):
    """The caller is known but may not do this."""


class NotFound(ServiceError):
    """The thing named (a model, an asset) does not exist, or the caller may not see it."""


class Conflict(ServiceError):
    """Cannot be done in the current state (a feature switched off, a setting changed meanwhile)."""


class Unavailable(ServiceError):
    """Cannot be served right now (a model not installed yet, still downloading, failing to load)."""


class UpstreamFailed(ServiceError):
    """A service this one relies on (the model hub, Immich) failed."""


class TimedOut(ServiceError):
    """The work took longer than its configured limit."""


HTTP_STATUS: dict[type[ServiceError], int] = {
    InvalidInput: 400,
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    InputTooLarge: 413,
    Unprocessable: 422,
    UpstreamFailed: 502,
    Unavailable: 503,
    TimedOut: 504,
}
"""The HTTP status of each kind; any other :class:`ServiceError` (a bug, a failed export) is a 500."""

CLIENT_ERRORS: tuple[type[ServiceError], ...] = (InvalidInput, InputTooLarge, Unprocessable)
"""Kinds that are the request's fault: every backend would refuse it the same way."""


def http_status(error: BaseException) -> int:
    """The status to answer ``error`` with: its kind's, the nearest one in its class hierarchy."""
    for cls in type(error).__mro__:
        status = HTTP_STATUS.get(cls)
        if status is not None:
            return status
    return 500


def error_for_status(status: int, detail: str) -> ServiceError:
    """The kind a remote service's HTTP status stands for (the other way round, for this project's clients)."""
    for kind, kind_status in HTTP_STATUS.items():
        if kind_status == status:
            return kind(detail)
    return ServiceError(detail)
