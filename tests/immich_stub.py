"""A small Immich API server for tests, on loopback, answering from the real test database.

It implements just what the gateway and the nginx front call, with Immich 3.1's semantics:

* authentication in Immich's order (shared-link key, then session token from ``x-immich-user-token`` /
  ``x-immich-session-token`` / ``?sessionKey=`` / ``Authorization: Bearer`` / cookie ``immich_access_token``,
  then ``x-api-key`` / ``?apiKey=``); 401 ``Authentication required`` / ``Invalid user token`` as Immich says;
* API keys with permission lists, stored as Immich stores them (``api_key`` rows: SHA-256 of the key, the
  ``permissions`` array) and checked per route as Immich's ``AuthService.authenticate`` does: a route's
  permission, or ``all`` for a route declared without one, is granted when the key holds it or ``all``; else
  403 ``Missing required permission: <permission>``. Sessions hold every permission. Shared links get 403
  ``Forbidden`` on routes that do not allow them. Each route below names the permission Immich 3.1 declares;
* ``GET /api/users/me`` (``user.read``), ``GET /api/auth/status`` (no permission declared, so ``all``;
  ``isElevated`` for PIN-elevated sessions);
* ``GET /api/assets/{id}`` (``asset.read``): Immich's AssetRead access rule evaluated on the database rows
  (owner, with locked assets only for elevated sessions; album member; partner with a non-trashed
  timeline/hidden asset), 400 ``Not found or no asset.read access`` otherwise, and the AssetResponseDto built
  from the rows;
* ``GET /api/assets/{id}/thumbnail?size=preview`` (``asset.view``): the JPEG registered for the asset (404
  ``Asset media not found`` without one), after the same access check;
* ``POST /api/search/smart`` (``asset.read``; Immich's own smart search: records the body, answers a canned
  result), ``POST /api/search/metadata`` (``asset.read``; the ``id``/``size``/``page``/``withDeleted``
  filters over Immich's search scope: the caller and the partners in their timeline),
  ``POST /api/assets/jobs`` (``job.create``; ``AssetJobsDto`` validated, every asset must be the caller's own,
  400 ``Not found or no asset.update access`` otherwise; 204, the jobs recorded in ``queued_jobs``),
  ``PUT /api/assets`` (``asset.update``; AssetBulkUpdateDto's ``duplicateId``/``isFavorite`` on the caller's own
  assets, 400 ``Not found or no asset.update access`` otherwise), ``GET /api/duplicates`` (``duplicate.read``;
  Immich's singleton clean-up, then its DuplicateRepository.getAll query), ``DELETE /api/duplicates/{id}``
  (``duplicate.delete``; "keep all"), ``GET/POST /api/tags``, ``GET /api/tags/{id}``, ``PUT /api/tags/assets``
  (``tag.read``/``tag.create``/``tag.asset``; TagService's rules over ``tag``, ``tag_closure``, ``tag_asset``),
  ``POST /api/assets`` (an "upload": counts the bytes), ``GET /api/server/features`` (``smart_search`` switch),
  ``GET /api/server/ping``, ``GET /api/server/about``
  (JSON that contains ``</head>``), a websocket at ``/api/socket.io/`` that echoes, the web app's HTML at
  ``/`` (gzip-compressed when the client accepts it, as Immich's precompressed files are) and a script under
  ``/_app/immutable/`` that also contains ``</head>``.

Every request is recorded (method, path, query, headers, body) so a test can assert what reached Immich.
Two switches let tests check the gateway's own defences: ``leaky`` (the asset endpoint shows every asset to
everyone, as a buggy Immich would) and ``deny`` (assets Immich refuses although the rows would allow them).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import io
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import orjson
import psycopg
from psycopg.rows import dict_row
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from tests.gateway_support import _ThreadedUvicorn
from tests.servers import free_port

FONT = Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc")

HTML_PAGE = (
    '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8" />\n<title>Immich</title>\n'
    '<!-- metadata:tags -->\n</head>\n<body><div id="app">immich web</div></body>\n</html>\n'
)
APP_SCRIPT = 'const marker = "</head>"; export const app = () => marker;\n'
CANNED_SMART_SEARCH = {
    "albums": {"total": 0, "count": 0, "items": [], "facets": []},
    "assets": {"total": 0, "count": 0, "items": [], "facets": [], "nextPage": None},
    "answeredBy": "immich-stub",
}


def render_text_jpeg(lines: list[str], *, width: int = 1440, height: int = 960, font_px: int = 64) -> bytes:
    """A preview-sized JPEG with ``lines`` in black on white, set in a real CJK font (what OCR reads)."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.truetype(str(FONT), font_px)
    y = 120
    for line in lines:
        draw.text((100, y), line, fill="black", font=font)
        y += int(font_px * 2)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@dataclass
class StubUser:
    id: UUID
    email: str = ""
    name: str = ""
    api_key: str = field(default_factory=lambda: "key-" + secrets.token_hex(16))
    session_token: str = field(default_factory=lambda: "sess-" + secrets.token_hex(16))
    elevated_token: str = field(default_factory=lambda: "pin-" + secrets.token_hex(16))  # a PIN-elevated session
    is_admin: bool = False
    api_key_permissions: tuple[str, ...] = ("all",)

    @property
    def cookie(self) -> dict[str, str]:
        return {"cookie": f"immich_is_authenticated=true; immich_access_token={self.session_token}; other=1"}

    @property
    def key_header(self) -> dict[str, str]:
        return {"x-api-key": self.api_key}

    @property
    def bearer(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.session_token}"}


@dataclass
class Recorded:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Auth:
    user: StubUser | None
    elevated: bool = False
    permissions: tuple[str, ...] | None = None  # an API key's; None for a session (which holds every one)
    shared_link: bool = False


# Immich 3.1's AssetJobName values (POST /api/assets/jobs).
ASSET_JOB_NAMES = ("refresh-faces", "refresh-metadata", "regenerate-thumbnail", "transcode-video")
_UUID_V4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$", re.I)


def _error(status: int, message: str) -> JSONResponse:
    phrases = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}
    return JSONResponse(
        {"message": message, "error": phrases.get(status, "Error"), "statusCode": status, "correlationId": "stub"},
        status_code=status,
    )


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_ASSET_ACCESS_SQL = """
SELECT a.*, e."assetId" AS exif_asset, e.make, e.model, e.city, e.state, e.country, e."lensModel", e.rating,
       e.description, u.email AS owner_email, u.name AS owner_name
FROM asset AS a
JOIN "user" AS u ON u.id = a."ownerId"
LEFT JOIN asset_exif AS e ON e."assetId" = a.id
WHERE a.id = %(id)s AND (
  %(leaky)s
  OR (a."ownerId" = %(user)s AND (a.visibility <> 'locked' OR %(elevated)s))
  OR (a."deletedAt" IS NULL AND EXISTS (
        SELECT 1 FROM album_asset AS aa
        JOIN album AS al ON al.id = aa."albumId" AND al."deletedAt" IS NULL
        JOIN album_user AS au ON au."albumId" = al.id AND au."userId" = %(user)s
        WHERE aa."assetId" = a.id))
  OR (a."deletedAt" IS NULL AND a.visibility IN ('timeline', 'hidden') AND EXISTS (
        SELECT 1 FROM partner AS p
        JOIN "user" AS sharer ON sharer.id = p."sharedById" AND sharer."deletedAt" IS NULL
        WHERE p."sharedWithId" = %(user)s AND p."sharedById" = a."ownerId"))
)
"""


class ImmichStub:
    def __init__(self, db_uri: str, users: list[StubUser] | None = None) -> None:
        self.db_uri = db_uri
        self.users: list[StubUser] = list(users or [])
        self.previews: dict[UUID, bytes] = {}
        self.share_keys: set[str] = {"share-" + secrets.token_hex(8)}
        self.requests: list[Recorded] = []
        self.queued_jobs: list[tuple[str, UUID]] = []
        # API key -> (its user, its permissions), mirrored into Immich's api_key table (the gateway reads it).
        self.api_keys: dict[str, tuple[StubUser, tuple[str, ...]]] = {}
        for user in self.users:
            self._register_key(user, user.api_key, user.api_key_permissions)
        self.leaky = False
        self.smart_search_enabled = True  # GET /api/server/features: Immich's smart search switched on
        self.deny: set[UUID] = set()
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_user(self, user: StubUser) -> StubUser:
        self.users.append(user)
        self._register_key(user, user.api_key, user.api_key_permissions)
        return user

    def add_api_key(self, user: StubUser, *permissions: str) -> str:
        """A new API key of ``user`` holding ``permissions`` (Immich's names, e.g. ``asset.read``, or ``all``)."""
        key = "key-" + secrets.token_hex(16)
        self._register_key(user, key, tuple(permissions))
        return key

    def _register_key(self, user: StubUser, key: str, permissions: tuple[str, ...]) -> None:
        self.api_keys[key] = (user, permissions)
        with psycopg.connect(self.db_uri, autocommit=True) as conn:
            conn.execute(
                'INSERT INTO api_key (name, "key", "userId", permissions) VALUES (%s, %s, %s, %s)',
                ["stub", hashlib.sha256(key.encode()).digest(), user.id, list(permissions)],
            )

    def recorded(self, path: str, method: str | None = None) -> list[Recorded]:
        return [r for r in self.requests if r.path == path and (method is None or r.method == method)]

    # ---- auth, in Immich's order --------------------------------------------------------------------------

    def _auth(self, request: Request) -> Auth | Response:
        headers, query = request.headers, request.query_params
        share = headers.get("x-immich-share-key") or query.get("key")
        if share:
            return Auth(None, shared_link=True) if share in self.share_keys else _error(401, "Invalid share key")
        token = (
            headers.get("x-immich-user-token")
            or headers.get("x-immich-session-token")
            or query.get("sessionKey")
            or (headers.get("authorization", "")[7:] if headers.get("authorization", "").startswith("Bearer ") else "")
            or request.cookies.get("immich_access_token")
        )
        if token:
            for user in self.users:
                if token in (user.session_token, user.elevated_token):
                    return Auth(user, elevated=token == user.elevated_token)
            return _error(401, "Invalid user token")
        key = headers.get("x-api-key") or query.get("apiKey")
        if key:
            if key in self.api_keys:
                user, permissions = self.api_keys[key]
                return Auth(user, permissions=permissions)
            return _error(401, "Invalid API key")
        return _error(401, "Authentication required")

    def _user_auth(self, request: Request, permission: str = "all") -> Auth | Response:
        """Immich's AuthService.authenticate for a route declaring ``permission`` (``all`` when a route declares
        none) that shared links may not use."""
        auth = self._auth(request)
        if isinstance(auth, Response):
            return auth
        if auth.shared_link:
            return _error(403, "Forbidden")  # routes without sharedLink: true
        assert auth.user is not None
        granted = auth.permissions
        if granted is not None and "all" not in granted and permission not in granted:
            return _error(403, f"Missing required permission: {permission}")
        return auth

    async def _record(self, request: Request) -> bytes:
        body = await request.body()
        self.requests.append(Recorded(request.method, request.url.path, request.url.query, dict(request.headers), body))
        return body

    # ---- endpoints ----------------------------------------------------------------------------------------

    async def ping(self, request: Request) -> Response:
        await self._record(request)
        return JSONResponse({"res": "pong"})

    async def features(self, request: Request) -> Response:
        """``GET /api/server/features`` (public): the flags the web reads, smartSearch switchable."""
        await self._record(request)
        flags = dict.fromkeys(("facialRecognition", "duplicateDetection", "map", "trash", "ocr", "search"), True)
        return JSONResponse(
            {**flags, "smartSearch": self.smart_search_enabled, "configFile": False, "importFaces": False}
        )

    async def about(self, request: Request) -> Response:
        await self._record(request)
        return JSONResponse({"version": "v3.1.0", "note": "a JSON value with </head> in it"})

    async def me(self, request: Request) -> Response:
        await self._record(request)
        auth = self._user_auth(request, "user.read")
        if isinstance(auth, Response):
            return auth
        user = auth.user
        assert user is not None
        return JSONResponse(
            {
                "id": str(user.id),
                "email": user.email,
                "name": user.name,
                "profileImagePath": "",
                "avatarColor": "primary",
                "profileChangedAt": "2024-01-01T00:00:00.000Z",
                "storageLabel": None,
                "shouldChangePassword": False,
                "isAdmin": user.is_admin,
                "createdAt": "2024-01-01T00:00:00.000Z",
                "deletedAt": None,
                "updatedAt": "2024-01-01T00:00:00.000Z",
                "oauthId": "",
                "quotaSizeInBytes": None,
                "quotaUsageInBytes": 0,
                "status": "active",
                "license": None,
            }
        )

    async def auth_status(self, request: Request) -> Response:
        await self._record(request)
        auth = self._user_auth(request)  # @Authenticated() without a permission: an API key needs "all"
        if isinstance(auth, Response):
            return auth
        return JSONResponse({"password": True, "pinCode": True, "isElevated": auth.elevated})

    def _read_asset(self, asset_id: str, auth: Auth) -> dict[str, Any] | None:
        try:
            uid = UUID(asset_id)
        except ValueError:
            return None
        if uid in self.deny:
            return None
        assert auth.user is not None
        with psycopg.connect(self.db_uri, autocommit=True, row_factory=dict_row) as conn:
            return conn.execute(
                _ASSET_ACCESS_SQL, {"id": uid, "user": auth.user.id, "elevated": auth.elevated, "leaky": self.leaky}
            ).fetchone()

    @staticmethod
    def _dto(row: dict[str, Any], auth: Auth) -> dict[str, Any]:
        assert auth.user is not None
        owner = row["ownerId"] == auth.user.id
        exif = (
            {
                "make": row["make"],
                "model": row["model"],
                "city": row["city"],
                "state": row["state"],
                "country": row["country"],
                "lensModel": row["lensModel"],
                "rating": row["rating"],
                "description": row["description"],
            }
            if row["exif_asset"] is not None
            else {}
        )
        return {
            "id": str(row["id"]),
            "type": row["type"],
            "thumbhash": None,
            "localDateTime": _iso(row["localDateTime"]),
            "duration": row["duration"],
            "hasMetadata": True,
            "width": row["width"],
            "height": row["height"],
            "createdAt": _iso(row["createdAt"]),
            "ownerId": str(row["ownerId"]),
            "originalPath": row["originalPath"],
            "originalFileName": row["originalFileName"],
            "originalMimeType": "image/jpeg",
            "fileCreatedAt": _iso(row["fileCreatedAt"]),
            "fileModifiedAt": _iso(row["fileModifiedAt"]),
            "updatedAt": _iso(row["updatedAt"]),
            "isFavorite": bool(owner and row["isFavorite"]),
            "isArchived": row["visibility"] == "archive",
            "isTrashed": row["deletedAt"] is not None,
            "isOffline": row["isOffline"],
            "visibility": row["visibility"],
            "checksum": base64.b64encode(bytes(row["checksum"])).decode(),
            "isEdited": row["isEdited"],
            "livePhotoVideoId": None if row["livePhotoVideoId"] is None else str(row["livePhotoVideoId"]),
            "libraryId": None if row["libraryId"] is None else str(row["libraryId"]),
            "duplicateId": None if row["duplicateId"] is None else str(row["duplicateId"]),
            "resized": True,
            "owner": {"id": str(row["ownerId"]), "email": row["owner_email"], "name": row["owner_name"]},
            "exifInfo": exif,
            "tags": [],
            "people": [],
            "stack": None,
        }

    async def asset(self, request: Request) -> Response:
        await self._record(request)
        auth = self._user_auth(request, "asset.read")
        if isinstance(auth, Response):
            return auth
        asset_id = request.path_params["asset_id"]
        try:
            UUID(asset_id)
        except ValueError:
            return _error(400, "id must be a UUID")
        row = await asyncio.to_thread(self._read_asset, asset_id, auth)
        if row is None:
            return _error(400, "Not found or no asset.read access")
        return JSONResponse(self._dto(row, auth))

    async def thumbnail(self, request: Request) -> Response:
        await self._record(request)
        auth = self._user_auth(request, "asset.view")
        if isinstance(auth, Response):
            return auth
        asset_id = request.path_params["asset_id"]
        row = await asyncio.to_thread(self._read_asset, asset_id, auth)
        if row is None:
            return _error(400, "Not found or no asset.view access")
        if request.query_params.get("size") != "preview":
            return _error(400, "the stub serves previews only")
        data = self.previews.get(UUID(asset_id))
        if data is None:
            return _error(404, "Asset media not found")
        return Response(data, media_type="image/jpeg", headers={"cache-control": "private, max-age=86400"})

    async def smart_search(self, request: Request) -> Response:
        await self._record(request)
        auth = self._user_auth(request, "asset.read")
        if isinstance(auth, Response):
            return auth
        return JSONResponse(CANNED_SMART_SEARCH)

    def _metadata_search(self, auth: Auth, body: dict[str, Any]) -> list[dict[str, Any]]:
        """Immich's legacy search builder for the few fields the gateway sends: its scope (the caller and the
        partners shown in their timeline), no trash unless ``withDeleted``, no locked assets unless elevated."""
        assert auth.user is not None
        size, page = body.get("size", 250), body.get("page", 1)
        with psycopg.connect(self.db_uri, autocommit=True, row_factory=dict_row) as conn:
            return conn.execute(
                """
                SELECT a.*, NULL AS exif_asset, u.email AS owner_email, u.name AS owner_name FROM asset AS a
                JOIN "user" AS u ON u.id = a."ownerId"
                WHERE (a."ownerId" = %(user)s OR a."ownerId" IN (
                         SELECT p."sharedById" FROM partner AS p WHERE p."sharedWithId" = %(user)s AND p."inTimeline"))
                  AND (%(id)s::uuid IS NULL OR a.id = %(id)s::uuid)
                  AND (a."deletedAt" IS NULL OR %(deleted)s)
                  AND (a.visibility <> 'locked' OR %(elevated)s)
                  AND (%(type)s::varchar IS NULL OR a.type = %(type)s::varchar)
                  AND (%(visibility)s::asset_visibility_enum IS NULL
                       OR a.visibility = %(visibility)s::asset_visibility_enum)
                  AND (%(stacked)s OR a."stackId" IS NULL)
                ORDER BY a."fileCreatedAt" DESC, a.id LIMIT %(limit)s OFFSET %(offset)s
                """,
                {
                    "user": auth.user.id,
                    "id": body.get("id"),
                    "type": body.get("type"),
                    "visibility": body.get("visibility"),
                    "stacked": body.get("withStacked") is not False,
                    "deleted": bool(body.get("withDeleted")),
                    "elevated": auth.elevated,
                    "limit": size + 1,
                    "offset": (page - 1) * size,
                },
            ).fetchall()

    async def search_metadata(self, request: Request) -> Response:
        body = await self._record(request)
        auth = self._user_auth(request, "asset.read")
        if isinstance(auth, Response):
            return auth
        try:
            dto = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _error(400, "Invalid JSON")
        if not isinstance(dto, dict):
            return _error(400, "Invalid input: expected object")
        problems = []
        if "id" in dto and not (isinstance(dto["id"], str) and _UUID_V4.match(dto["id"])):
            problems.append("[id] Invalid UUID")
        for key, low, high in (("size", 1, 1000), ("page", 1, None)):
            value = dto.get(key, low)
            if not isinstance(value, int) or isinstance(value, bool) or value < low or (high and value > high):
                problems.append(f"[{key}] Invalid input")
        if dto.get("type") not in (None, "IMAGE", "VIDEO", "AUDIO", "OTHER"):
            problems.append("[type] Invalid option")
        if dto.get("visibility") not in (None, "archive", "timeline", "hidden", "locked"):
            problems.append("[visibility] Invalid option")
        if problems:
            return _error(400, "; ".join(problems))
        rows = await asyncio.to_thread(self._metadata_search, auth, dto)
        size = dto.get("size", 250)
        items = [self._dto(row, auth) for row in rows[:size]]
        for item in items:
            for key in ("owner", "tags", "stack"):
                item.pop(key)
        return JSONResponse(
            {
                "albums": {"total": 0, "count": 0, "items": [], "facets": []},
                "assets": {
                    "total": len(items),
                    "count": len(items),
                    "items": items,
                    "facets": [],
                    "nextPage": str(dto.get("page", 1) + 1) if len(rows) > size else None,
                },
            }
        )

    def _owned(self, auth: Auth, ids: list[UUID]) -> set[UUID]:
        """Immich's asset.update access: the caller owns the asset (a locked one only in an elevated session)."""
        assert auth.user is not None
        with psycopg.connect(self.db_uri, autocommit=True) as conn:
            rows = conn.execute(
                """SELECT id FROM asset WHERE id = ANY(%s) AND "ownerId" = %s AND (visibility <> 'locked' OR %s)""",
                [ids, auth.user.id, auth.elevated],
            ).fetchall()
        return {row[0] for row in rows}

    async def asset_jobs(self, request: Request) -> Response:
        body = await self._record(request)
        auth = self._user_auth(request, "job.create")
        if isinstance(auth, Response):
            return auth
        try:
            dto = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _error(400, "Invalid JSON")
        ids = dto.get("assetIds") if isinstance(dto, dict) else None
        name = dto.get("name") if isinstance(dto, dict) else None
        if not isinstance(ids, list) or not all(isinstance(i, str) and _UUID_V4.match(i) for i in ids):
            return _error(400, "[assetIds] Invalid input")
        if name not in ASSET_JOB_NAMES:
            return _error(400, f"[name] Invalid option: expected one of {'|'.join(ASSET_JOB_NAMES)}")
        wanted = {UUID(i) for i in ids}
        if wanted and await asyncio.to_thread(self._owned, auth, list(wanted)) != wanted:
            return _error(400, "Not found or no asset.update access")
        self.queued_jobs += [(name, asset_id) for asset_id in wanted]
        return Response(status_code=204)

    # ---- PUT /api/assets, duplicates, tags (what the library bridge calls) ---------------------------------

    def _sql(self, query: str, params: Any = None) -> list[dict[str, Any]]:
        with psycopg.connect(self.db_uri, autocommit=True, row_factory=dict_row) as conn:
            cursor = conn.execute(query, params)
            return cursor.fetchall() if cursor.description else []

    async def _json_body(self, request: Request) -> dict[str, Any] | Response:
        body = await self._record(request)
        try:
            dto = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _error(400, "Invalid JSON")
        return dto if isinstance(dto, dict) else _error(400, "Invalid input: expected object")

    async def update_assets(self, request: Request) -> Response:
        """``PUT /api/assets`` (AssetBulkUpdateDto; asset.update): every id must be the caller's own (Immich's
        requireAccess AssetUpdate), 204. Only ``duplicateId`` and ``isFavorite`` are applied here."""
        auth = self._user_auth(request, "asset.update")
        if isinstance(auth, Response):
            return auth
        dto = await self._json_body(request)
        if isinstance(dto, Response):
            return dto
        ids = dto.get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) and _UUID_V4.match(i) for i in ids):
            return _error(400, "[ids] Invalid input")
        duplicate = dto.get("duplicateId", ...)
        if (
            duplicate is not ...
            and duplicate is not None
            and not (isinstance(duplicate, str) and _UUID_V4.match(duplicate))
        ):
            return _error(400, "[duplicateId] Invalid input")
        wanted = {UUID(i) for i in ids}
        if wanted and await asyncio.to_thread(self._owned, auth, list(wanted)) != wanted:
            return _error(400, "Not found or no asset.update access")
        if duplicate is not ...:
            await asyncio.to_thread(
                self._sql, 'UPDATE asset SET "duplicateId" = %s WHERE id = ANY(%s)', [duplicate, list(wanted)]
            )
        if isinstance(dto.get("isFavorite"), bool):
            await asyncio.to_thread(
                self._sql, 'UPDATE asset SET "isFavorite" = %s WHERE id = ANY(%s)', [dto["isFavorite"], list(wanted)]
            )
        return Response(status_code=204)

    def _duplicates(self, auth: Auth) -> list[dict[str, Any]]:
        """Immich's DuplicateService.getDuplicates: cleanupSingletonGroups, then DuplicateRepository.getAll (the
        caller's assets with a duplicateId, not trashed, not stacked, timeline/archive, with an asset_exif row;
        groups of more than one, assets by localDateTime)."""
        assert auth.user is not None
        user = auth.user.id
        self._sql(
            """WITH singletons AS (
                 SELECT "duplicateId" FROM asset WHERE "ownerId" = %(user)s AND "duplicateId" IS NOT NULL
                   AND "deletedAt" IS NULL AND "stackId" IS NULL GROUP BY "duplicateId" HAVING count(id) = 1)
               UPDATE asset SET "duplicateId" = NULL FROM singletons
               WHERE asset."duplicateId" = singletons."duplicateId" """,
            {"user": user},
        )
        rows = self._sql(
            """SELECT a.*, e."assetId" AS exif_asset, e.make, e.model, e.city, e.state, e.country, e."lensModel",
                      e.rating, e.description, u.email AS owner_email, u.name AS owner_name
               FROM asset AS a JOIN asset_exif AS e ON e."assetId" = a.id JOIN "user" AS u ON u.id = a."ownerId"
               WHERE a."ownerId" = %(user)s AND a."duplicateId" IS NOT NULL AND a."deletedAt" IS NULL
                 AND a."stackId" IS NULL AND a.visibility IN ('archive', 'timeline')
               ORDER BY a."duplicateId", a."localDateTime" """,
            {"user": user},
        )
        groups: dict[Any, list[dict[str, Any]]] = {}
        for row in rows:
            groups.setdefault(row["duplicateId"], []).append(self._dto(row, auth))
        return [
            {"duplicateId": str(key), "assets": assets, "suggestedKeepAssetIds": [assets[0]["id"]]}
            for key, assets in groups.items()
            if len(assets) > 1
        ]

    async def duplicates(self, request: Request) -> Response:
        await self._record(request)
        auth = self._user_auth(request, "duplicate.read")
        if isinstance(auth, Response):
            return auth
        return JSONResponse(await asyncio.to_thread(self._duplicates, auth))

    async def delete_duplicate(self, request: Request) -> Response:
        """``DELETE /api/duplicates/{id}`` (duplicate.delete): Immich's "keep all" for a group - the caller's
        assets in it get duplicateId NULL."""
        await self._record(request)
        auth = self._user_auth(request, "duplicate.delete")
        if isinstance(auth, Response):
            return auth
        assert auth.user is not None
        duplicate_id = request.path_params["duplicate_id"]
        if not _UUID_V4.match(duplicate_id):
            return _error(400, "[id] Invalid UUID")
        await asyncio.to_thread(
            self._sql,
            'UPDATE asset SET "duplicateId" = NULL WHERE "ownerId" = %s AND "duplicateId" = %s',
            [auth.user.id, duplicate_id],
        )
        return Response(status_code=204)

    @staticmethod
    def _tag_dto(row: dict[str, Any]) -> dict[str, Any]:
        """Immich's mapTag: name is the last segment of value; parentId and color only when set."""
        dto: dict[str, Any] = {
            "id": str(row["id"]),
            "name": row["value"].split("/")[-1],
            "value": row["value"],
            "createdAt": _iso(row["createdAt"]),
            "updatedAt": _iso(row["updatedAt"]),
        }
        if row["parentId"] is not None:
            dto["parentId"] = str(row["parentId"])
        if row["color"] is not None:
            dto["color"] = row["color"]
        return dto

    async def list_tags(self, request: Request) -> Response:
        await self._record(request)
        auth = self._user_auth(request, "tag.read")
        if isinstance(auth, Response):
            return auth
        assert auth.user is not None
        rows = await asyncio.to_thread(
            self._sql, 'SELECT * FROM tag WHERE "userId" = %s ORDER BY value', [auth.user.id]
        )
        return JSONResponse([self._tag_dto(r) for r in rows])

    def _own_tag(self, auth: Auth, tag_id: str) -> dict[str, Any] | None:
        assert auth.user is not None
        if not _UUID_V4.match(tag_id):
            return None
        rows = self._sql('SELECT * FROM tag WHERE id = %s AND "userId" = %s', [tag_id, auth.user.id])
        return rows[0] if rows else None

    async def get_tag(self, request: Request) -> Response:
        await self._record(request)
        auth = self._user_auth(request, "tag.read")
        if isinstance(auth, Response):
            return auth
        row = await asyncio.to_thread(self._own_tag, auth, request.path_params["tag_id"])
        if row is None:
            return _error(400, "Not found or no tag.read access")
        return JSONResponse(self._tag_dto(row))

    def _create_tag(self, auth: Auth, name: str, parent: dict[str, Any] | None) -> dict[str, Any] | None:
        """TagService.create + the closure rows Immich keeps (self, and every ancestor of the parent)."""
        assert auth.user is not None
        value = f"{parent['value']}/{name}" if parent else name
        with psycopg.connect(self.db_uri, row_factory=dict_row) as conn:
            if conn.execute('SELECT 1 FROM tag WHERE "userId" = %s AND value = %s', [auth.user.id, value]).fetchone():
                return None
            row = conn.execute(
                'INSERT INTO tag ("userId", value, "parentId") VALUES (%s, %s, %s) RETURNING *',
                [auth.user.id, value, parent["id"] if parent else None],
            ).fetchone()
            assert row is not None
            conn.execute("INSERT INTO tag_closure (id_ancestor, id_descendant) VALUES (%s, %s)", [row["id"], row["id"]])
            if parent:
                conn.execute(
                    "INSERT INTO tag_closure (id_ancestor, id_descendant) "
                    "SELECT id_ancestor, %s FROM tag_closure WHERE id_descendant = %s ON CONFLICT DO NOTHING",
                    [row["id"], parent["id"]],
                )
            return row

    async def create_tag(self, request: Request) -> Response:
        auth = self._user_auth(request, "tag.create")
        if isinstance(auth, Response):
            await self._record(request)
            return auth
        dto = await self._json_body(request)
        if isinstance(dto, Response):
            return dto
        name, parent_id = dto.get("name"), dto.get("parentId")
        if not isinstance(name, str):
            return _error(400, "[name] Invalid input: expected string")
        parent = None
        if parent_id is not None:
            parent = await asyncio.to_thread(self._own_tag, auth, str(parent_id))
            if parent is None:
                return _error(400, "Not found or no tag.read access")
        row = await asyncio.to_thread(self._create_tag, auth, name, parent)
        if row is None:
            return _error(400, "A tag with that name already exists")
        return JSONResponse(self._tag_dto(row), status_code=201)

    async def tag_assets(self, request: Request) -> Response:
        """``PUT /api/tags/assets`` (TagBulkAssetsDto; tag.asset): the caller's tags x the caller's own assets
        (others silently dropped, as Immich's checkAccess does), new links counted."""
        auth = self._user_auth(request, "tag.asset")
        if isinstance(auth, Response):
            await self._record(request)
            return auth
        assert auth.user is not None
        dto = await self._json_body(request)
        if isinstance(dto, Response):
            return dto
        tag_ids, asset_ids = dto.get("tagIds"), dto.get("assetIds")
        for key, value in (("tagIds", tag_ids), ("assetIds", asset_ids)):
            if not isinstance(value, list) or not all(isinstance(i, str) and _UUID_V4.match(i) for i in value):
                return _error(400, f"[{key}] Invalid input")
        assert isinstance(tag_ids, list) and isinstance(asset_ids, list)
        rows = await asyncio.to_thread(
            self._sql,
            """INSERT INTO tag_asset ("tagId", "assetId")
               SELECT t.id, a.id FROM tag AS t, asset AS a
               WHERE t.id = ANY(%(tags)s::uuid[]) AND t."userId" = %(user)s
                 AND a.id = ANY(%(assets)s::uuid[]) AND a."ownerId" = %(user)s
               ON CONFLICT DO NOTHING RETURNING "assetId" """,
            {"tags": tag_ids, "assets": asset_ids, "user": auth.user.id},
        )
        return JSONResponse({"count": len(rows)})

    async def upload(self, request: Request) -> Response:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        self.requests.append(Recorded(request.method, request.url.path, request.url.query, dict(request.headers), b""))
        return JSONResponse({"receivedBytes": size}, status_code=201)

    async def web(self, request: Request) -> Response:
        await self._record(request)
        path = request.url.path
        if path.startswith("/_app/immutable/"):
            return Response(APP_SCRIPT, media_type="application/javascript")
        html = HTML_PAGE.encode()
        headers = {"cache-control": "no-store"}
        if "gzip" in request.headers.get("accept-encoding", ""):
            # Immich serves its precompressed index.html.gz to clients that accept gzip.
            return Response(
                gzip.compress(html), media_type="text/html", headers={**headers, "content-encoding": "gzip"}
            )
        return Response(html, media_type="text/html", headers=headers)

    async def socket(self, websocket: WebSocket) -> None:
        self.requests.append(
            Recorded("WEBSOCKET", websocket.url.path, websocket.url.query, dict(websocket.headers), b"")
        )
        await websocket.accept()
        try:
            while True:
                message = await websocket.receive_text()
                await websocket.send_text(f"echo:{message}")
        except WebSocketDisconnect:
            pass

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/api/server/ping", self.ping, methods=["GET"]),
                Route("/api/server/about", self.about, methods=["GET"]),
                Route("/api/server/features", self.features, methods=["GET"]),
                Route("/api/users/me", self.me, methods=["GET"]),
                Route("/api/auth/status", self.auth_status, methods=["GET"]),
                Route("/api/assets", self.upload, methods=["POST"]),
                Route("/api/assets", self.update_assets, methods=["PUT"]),
                Route("/api/duplicates", self.duplicates, methods=["GET"]),
                Route("/api/duplicates/{duplicate_id}", self.delete_duplicate, methods=["DELETE"]),
                Route("/api/tags", self.list_tags, methods=["GET"]),
                Route("/api/tags", self.create_tag, methods=["POST"]),
                Route("/api/tags/assets", self.tag_assets, methods=["PUT"]),
                Route("/api/tags/{tag_id}", self.get_tag, methods=["GET"]),
                Route("/api/assets/jobs", self.asset_jobs, methods=["POST"]),
                Route("/api/assets/{asset_id}", self.asset, methods=["GET"]),
                Route("/api/assets/{asset_id}/thumbnail", self.thumbnail, methods=["GET"]),
                Route("/api/search/smart", self.smart_search, methods=["POST"]),
                Route("/api/search/metadata", self.search_metadata, methods=["POST"]),
                WebSocketRoute("/api/socket.io/", self.socket),
                Route("/{path:path}", self.web, methods=["GET"]),
            ]
        )

    @contextlib.contextmanager
    def running(self) -> Iterator[ImmichStub]:
        server = _ThreadedUvicorn(self.app(), self.port)
        server.start()
        try:
            yield self
        finally:
            server.stop()


# ---- a gateway with the search front, for the tests ------------------------------------------------------------

# Immich's default CLIP model answered by the tiny 512-d test model (random weights: shapes, not meaning).
TEST_CLIP_MAP = '{"ViT-B-32__openai": "test-cn-clip-512", "cn-clip/": "test-cn-clip-512"}'
TEST_CLIP_DIMENSIONS = '{"test-cn-clip-512": 512}'


def search_gateway_env(immich_url: str | None, db_uri: str, model_dir: Path, **extra: str) -> dict[str, str]:
    """Environment of a gateway process with the search front on (``immich_url`` None: off)."""
    env = {
        "DB_SEARCH_URL": db_uri,
        "AI_SERVICE_MODEL_DIR": str(model_dir),
        "GATEWAY_MODEL_MAP__CLIP": TEST_CLIP_MAP,
        "GATEWAY_CLIP_DIMENSIONS": TEST_CLIP_DIMENSIONS,
        "DB_SEARCH_RETRY_S": "1",
        "GATEWAY_IMMICH__CONFIG_TTL_S": "0",
        "GATEWAY_LOG_LEVEL": "debug",
        **extra,
    }
    if immich_url is not None:
        env["GATEWAY_IMMICH__URL"] = immich_url
    return env


def wait_search_ready(base: str, timeout_s: float = 120.0) -> None:
    """Until the gateway's search database is migrated and loaded (GET /status)."""
    import time

    import httpx

    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = httpx.get(base + "/status", timeout=5).json().get("search")
        if last and last.get("database_ready"):
            return
        time.sleep(0.2)
    raise TimeoutError(f"search database not ready: {last}")


@contextlib.contextmanager
def search_gateway(env: dict[str, str], log: Path, secrets_: list[str]) -> Iterator[str]:
    """A gateway process with the search front on, ready once its database is; yields its base URL.

    On the way out, none of ``secrets_`` (API keys, session tokens) may appear in its log."""
    from tests.gateway_support import gateway_process

    with gateway_process(env, log) as gw:
        wait_search_ready(gw.base)
        yield gw.base
        text = gw.log_text()
        leaked = [f"secret #{i}" for i, secret in enumerate(secrets_) if secret in text]
        assert not leaked, f"credentials in the gateway log: {leaked}"


def create_system_metadata(conn: psycopg.Connection[Any], config: dict[str, Any] | None) -> None:
    """Immich's system_metadata table (not in the schema fixture) with an optional stored 'system-config'."""
    conn.execute(
        'CREATE TABLE IF NOT EXISTS system_metadata ("key" character varying NOT NULL PRIMARY KEY, '
        '"value" jsonb NOT NULL)'
    )
    conn.execute("DELETE FROM system_metadata WHERE key = 'system-config'")
    if config is not None:
        conn.execute(
            "INSERT INTO system_metadata (key, value) VALUES ('system-config', %s)", [psycopg.types.json.Jsonb(config)]
        )
