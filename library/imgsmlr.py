"""imgsmlr-server compatible API, so its existing clients work unchanged.

* ``POST /imgsmlr/mgr/add`` ``{"url", "dataId"?, "remark"?, "meta"?}`` -> ``{"code", "msg", "data"}``
* ``POST /imgsmlr/search`` ``{"url", "threshold"?, "limit"?, "matchType"?}`` -> ``{"code", "msg", "data"}``
* ``GET /imgsmlr/``: a small page (add by URL, search by URL or upload, result grid).

As in the original, outcomes travel in ``code`` with HTTP 200 (400 for a bad URL, not an image, too large,
already present); a body that is not JSON or does not fit the schema is HTTP 422. The body is parsed as
JSON whatever the Content-Type says, because the original's documented client is ``curl -d '{...}'``
(which sends application/x-www-form-urlencoded).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from ai_service.imaging import ImageError
from library.fetch import FetchError, fetch_image_bytes
from library.ingest import IngestTooLargeError
from library.service import Hit, Library, UnavailableError

router = APIRouter(prefix="/imgsmlr", tags=["imgsmlr"])
PAGE = Path(__file__).with_name("static") / "imgsmlr.html"
MAX_BODY_BYTES = 1024 * 1024


class AddRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str = Field(min_length=1, max_length=8192)
    dataId: str | None = Field(default=None, max_length=1000)
    remark: str | None = Field(default=None, max_length=10000)
    meta: dict[str, Any] | None = None


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str = Field(min_length=1, max_length=8192)
    threshold: float | None = Field(default=None, ge=0)
    limit: int | None = Field(default=None, ge=1)
    matchType: Literal["pdq", "clip"] | None = None


def _reply(code: int, msg: str, data: Any) -> dict[str, Any]:
    return {"code": code, "msg": msg, "data": data}


Body = TypeVar("Body", bound=BaseModel)


async def _parse(request: Request, model: type[Body]) -> Body:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise HTTPException(413, "request body too large")
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HTTPException(422, f"request body is not JSON: {exc}") from None
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise HTTPException(422, json.loads(exc.json(include_url=False))) from None


def _library(request: Request) -> Library:
    return request.app.state.library


_BODY_DOC = {"requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}, "required": True}}


@router.post("/mgr/add", summary="imgsmlr: add an image by URL", openapi_extra=_BODY_DOC)
async def add(request: Request) -> dict[str, Any]:
    body = await _parse(request, AddRequest)
    library = _library(request)
    try:
        added = await run_in_threadpool(
            library.ingestor.add_url, body.url, data_id=body.dataId, remark=body.remark, meta=body.meta
        )
    except FetchError as exc:
        return _reply(400, f"cannot fetch the image: {exc}", None)
    except IngestTooLargeError as exc:
        return _reply(400, f"image too large: {exc}", None)
    except ImageError as exc:
        return _reply(400, f"not an image: {exc}", None)
    library.wake_workers()
    data = {"id": added.item_id, "md5": added.md5}
    if not added.created:
        return _reply(400, f"image file already exists (id {added.item_id})", data)
    return _reply(200, "OK", data)


def _image(request: Request, hit: Hit) -> dict[str, Any]:
    it = hit.item
    url = it.location if it.source == "url" else str(request.url_for("get_image", item_id=it.id))
    found = {
        "id": it.id,
        "url": url,
        "dataId": it.data_id,
        "md5": it.md5,
        "remark": it.remark,
        "meta": it.meta,
        # PDQ: Hamming distance in bits (an integer, 0-256); CLIP: cosine distance (0-2).
        "simr": int(hit.distance) if hit.match_type == "pdq" else hit.distance,
        "matchType": hit.match_type,
    }
    # Video hits say where in the video: "t" for an image query, "tStart"/"tEnd" for a clip or GIF (seconds).
    if hit.t is not None:
        found["t"] = hit.t
    if hit.t_start is not None:
        found["tStart"], found["tEnd"] = hit.t_start, hit.t_end
    return found


@router.post("/search", summary="imgsmlr: search by an image URL", openapi_extra=_BODY_DOC)
async def search(request: Request) -> dict[str, Any]:
    body = await _parse(request, SearchRequest)
    library = _library(request)
    kind = body.matchType or library.default_match_type()

    def run() -> tuple[float, list[Hit]]:
        fetched = fetch_image_bytes(body.url, library.settings)
        return library.search_image(fetched.data, kind, body.threshold, body.limit)

    try:
        threshold, hits = await run_in_threadpool(run)
    except FetchError as exc:
        return _reply(400, f"cannot fetch the image: {exc}", None)
    except IngestTooLargeError as exc:
        return _reply(400, f"image too large: {exc}", None)
    except ImageError as exc:
        return _reply(400, f"not an image: {exc}", None)
    except UnavailableError as exc:
        return _reply(400, str(exc), None)
    except ValueError as exc:  # too many pixels
        return _reply(400, str(exc), None)
    return _reply(200, "OK", {"threshold": threshold, "images": [_image(request, h) for h in hits]})


@router.get("/", response_class=HTMLResponse, summary="imgsmlr: web page")
def page() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))
