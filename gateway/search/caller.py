"""Who is calling, and whether Immich lets them do what they ask: Immich's own answer, not ours.

Immich checks an API key's permissions per route (``Missing required permission: asset.read``); a login
session holds every permission. The gateway's endpoints stand in for Immich actions, so each one needs what the
equivalent Immich action needs (gateway/search/README.md has the table):

* **authorize** - a session is presented to ``GET /api/users/me`` (valid sessions may call it, and it names the
  user). An API key is presented to a side-effect-free Immich call guarded by exactly the permission the action
  needs (:meth:`ImmichClient.require`), so a key that can search in Immich can search here, and one that
  cannot gets Immich's own 403. The key's ``user.read`` is never needed.
* **identify** - an API key Immich accepted is mapped to its owner through Immich's ``api_key`` table (the
  SHA-256 Immich stores), which decides nothing: it only names the user Immich already accepted.

Both answers are reused for ``GATEWAY_IMMICH__AUTH_CACHE_TTL_S`` per credential (keyed by a SHA-256) and
permission; refusals are never cached.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from gateway.search.credentials import Credential, CredentialKind
from gateway.search.database import SearchDatabase
from gateway.search.immich import Caller, ImmichClient, ImmichError, Permission
from gateway.settings import ImmichSettings


class Callers:
    def __init__(self, settings: ImmichSettings, immich: ImmichClient, database: SearchDatabase) -> None:
        self.settings = settings
        self.immich = immich
        self.database = database
        self._known: OrderedDict[tuple[str, Permission], tuple[float, Caller]] = OrderedDict()

    def _cached(self, credential: Credential, permission: Permission) -> Caller | None:
        key = (credential.cache_key(), permission)
        hit = self._known.get(key)
        if hit is None or hit[0] <= time.monotonic():
            return None
        self._known.move_to_end(key)
        return hit[1]

    def _remember(self, credential: Credential, permission: Permission, caller: Caller) -> None:
        if self.settings.auth_cache_ttl_s <= 0:
            return
        key = (credential.cache_key(), permission)
        self._known[key] = (time.monotonic() + self.settings.auth_cache_ttl_s, caller)
        self._known.move_to_end(key)
        while len(self._known) > self.settings.auth_cache_size:
            self._known.popitem(last=False)

    def forget(self, credential: Credential) -> None:
        """Drop what is cached for a credential Immich has since refused."""
        self.immich.forget(credential)
        for key in [k for k in self._known if k[0] == credential.cache_key()]:
            del self._known[key]

    async def authorize(self, credential: Credential, permission: Permission) -> Caller | None:
        """Raise ImmichError (Immich's status and message) unless Immich lets the caller do what needs
        ``permission``. Returns the caller when that is already known, else None (then :meth:`identify`)."""
        cached = self._cached(credential, permission)
        if cached is not None:
            return cached
        if credential.kind is CredentialKind.SESSION:
            caller = await self.immich.me(credential)  # a session holds every permission in Immich
            self._remember(credential, permission, caller)
            return caller
        await self.immich.require(credential, permission)
        return None

    async def identify(self, credential: Credential, permission: Permission, authorized: Caller | None) -> Caller:
        """The user behind a credential :meth:`authorize` accepted. Raises DatabaseUnavailable when Immich's
        database cannot be read, ImmichError(401) when the key was revoked in between."""
        if authorized is not None:
            return authorized
        owner = await self.database.api_key_owner(credential.stored_digest())
        if owner is None:
            raise ImmichError(401, "Invalid API key")
        caller = Caller(id=owner[0], is_admin=owner[1])
        self._remember(credential, permission, caller)
        return caller
