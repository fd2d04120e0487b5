"""The search front's pure parts: where a credential is read from, the ``ocr:`` prefix, SmartSearchDto mapping,
and reading Immich's machine-learning settings (with Immich's defaults for everything not stored)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from uuid import UUID

import pytest
from pydantic import ValidationError
from starlette.requests import Request

from db.search import UNSET, SearchFilters
from db.settings import DbSearchSettings
from gateway.search.credentials import Credential, CredentialKind, SharedLinkRefused, credential_from
from gateway.search.dto import DtoError, parse_smart_search, split_ocr_prefix
from gateway.search.immich_config import MlConfig, parse_ml_config
from gateway.settings import GatewaySettings


def request(headers: dict[str, str] | None = None, query: str = "") -> Request:
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": raw, "query_string": query.encode()})


# ---- credentials ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        ({"cookie": "immich_is_authenticated=true; immich_access_token=tok; x=1"}, "", ("session", "tok")),
        ({"authorization": "Bearer tok"}, "", ("session", "tok")),
        ({"authorization": "bearer  tok "}, "", ("session", "tok")),
        ({"x-immich-user-token": "tok"}, "", ("session", "tok")),
        ({"x-immich-session-token": "tok"}, "", ("session", "tok")),
        ({}, "sessionKey=tok", ("session", "tok")),
        ({"x-api-key": "key"}, "", ("api_key", "key")),
        ({}, "apiKey=key", ("api_key", "key")),
        # Immich's order: a session token wins over an API key; the header over the cookie
        ({"x-api-key": "key", "cookie": "immich_access_token=tok"}, "", ("session", "tok")),
        ({"x-immich-user-token": "first", "authorization": "Bearer second"}, "", ("session", "first")),
        ({"authorization": "Basic dXNlcjpwdw=="}, "", None),  # not a bearer token
        ({"cookie": "other=1"}, "", None),
        ({"cookie": 'bad"cookie; immich_access_token=tok'}, "", ("session", "tok")),  # one malformed cookie
        ({}, "", None),
    ],
)
def test_credential_in_immichs_order(headers: dict[str, str], query: str, expected: tuple[str, str] | None) -> None:
    found = credential_from(request(headers, query))
    assert (None if found is None else (found.kind.value, found.value)) == expected


@pytest.mark.parametrize(
    ("headers", "query"),
    [({"x-immich-share-key": "k", "x-api-key": "key"}, ""), ({"x-immich-share-slug": "s"}, ""), ({}, "key=k")],
)
def test_shared_links_are_refused(headers: dict[str, str], query: str) -> None:
    with pytest.raises(SharedLinkRefused):
        credential_from(request(headers, query))


def test_a_credential_never_shows_its_value() -> None:
    secret = "sess-0123456789abcdef"
    credential = Credential(CredentialKind.SESSION, secret)
    assert secret not in repr(credential) and secret not in str(credential)
    assert secret not in credential.cache_key() and len(credential.cache_key()) == 64
    assert Credential(CredentialKind.API_KEY, secret).cache_key() != credential.cache_key()
    assert credential.headers() == {"x-immich-user-token": secret}
    assert Credential(CredentialKind.API_KEY, "k").headers() == {"x-api-key": "k"}


# ---- the ocr: prefix -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "text"),
    [
        ("ocr:发票", "发票"),
        ("OCR:发票", "发票"),
        ("Ocr： 发票 ", "发票"),  # full-width colon, as a Chinese input method types it
        ("  ocr:  ", ""),
        ("ocr:ocr:x", "ocr:x"),
        ("ocr发票", None),
        ("my ocr:发票", None),
        ("ｏｃｒ:发票", None),  # full-width letters are not the prefix
        ("", None),
    ],
)
def test_ocr_prefix(query: str, text: str | None) -> None:
    assert split_ocr_prefix(query) == text


# ---- SmartSearchDto -------------------------------------------------------------------------------------------


def parse(body: dict[str, object]) -> object:
    return parse_smart_search({"query": "q", **body}, max_page=1000, max_size=1000, max_ids=3)


def test_dto_defaults() -> None:
    dto = parse_smart_search({"query": "  发票 "}, max_page=1000, max_size=1000, max_ids=3)
    assert dto.query == "发票" and dto.page == 1 and dto.size == 100 and dto.language is None
    assert dto.filters == SearchFilters(visibility="timeline") and not dto.with_exif and dto.unsupported == []


def test_dto_maps_every_supported_filter() -> None:
    person, album, library = (UUID(int=i, version=4) for i in (1, 2, 3))
    dto = parse_smart_search(
        {
            "query": "q",
            "language": "zh-CN",
            "page": 2,
            "size": 50.0,
            "withExif": True,
            "visibility": "archive",
            "type": "VIDEO",
            "isFavorite": True,
            "isMotion": False,
            "isNotInAlbum": True,
            "takenAfter": "2024-01-01T00:00:00.000Z",
            "takenBefore": "2024-12-31T23:59:59+08:00",
            "createdAfter": "2023-01-01T00:00:00Z",
            "city": "Beijing",
            "state": None,
            "make": "Canon",
            "lensModel": None,
            "rating": 5,
            "libraryId": str(library),
            "personIds": [str(person)],
            "albumIds": [str(album)],
            "deviceId": "ignored",
            "someFutureField": {"x": 1},
        },
        max_page=1000,
        max_size=1000,
        max_ids=3,
    )
    f = dto.filters
    assert (dto.language, dto.page, dto.size, dto.with_exif) == ("zh-CN", 2, 50, True)
    assert (f.visibility, f.asset_type, f.is_favorite, f.is_motion, f.is_not_in_album) == (
        "archive",
        "VIDEO",
        True,
        False,
        True,
    )
    assert f.taken_after == datetime(2024, 1, 1, tzinfo=UTC)
    assert f.taken_before == datetime(2024, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=8)))
    assert f.created_after == datetime(2023, 1, 1, tzinfo=UTC) and f.created_before is None
    assert (f.city, f.state, f.country, f.make, f.model, f.lens_model) == ("Beijing", None, UNSET, "Canon", UNSET, None)
    assert (f.rating, f.library_id, list(f.person_ids), list(f.album_ids)) == (5, library, [person], [album])
    assert f.with_exif and not f.with_deleted


def test_dto_immich_implications() -> None:
    assert parse({"isOffline": False}).filters.with_deleted is True  # type: ignore[attr-defined]
    assert parse({"libraryId": None}).filters.library_id is None  # type: ignore[attr-defined]
    assert parse({"rating": None}).filters.rating is None  # type: ignore[attr-defined]
    assert parse({"isFavorite": None}).filters.is_favorite is None  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("body", "unsupported"),
    [
        ({"tagIds": ["00000000-0000-4000-8000-000000000001"]}, ["tagIds"]),
        ({"tagIds": None}, ["tagIds"]),  # null: untagged assets - a filter too
        ({"tagIds": []}, []),
        ({"isEncoded": True, "ocr": "发票"}, ["isEncoded", "ocr"]),
        ({"isEncoded": None, "ocr": "", "updatedAfter": None}, []),
        ({"trashedAfter": "2024-01-01T00:00:00Z"}, ["trashedAfter"]),
    ],
)
def test_dto_reports_filters_the_layer_cannot_apply(body: dict[str, object], unsupported: list[str]) -> None:
    assert parse(body).unsupported == unsupported  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"query": 5}, "query"),
        ({"language": ["zh"]}, "language"),
        ({"visibility": "everything"}, "visibility"),
        ({"type": "image"}, "type"),
        ({"isFavorite": 1}, "isFavorite"),
        ({"withDeleted": "true"}, "withDeleted"),
        ({"takenAfter": "2024-13-01T00:00:00Z"}, "takenAfter"),
        ({"takenAfter": "2024-01-01"}, "takenAfter"),  # no time zone
        ({"createdBefore": 12}, "createdBefore"),
        ({"page": 0}, "page"),
        ({"page": 1001}, "page"),
        ({"page": True}, "page"),
        ({"size": 1.5}, "size"),
        ({"size": 1001}, "size"),
        ({"rating": 6}, "rating"),
        ({"rating": True}, "rating"),
        ({"city": 1}, "city"),
        ({"libraryId": "not-a-uuid"}, "libraryId"),
        ({"personIds": "x"}, "personIds"),
        ({"personIds": [1]}, "personIds[0]"),
        ({"albumIds": ["00000000-0000-4000-8000-000000000001"] * 4}, "albumIds"),  # over max_ids
    ],
)
def test_dto_rejects_wrong_values_naming_the_field(body: dict[str, object], field: str) -> None:
    with pytest.raises(DtoError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse(body)


# ---- Immich's machine-learning settings ----------------------------------------------------------------------


def test_ml_config_defaults_are_immichs() -> None:
    for raw in (None, {}, {"machineLearning": {}}, "not a dict", {"machineLearning": "x"}):
        config = parse_ml_config(raw, "database")
        assert config.clip.model_name == "ViT-B-32__openai" and config.clip_enabled and config.ocr_enabled
        assert (config.ocr.model_name, config.ocr.min_detection_score, config.ocr.min_recognition_score) == (
            "PP-OCRv5_mobile",
            0.5,
            0.8,
        )
        assert config.ocr.max_resolution == 736


def test_ml_config_reads_only_what_is_stored() -> None:
    config = parse_ml_config(
        {
            "machineLearning": {
                "clip": {"modelName": "cn-clip/ViT-B-16__openai"},
                "ocr": {"enabled": False, "minRecognitionScore": 0.6, "maxResolution": 1024},
            },
            "ffmpeg": {"crf": 23},
        },
        "database",
    )
    assert config.clip.model_name == "cn-clip/ViT-B-16__openai" and config.source == "database"
    assert not config.ocr_enabled and config.clip_enabled
    assert (config.ocr.min_detection_score, config.ocr.min_recognition_score, config.ocr.max_resolution) == (
        0.5,
        0.6,
        1024,
    )
    assert not parse_ml_config({"machineLearning": {"enabled": False}}, "file").clip_enabled


def test_ml_config_values_immich_would_refuse_fall_back() -> None:
    config = parse_ml_config(
        {
            "machineLearning": {
                "enabled": "yes",
                "clip": {"modelName": ""},
                "ocr": {"minDetectionScore": 0.01, "minRecognitionScore": True, "maxResolution": 0},
            }
        },
        "database",
    )
    assert config == MlConfig(source="database")


def test_search_settings_have_one_home_and_read_the_former_gateway_names(monkeypatch: pytest.MonkeyPatch) -> None:
    # One class (DB_SEARCH_*) holds every search setting; the front's former GATEWAY_SEARCH__* names still work.
    monkeypatch.setenv("GATEWAY_SEARCH__DB_POOL_SIZE", "3")
    monkeypatch.setenv("GATEWAY_SEARCH__HYBRID", "false")
    monkeypatch.setenv("DB_SEARCH_RETRY_S", "2.5")
    settings = DbSearchSettings()
    assert (settings.pool_size, settings.hybrid, settings.retry_s) == (3, False, 2.5)
    monkeypatch.setenv("DB_SEARCH_POOL_SIZE", "5")  # the new name wins over the old one
    assert DbSearchSettings().pool_size == 5
    assert DbSearchSettings(pool_size=7).pool_size == 7  # and code may pass fields by name
    monkeypatch.setenv("DB_SEARCH_POOL_SIZE", "0")
    with pytest.raises(ValidationError):
        DbSearchSettings()
    assert "search" not in GatewaySettings.model_fields
