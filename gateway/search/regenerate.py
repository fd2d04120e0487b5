"""Regenerate one asset's OCR or CLIP data, acting with the caller's own rights.

Immich 3.1 has no per-asset OCR or smart-search job (``POST /api/assets/jobs`` knows only faces, metadata,
thumbnails and video), so the gateway does what Immich's job would do, for one asset:

1. ask Immich whether the caller may run a per-photo job (``job.create``, what Immich's own "Refresh faces"
   needs; see ``caller.py``) and who they are;
2. read the asset as the caller (``GET /api/assets/{id}``, ``asset.read``): Immich's own access check. Writing
   needs more than reading: as for Immich's per-photo jobs (``asset.update`` access), only the **owner** may
   regenerate (a partner or an album member who can see a photo cannot rewrite its index);
3. skip what Immich's jobs skip: ``hidden`` assets (the video halves of motion photos), and a task switched
   off in Immich's machine-learning settings;
4. fetch the unedited preview as the caller (``GET /api/assets/{id}/thumbnail?size=preview``, ``asset.view``),
   the image Immich's own jobs read;
5. infer through the gateway's routing with the models and options Immich is configured for;
6. write Immich's tables exactly as Immich's job does (``db.immich_writer``), one transaction.

Errors are the kinds of ``ai_service/errors.py`` (the HTTP status is given at the edge, ``gateway/search/__init__.py``)
with a message safe to show (no credentials, no internals).
"""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import Any
from uuid import UUID

from ai_service.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from db.immich_writer import AssetNotFoundError
from gateway.search.caller import Callers
from gateway.search.config_source import ConfigFileError, ImmichConfigSource
from gateway.search.credentials import Credential
from gateway.search.database import DatabaseUnavailable, SearchDatabase
from gateway.search.immich import Caller, ImmichClient, ImmichError, Permission
from gateway.search.inference import Inference

log = logging.getLogger("gateway.search")


class RegenerateKind(StrEnum):
    OCR = "ocr"
    CLIP = "clip"


AUTH_REQUIRED = (
    "Authentication required: send your Immich session (cookie immich_access_token or Authorization: Bearer) "
    "or an API key (x-api-key)"
)


def parse_asset_id(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise InvalidInput("assetId must be a UUID") from None


class Regenerator:
    def __init__(
        self,
        immich: ImmichClient,
        callers: Callers,
        database: SearchDatabase,
        inference: Inference,
        config: ImmichConfigSource,
    ) -> None:
        self.immich = immich
        self.callers = callers
        self.database = database
        self.inference = inference
        self.config = config

    async def _caller(self, credential: Credential) -> Caller:
        """The caller, once Immich agreed they may run a per-photo job (``job.create``, as its own "Refresh
        faces" needs); the owner check follows in :meth:`_owned_asset`."""
        try:
            authorized = await self.callers.authorize(credential, Permission.JOB_CREATE)
            return await self.callers.identify(credential, Permission.JOB_CREATE, authorized)
        except DatabaseUnavailable as exc:
            raise _database_down(exc) from None
        except ImmichError as exc:
            if exc.status == 401:
                self.callers.forget(credential)
                raise Unauthenticated(f"Immich refused the credentials: {exc.message}") from None
            if exc.status == 403:
                raise Forbidden(f"Immich refused: {exc.message}") from None
            raise exc.as_failure("Immich: ") from None

    async def _owned_asset(self, credential: Credential, caller: Caller, asset_id: UUID) -> dict[str, Any]:
        try:
            asset = await self.immich.asset(credential, asset_id)
        except ImmichError as exc:
            if exc.status == 401:
                self.callers.forget(credential)
                raise Unauthenticated(f"Immich refused the credentials: {exc.message}") from None
            if exc.status in (400, 404):
                # Immich answers 400 "Not found or no asset.read access" for both: the caller learns nothing more.
                raise NotFound("Asset not found, or you may not see it") from None
            if exc.status == 403:
                raise Forbidden(f"Immich refused access to the asset: {exc.message}") from None
            raise exc.as_failure("Immich: ") from None
        if str(asset.get("ownerId")) != str(caller.id):
            raise Forbidden("Only the owner of a photo can regenerate its OCR or CLIP data")
        if asset.get("visibility") == "hidden":
            raise Conflict("This is the hidden video part of a motion photo; Immich never indexes it")
        return asset

    async def _preview(self, credential: Credential, asset_id: UUID) -> bytes:
        try:
            return await self.immich.preview(credential, asset_id)
        except ImmichError as exc:
            if exc.status == 404:
                raise NotFound("The asset has no preview yet (Immich generates it after upload)") from None
            if exc.status == 401:
                raise Unauthenticated(f"Immich refused the preview: {exc.message}") from None
            if exc.status == 403:
                raise Forbidden(f"Immich refused the preview: {exc.message}") from None
            raise exc.as_failure("Immich: ") from None

    async def run(self, kind: RegenerateKind, credential: Credential | None, asset_id: UUID) -> dict[str, Any]:
        """Regenerate and return the endpoint's 200 body; raises a ServiceError (ai_service/errors.py)."""
        if credential is None:
            raise Unauthenticated(AUTH_REQUIRED)
        caller = await self._caller(credential)
        await self._owned_asset(credential, caller, asset_id)
        try:
            config = await self.config.get()
        except DatabaseUnavailable as exc:
            raise _database_down(exc) from None
        except ConfigFileError as exc:
            raise Unavailable(f"Immich's settings cannot be read: {exc}") from None
        if kind is RegenerateKind.OCR and not config.ocr_enabled:
            raise Conflict("OCR is switched off in Immich's machine-learning settings")
        if kind is RegenerateKind.CLIP and not config.clip_enabled:
            raise Conflict("Smart search (CLIP) is switched off in Immich's machine-learning settings")
        preview = await self._preview(credential, asset_id)
        try:
            if kind is RegenerateKind.OCR:
                lines = await self.inference.ocr(config.ocr, preview)
                await self.database.write_ocr(asset_id, lines)
                body: dict[str, Any] = {
                    "assetId": str(asset_id),
                    "lines": len(lines),
                    "text": "\n".join(line.text for line in lines),
                }
            else:
                vector = await self.inference.clip_image(config.clip.model_name, preview)
                latest = await self.config.get(fresh=True)
                if latest.clip.model_name != config.clip.model_name:
                    # Immich's job skips the write in this case too: the vector belongs to the old model.
                    raise Conflict("Immich's CLIP model changed while encoding; try again")
                await self.database.write_clip(asset_id, vector)
                body = {"assetId": str(asset_id), "dimension": len(vector), "model": config.clip.model_name}
        except DatabaseUnavailable as exc:
            raise _database_down(exc) from None
        except ConfigFileError as exc:
            raise Unavailable(f"Immich's settings cannot be read: {exc}") from None
        except AssetNotFoundError:
            raise NotFound("The asset was deleted meanwhile") from None
        except ValueError as exc:
            # db.immich_writer: the vector does not fit smart_search.embedding (Immich's model and column
            # disagree until Immich re-indexes), or the model sent non-finite numbers.
            raise Unavailable(f"cannot store the result: {exc}") from None
        log.info(
            "regenerated",
            extra={
                "fields": {
                    "kind": kind.value,
                    "asset_id": str(asset_id),
                    "user_id": str(caller.id),
                    **({"lines": body["lines"]} if kind is RegenerateKind.OCR else {"dimension": body["dimension"]}),
                }
            },
        )
        return body


def _database_down(exc: DatabaseUnavailable) -> Unavailable:
    # The reason (host, port, server message) goes to the log, not to the user.
    log.warning("regenerate: database unavailable", extra={"fields": {"error": str(exc)}})
    return Unavailable("Immich's database cannot be reached right now; try again later")
