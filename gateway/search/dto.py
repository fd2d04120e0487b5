"""Immich's ``SmartSearchDto`` (``POST /api/search/smart`` body) -> what the search layer takes.

Field names and meanings are Immich 3.1's (``server/src/dtos/search.dto.ts``). As Immich's zod pipe does,
unknown keys are ignored and a known key with a value of the wrong type is a 400 naming the field. Filters
that Immich supports but ``db.SearchFilters`` does not are reported in :attr:`SmartSearch.unsupported`, so the
caller can hand such a request to Immich (which applies them) instead of silently dropping a filter.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, get_args
from uuid import UUID

import orjson

from ai_service.errors import InvalidInput
from db.search import UNSET, AssetType, SearchFilters, Visibility

# Filters Immich's smart search applies that the search layer has no equivalent for.
UNSUPPORTED_FILTERS = (
    "tagIds",
    "isEncoded",
    "updatedAfter",
    "updatedBefore",
    "trashedAfter",
    "trashedBefore",
    "ocr",
)

# 'ocr:' / 'OCR:' / 'ocr：' (full-width colon, what a Chinese input method types) at the start of the query.
_OCR_PREFIX = re.compile(r"^ocr[:\uff1a]", re.IGNORECASE)

DEFAULT_PAGE_SIZE = 100  # Immich's SmartSearchDto default


class DtoError(InvalidInput, ValueError):
    """The body is not a valid SmartSearchDto; the message names the field (Immich answers these with 400)."""


@dataclass(frozen=True)
class SmartSearch:
    query: str  # trimmed, as Immich trims it
    language: str | None
    page: int
    size: int
    with_exif: bool
    filters: SearchFilters
    unsupported: list[str] = field(default_factory=list)

    @property
    def ocr_text(self) -> str | None:
        """The text after an ``ocr:`` prefix (trimmed), or None when the query has no such prefix."""
        return split_ocr_prefix(self.query)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN / Infinity: Immich's JSON.parse refuses them too


def _replace_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_replace_surrogates(k): _replace_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_surrogates(v) for v in value]
    return value


def load_json(body: bytes) -> Any:
    """The body as Immich's JSON parser reads it; ValueError when Immich would not parse it either.

    JSON may escape a lone surrogate (``"ocr:\\ud800发票"``); JavaScript accepts it, orjson does not. Such a
    string is read here too, each lone surrogate becoming U+FFFD: what Immich's database driver sends for it
    (UTF-8 cannot encode a lone surrogate), so the search is the one Immich would run."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return _replace_surrogates(json.loads(body.decode("utf-8"), parse_constant=_no_constants))
    except (UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(str(exc)) from None


def split_ocr_prefix(query: str) -> str | None:
    text = query.strip()
    match = _OCR_PREFIX.match(text)
    return text[match.end() :].strip() if match else None


def _bool(body: dict[str, Any], key: str) -> bool | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise DtoError(f"{key} must be a boolean value")
    return value


def _nullable_str(body: dict[str, Any], key: str) -> Any:
    if key not in body:
        return UNSET
    value = body[key]
    if value is not None and not isinstance(value, str):
        raise DtoError(f"{key} must be a string or null")
    return value


def _uuid(value: Any, key: str) -> UUID:
    if not isinstance(value, str):
        raise DtoError(f"{key} must be a UUID")
    try:
        return UUID(value)
    except ValueError:
        raise DtoError(f"{key} must be a UUID") from None


def _uuids(body: dict[str, Any], key: str, max_ids: int) -> tuple[UUID, ...]:
    value = body.get(key)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise DtoError(f"{key} must be an array of UUIDs")
    if len(value) > max_ids:
        raise DtoError(f"{key} may hold at most {max_ids} ids")
    return tuple(_uuid(v, f"{key}[{i}]") for i, v in enumerate(value))


def _datetime(body: dict[str, Any], key: str) -> datetime | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 64:
        raise DtoError(f"{key} must be an ISO 8601 date-time string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise DtoError(f"{key} must be an ISO 8601 date-time string") from None
    if parsed.tzinfo is None:
        # Immich requires an offset (zod's datetime({offset: true})); a naive time would be read in the
        # database's time zone, which is not what the caller meant.
        raise DtoError(f"{key} must include a time zone offset (e.g. 2024-01-01T00:00:00.000Z)")
    return parsed


def _int(body: dict[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise DtoError(f"{key} must be an integer")
    if not low <= value <= high:
        raise DtoError(f"{key} must be between {low} and {high}")
    return value


def parse_smart_search(body: dict[str, Any], *, max_page: int, max_size: int, max_ids: int) -> SmartSearch:
    """Validate and map a SmartSearchDto whose ``query`` is a string. Raises DtoError."""
    query = body.get("query")
    if not isinstance(query, str):
        raise DtoError("query must be a string")
    language = body.get("language")
    if language is not None and (not isinstance(language, str) or len(language) > 64):
        raise DtoError("language must be a string of at most 64 characters")
    filters = _filters(body, max_ids)
    return SmartSearch(
        query=query.strip(),
        language=language,
        page=_int(body, "page", 1, 1, max_page),
        size=_int(body, "size", DEFAULT_PAGE_SIZE, 1, max_size),
        with_exif=filters.with_exif,
        filters=filters,
        unsupported=_unsupported(body),
    )


def _filters(body: dict[str, Any], max_ids: int) -> SearchFilters:
    """The DTO's filters, checked as Immich checks them."""
    visibility = body.get("visibility")
    if visibility is None:
        # Immich's omitted visibility means "everything but locked", which includes archived assets and the
        # hidden video halves of motion photos; the web always sends 'timeline', and so do we by default.
        visibility = "timeline"
    elif visibility not in get_args(Visibility):
        raise DtoError(f"visibility must be one of {', '.join(get_args(Visibility))}")
    asset_type = body.get("type")
    if asset_type is not None and asset_type not in get_args(AssetType):
        raise DtoError(f"type must be one of {', '.join(get_args(AssetType))}")

    rating: Any = UNSET
    if "rating" in body:
        rating = body["rating"]
        if rating is not None and (not isinstance(rating, int) or isinstance(rating, bool) or not -1 <= rating <= 5):
            raise DtoError("rating must be an integer between -1 and 5, or null")

    library: Any = UNSET
    if "libraryId" in body:
        library = None if body["libraryId"] is None else _uuid(body["libraryId"], "libraryId")

    is_offline = _bool(body, "isOffline")
    with_deleted = bool(_bool(body, "withDeleted"))
    if is_offline is not None:
        with_deleted = True  # Immich: isOffline implies withDeleted (offline assets may be in the trash)
    with_exif = bool(_bool(body, "withExif"))

    return SearchFilters(
        visibility=visibility,
        with_deleted=with_deleted,
        taken_after=_datetime(body, "takenAfter"),
        taken_before=_datetime(body, "takenBefore"),
        created_after=_datetime(body, "createdAfter"),
        created_before=_datetime(body, "createdBefore"),
        asset_type=asset_type,
        is_favorite=_bool(body, "isFavorite"),
        is_motion=_bool(body, "isMotion"),
        is_offline=is_offline,
        library_id=library,
        city=_nullable_str(body, "city"),
        state=_nullable_str(body, "state"),
        country=_nullable_str(body, "country"),
        make=_nullable_str(body, "make"),
        model=_nullable_str(body, "model"),
        lens_model=_nullable_str(body, "lensModel"),
        rating=rating,
        with_exif=with_exif,
        album_ids=_uuids(body, "albumIds", max_ids),
        is_not_in_album=bool(_bool(body, "isNotInAlbum")),
        person_ids=_uuids(body, "personIds", max_ids),
    )


def _unsupported(body: dict[str, Any]) -> list[str]:
    """The filters given that this search cannot apply (the caller hands such searches to Immich)."""
    unsupported: list[str] = []
    for key in UNSUPPORTED_FILTERS:
        value = body.get(key, UNSET)
        if value is UNSET or (value is None and key != "tagIds"):
            continue  # not given (only tagIds: null asks for something: untagged assets)
        if isinstance(value, str | list) and not value:
            continue  # an empty filter, as Immich treats it
        unsupported.append(key)
    return unsupported
