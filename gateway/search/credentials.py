"""Who is calling: the caller's own Immich credential, taken from the request exactly where Immich looks.

Immich's ``AuthService.validate`` checks, first match wins: a shared-link key (``x-immich-share-key`` /
``?key=``), a shared-link slug (``x-immich-share-slug`` / ``?slug=``), a session token
(``x-immich-user-token``, ``x-immich-session-token``, ``?sessionKey=``, ``Authorization: Bearer``, cookie
``immich_access_token``), then an API key (``x-api-key`` / ``?apiKey=``). The gateway follows the same order
so it acts as the same identity Immich would see. Shared links are refused: Immich does not let them search,
and regenerating is a write.

A :class:`Credential` never appears in logs or reprs; caches key on :meth:`Credential.cache_key`, a SHA-256.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import StrEnum
from urllib.parse import unquote

from starlette.requests import HTTPConnection

ACCESS_TOKEN_COOKIE = "immich_access_token"


class CredentialKind(StrEnum):
    SESSION = "session"  # a login session token (cookie, bearer, x-immich-user-token, ...)
    API_KEY = "api_key"


class SharedLinkRefused(Exception):
    """The request authenticates with a shared link, which may neither search nor regenerate."""


@dataclass(frozen=True, slots=True)
class Credential:
    kind: CredentialKind
    value: str = field(repr=False)

    def __repr__(self) -> str:  # never the value, even in a traceback's locals
        return f"Credential(kind={self.kind.value})"

    def headers(self) -> dict[str, str]:
        """The headers that present this credential to Immich (and nothing else of the caller's request)."""
        if self.kind is CredentialKind.API_KEY:
            return {"x-api-key": self.value}
        return {"x-immich-user-token": self.value}

    def cache_key(self) -> str:
        return hashlib.sha256(f"{self.kind.value}:{self.value}".encode()).hexdigest()

    def stored_digest(self) -> bytes:
        """What Immich stores for this credential (``api_key.key``, ``session.token``): SHA-256 of the raw
        value, as bytes."""
        return hashlib.sha256(self.value.encode()).digest()


def _cookie(header: str | None, name: str) -> str | None:
    """One cookie's value, parsed as Immich's ``cookie`` package does (split on ';', the first '=', first
    occurrence wins, surrounding quotes dropped). Python's SimpleCookie is not used: it silently stops at the
    first cookie it cannot parse, which would hide Immich's token behind someone else's odd cookie."""
    if not header:
        return None
    for part in header.split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return unquote(value) if "%" in value else value or None
    return None


def credential_from(conn: HTTPConnection) -> Credential | None:
    """The caller's credential in Immich's order of precedence; None when there is none.

    Raises SharedLinkRefused when a shared-link key or slug comes first, as Immich would then authenticate
    the request as that link."""
    headers = conn.headers
    query = conn.query_params
    if headers.get("x-immich-share-key") or query.get("key") or headers.get("x-immich-share-slug") or query.get("slug"):
        raise SharedLinkRefused
    for token in (
        headers.get("x-immich-user-token"),
        headers.get("x-immich-session-token"),
        query.get("sessionKey"),
        _bearer(headers.get("authorization")),
        _cookie(headers.get("cookie"), ACCESS_TOKEN_COOKIE),
    ):
        if token:
            return Credential(CredentialKind.SESSION, token)
    api_key = headers.get("x-api-key") or query.get("apiKey")
    if api_key:
        return Credential(CredentialKind.API_KEY, api_key)
    return None


def _bearer(value: str | None) -> str | None:
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None
