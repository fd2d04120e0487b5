"""The library's HTTP API: native typed endpoints under /api, the imgsmlr-server compatible endpoints
under /imgsmlr, /metrics, and the web page.

Statuses: 400 bad input or URL that cannot be fetched, 404 unknown item, 409 something not configured or
not ready (CLIP without a model, an item not hashed yet), 413 too large, 415 not an image, 422 malformed
request. Never a 500 for what a client sent.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from PIL import Image
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, Field

from ai_service.api.limits import RequestBodyMiddleware
from ai_service.imaging import ImageError, ImageTooLargeError
from library import blocklist, items, people, tags, video
from library.fetch import FetchError, FetchTooLargeError, fetch_image_bytes
from library.filters import ItemFilters
from library.ingest import IngestTooLargeError
from library.pipeline import PermanentStepError, blob_path, video_source
from library.service import Hit, Library, NotFoundError, UnavailableError
from library.settings import LibrarySettings

log = logging.getLogger(__name__)

MatchTypeParam = Literal["pdq", "clip"]
TAG_DOC = "Keep only items with this tag (its English key, see /api/tags)."
NSFW_MAX_DOC = "Leave out items whose NSFW score (the 'nsfw' step) is above this; unscored items are kept."


# ---- models ---------------------------------------------------------------------------------------------


class AddUrlRequest(BaseModel):
    url: str = Field(min_length=1, max_length=8192, description="http(s) URL of the image.")
    data_id: str | None = Field(default=None, max_length=1000)
    remark: str | None = Field(default=None, max_length=10000)
    meta: dict[str, Any] | None = None


class AddResponse(BaseModel):
    id: int
    md5: str
    sha256: str
    created: bool = Field(description="False when the same bytes were already in the library.")


class SearchUrlRequest(BaseModel):
    url: str = Field(min_length=1, max_length=8192)
    match_type: MatchTypeParam | None = None
    threshold: float | None = Field(default=None, ge=0, le=256)
    limit: int | None = Field(default=None, ge=1, le=10000)
    nsfw_max: float | None = Field(default=None, ge=0, le=1, description=NSFW_MAX_DOC)
    tag: str | None = Field(default=None, max_length=200, description=TAG_DOC)


class HitModel(BaseModel):
    id: int
    md5: str
    sha256: str
    source: str
    location: str
    data_id: str | None
    remark: str | None
    meta: Any
    width: int
    height: int
    format: str
    distance: float
    match_type: str
    media: str = Field(default="image", description="'image' or 'video'.")
    duration_s: float | None = Field(default=None, description="A video's duration (seconds) as declared.")
    t: float | None = Field(default=None, description="Video hit of an image query: time of the matching frame (s).")
    t_start: float | None = Field(default=None, description="Video hit of a clip/GIF query: start of the span (s).")
    t_end: float | None = Field(default=None, description="Video hit of a clip/GIF query: end of the span (s).")


class SearchResponse(BaseModel):
    match_type: str
    threshold: float | None
    results: list[HitModel]


class StepModel(BaseModel):
    name: str
    state: str
    attempts: int
    reason: str | None
    next_attempt_at: str


class ItemResponse(HitModel):
    steps: list[StepModel]
    blocked: bool
    nsfw_score: float | None = Field(default=None, description="P(nsfw) from the 'nsfw' step, when it ran.")


class BlockCheckResponse(BaseModel):
    match: bool
    distance: int | None = None
    entry_id: int | None = None
    label: str | None = None


class ImportResponse(BaseModel):
    added: int
    already_listed: int
    items_flagged: int
    errors: list[str]


class FilterParams(BaseModel):
    """Filters of every search endpoint, as query parameters."""

    source: Literal["path", "url", "upload"] | None = Field(default=None, description="How items were added.")
    added_after: datetime | None = Field(default=None, description="Items added at or after (ISO 8601).")
    added_before: datetime | None = Field(default=None, description="Items added before (ISO 8601).")
    data_id: str | None = Field(default=None, max_length=1000, description="Items with this dataId.")
    location_prefix: str | None = Field(
        default=None, max_length=4096, description="Items whose path or URL starts with this (a folder)."
    )
    person_id: int | None = Field(default=None, ge=1, description="Items showing this person (see /api/people).")

    def to_filters(self, nsfw_max: float | None = None, tag: str | None = None) -> ItemFilters:
        """With the NSFW and tag filters, which each endpoint takes where its other inputs are (form, body, query)."""
        return ItemFilters(**self.model_dump(), nsfw_max=nsfw_max, tag=tag)


Filters = Annotated[FilterParams, Query()]


# ---- helpers --------------------------------------------------------------------------------------------


def lib(request: Request) -> Library:
    return request.app.state.library


@contextlib.contextmanager
def http_errors() -> Iterator[None]:
    """Map the library's exceptions to HTTP statuses with their (safe) messages."""
    try:
        yield
    except (NotFoundError, people.PersonNotFoundError) as exc:
        raise HTTPException(404, str(exc)) from None
    except UnavailableError as exc:
        raise HTTPException(409, str(exc)) from None
    except (IngestTooLargeError, FetchTooLargeError) as exc:
        raise HTTPException(413, str(exc)) from None
    except FetchError as exc:
        raise HTTPException(400, f"cannot fetch the URL: {exc}") from None
    except ImageError as exc:
        raise HTTPException(415, str(exc)) from None
    except ImageTooLargeError as exc:
        raise HTTPException(413, str(exc)) from None
    except ValueError as exc:  # other checks on client input (e.g. a duplicates threshold out of range)
        raise HTTPException(400, str(exc)) from None


def read_upload(upload: UploadFile, limit: int) -> bytes:
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"the upload is larger than {limit} bytes (LIBRARY_MAX_IMAGE_BYTES)")
    if not data:
        raise HTTPException(400, "the upload is empty")
    return data


def _search_response(match_type: str, threshold: float | None, hits: list[Any]) -> SearchResponse:
    return SearchResponse(match_type=match_type, threshold=threshold, results=[HitModel(**h.as_dict()) for h in hits])


# ---- native API -------------------------------------------------------------------------------------------

router = APIRouter(prefix="/api", tags=["library"])


@router.post("/items", response_model=AddResponse, status_code=201, summary="Add an image by upload")
def add_upload(
    request: Request,
    response: Response,
    file: Annotated[UploadFile, File()],
    data_id: Annotated[str | None, Form(max_length=1000)] = None,
    remark: Annotated[str | None, Form(max_length=10000)] = None,
) -> AddResponse:
    library = lib(request)
    data = read_upload(file, library.settings.max_image_bytes)
    with http_errors():
        added = library.ingestor.add_bytes(
            data, source="upload", location="upload", data_id=data_id, remark=remark, hash_now=True
        )
    library.wake_workers()
    if not added.created:
        response.status_code = 200
    return AddResponse(id=added.item_id, md5=added.md5, sha256=added.sha256, created=added.created)


@router.post("/items/url", response_model=AddResponse, status_code=201, summary="Add an image by URL")
def add_url(request: Request, response: Response, body: AddUrlRequest) -> AddResponse:
    library = lib(request)
    with http_errors():
        added = library.ingestor.add_url(body.url, data_id=body.data_id, remark=body.remark, meta=body.meta)
    library.wake_workers()
    if not added.created:
        response.status_code = 200
    return AddResponse(id=added.item_id, md5=added.md5, sha256=added.sha256, created=added.created)


@router.get("/items/{item_id}", response_model=ItemResponse, summary="An item, its pipeline steps, block flag")
def get_item(request: Request, item_id: int) -> ItemResponse:
    with lib(request).db.conn() as conn:
        item = items.get_item(conn, item_id)
        if item is None:
            raise HTTPException(404, f"no item {item_id}")
        steps = items.step_states(conn, item_id)
        blocked = conn.execute("SELECT 1 FROM block_hit WHERE item_id = %s", [item_id]).fetchone() is not None
        nsfw = conn.execute("SELECT score FROM nsfw WHERE item_id = %s", [item_id]).fetchone()
    return ItemResponse(
        **Hit(item, 0.0, "").as_dict(),
        steps=[StepModel(**s) for s in steps],
        blocked=blocked,
        nsfw_score=float(nsfw[0]) if nsfw else None,
    )


@router.get("/items/{item_id}/image", summary="The item's bytes (a video: a JPEG of its frame at t; blocked: 451)")
def get_image(
    request: Request,
    item_id: int,
    t: Annotated[float, Query(ge=0, le=7 * 86400, description="A video's frame at this time (seconds).")] = 0.0,
) -> Response:
    library = lib(request)
    with library.db.conn() as conn:
        item = items.get_item(conn, item_id)
        blocked = conn.execute("SELECT 1 FROM block_hit WHERE item_id = %s", [item_id]).fetchone() is not None
    if item is None:
        raise HTTPException(404, f"no item {item_id}")
    if blocked:
        raise HTTPException(451, "this image matches the blocklist")
    if item.media == "video":
        return _video_frame(library, item, t)
    path = blob_path(library.settings, item.blob) if item.blob else Path(item.location)
    try:
        data = path.read_bytes()
    except OSError:
        raise HTTPException(404, "the item's file is no longer available") from None
    return Response(data, media_type=Image.MIME.get(item.format, "application/octet-stream"))


def _video_frame(library: Library, item: items.Item, t: float) -> Response:
    """A video is shown as the JPEG of one frame (thumbnails in the pages, the frame a search matched)."""
    try:
        rgb = video.frame_at(video_source(library.settings, item), library.settings, t)
    except (PermanentStepError, video.VideoError) as exc:
        raise HTTPException(404, f"the video's frame is not available: {exc}") from None
    return Response(video.jpeg(rgb), media_type="image/jpeg")


class FaceModel(BaseModel):
    id: int
    n: int
    box: list[float] = Field(description="x1, y1, x2, y2 in pixels of the upright image")
    score: float
    person_id: int | None = Field(description="The person the face belongs to; null: none (yet).")
    assigned_by: Literal["auto", "user"] = Field(
        description="'auto': clustering placed it (or may, while it has no person); 'user': a person's decision, "
        "which clustering never changes."
    )


@router.get("/items/{item_id}/faces", response_model=list[FaceModel], summary="Faces found in an item")
def get_faces(request: Request, item_id: int) -> list[FaceModel]:
    with lib(request).db.conn() as conn:
        if items.get_item(conn, item_id) is None:
            raise HTTPException(404, f"no item {item_id}")
        return [FaceModel(**f) for f in people.item_faces(conn, item_id)]


# ---- people -------------------------------------------------------------------------------------------------


class CoverModel(BaseModel):
    face_id: int
    item_id: int
    box: list[float] = Field(description="The face's x1, y1, x2, y2 in pixels of the item's upright image.")


class PersonModel(BaseModel):
    id: int
    name: str | None
    model: str = Field(description="The face model whose vectors make this person.")
    face_count: int
    item_count: int
    cover: CoverModel | None = Field(description="The face nearest the person's mean, with its item.")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, p: people.Person) -> PersonModel:
        cover = None
        if p.cover_face_id is not None and p.cover_item_id is not None and p.cover_box is not None:
            cover = CoverModel(face_id=p.cover_face_id, item_id=p.cover_item_id, box=list(p.cover_box))
        return cls(
            id=p.id,
            name=p.name,
            model=p.model,
            face_count=p.face_count,
            item_count=p.item_count,
            cover=cover,
            created_at=p.created_at,
            updated_at=p.updated_at,
        )


class PeopleResponse(BaseModel):
    total: int
    people: list[PersonModel]


class PersonItemsResponse(BaseModel):
    total: int
    items: list[HitModel]


class RenameRequest(BaseModel):
    name: str | None = Field(max_length=200, description="The new name; null or blank clears it.")


class MergeRequest(BaseModel):
    source_ids: list[int] = Field(min_length=1, max_length=1000, description="People merged into this one.")
    name: str | None = Field(
        default=None, max_length=200, description="Name of the result; unset: this person's, else a source's."
    )


class FacePersonRequest(BaseModel):
    person_id: int | None = Field(description="Put the face in this person; null: take it out of its person.")


class ReclusterResponse(BaseModel):
    person_id: int
    kept: int = Field(description="Faces left in the person.")
    new_people: list[int] = Field(description="People made of the groups split off.")
    unassigned: int = Field(description="Faces in no group, now without a person.")


@router.get("/people", response_model=PeopleResponse, summary="People found in the faces, most faces first")
def list_people(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
    named: Annotated[bool | None, Query(description="Only named (true) or unnamed (false) people.")] = None,
) -> PeopleResponse:
    with lib(request).db.conn() as conn:
        total, found = people.list_people(conn, limit, offset, named)
    return PeopleResponse(total=total, people=[PersonModel.of(p) for p in found])


@router.get("/people/{person_id}", response_model=PersonModel, summary="One person")
def get_person(request: Request, person_id: int) -> PersonModel:
    with http_errors(), lib(request).db.conn() as conn:
        return PersonModel.of(people.get_person(conn, person_id))


@router.get("/people/{person_id}/items", response_model=PersonItemsResponse, summary="Items showing a person")
def person_items(
    request: Request,
    person_id: int,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> PersonItemsResponse:
    with http_errors(), lib(request).db.conn() as conn:
        total, ids = people.person_item_ids(conn, person_id, limit, offset)
        found = items.get_items(conn, ids)
    return PersonItemsResponse(
        total=total, items=[HitModel(**Hit(found[i], 0.0, "person").as_dict()) for i in ids if i in found]
    )


@router.patch("/people/{person_id}", response_model=PersonModel, summary="Rename a person")
def rename_person(request: Request, person_id: int, body: RenameRequest) -> PersonModel:
    with http_errors(), lib(request).db.conn() as conn:
        return PersonModel.of(people.rename(conn, person_id, body.name))


@router.post("/people/{person_id}/merge", response_model=PersonModel, summary="Merge people into this one")
def merge_people(request: Request, person_id: int, body: MergeRequest) -> PersonModel:
    with http_errors(), lib(request).db.conn() as conn:
        return PersonModel.of(people.merge(conn, person_id, body.source_ids, body.name))


@router.post("/people/{person_id}/recluster", response_model=ReclusterResponse, summary="Split a mixed person")
def recluster_person(request: Request, person_id: int) -> ReclusterResponse:
    library = lib(request)
    with http_errors(), library.db.conn() as conn:
        result = people.recluster(conn, library.settings, person_id)
    return ReclusterResponse(**result.__dict__)


@router.post("/people/cluster", summary="Cluster the faces still waiting for a person")
def cluster_waiting(request: Request) -> dict[str, int]:
    library = lib(request)
    with library.db.conn() as conn:
        return {"placed": people.cluster_waiting(conn, library.settings)}


@router.put("/faces/{face_id}/person", response_model=FaceModel, summary="Move a face to a person, or out of one")
def set_face_person(request: Request, face_id: int, body: FacePersonRequest) -> FaceModel:
    with http_errors(), lib(request).db.conn() as conn:
        return FaceModel(**people.set_face_person(conn, face_id, body.person_id))


@router.get("/items/{item_id}/tags", summary="An item's tags (English and Chinese names, score)")
def get_tags(request: Request, item_id: int) -> list[dict[str, Any]]:
    with lib(request).db.conn() as conn:
        if items.get_item(conn, item_id) is None:
            raise HTTPException(404, f"no item {item_id}")
        return tags.item_tags(conn, item_id)


@router.get("/tags", summary="Tag facets: item counts per tag, over the library or over a text search's results")
def tag_facets(
    request: Request,
    filters: Filters,
    limit: Annotated[int, Query(ge=1, le=5000)] = 100,
    lang: Annotated[Literal["zh", "en"], Query(description="Language of each tag's 'name'.")] = "zh",
    q: Annotated[
        str | None, Query(min_length=1, max_length=1000, description="Count over this text search's results.")
    ] = None,
    mode: Literal["ocr", "clip", "hybrid"] = "ocr",
    search_limit: Annotated[int | None, Query(ge=1, le=10000, description="Results of the search counted.")] = None,
    nsfw_max: Annotated[float | None, Query(ge=0, le=1, description=NSFW_MAX_DOC)] = None,
    tag: Annotated[str | None, Query(max_length=200, description=TAG_DOC)] = None,
) -> dict[str, Any]:
    library = lib(request)
    ids: list[int] | None = None
    if q is not None:
        with http_errors():
            hits = library.search_text(q, mode, search_limit, filters.to_filters(nsfw_max, tag))
        ids = [h.item.id for h in hits]
    with library.db.conn() as conn:
        return {"tags": tags.facets(conn, limit, lang, ids), "items": len(ids) if ids is not None else None}


@router.get("/status", summary="Item and pipeline-step counts")
def status(request: Request) -> dict[str, Any]:
    with lib(request).db.conn() as conn:
        row = conn.execute("SELECT count(*) FROM item").fetchone()
        entries, hits = blocklist.counts(conn)
        return {
            "items": int(row[0]) if row else 0,
            "steps": items.step_counts(conn),
            "blocklist_entries": entries,
            "blocked_items": hits,
        }


@router.post("/search/image", response_model=SearchResponse, summary="Search by an uploaded image (not stored)")
def search_image(
    request: Request,
    file: Annotated[UploadFile, File()],
    filters: Filters,
    match_type: Annotated[MatchTypeParam | None, Form()] = None,
    threshold: Annotated[float | None, Form(ge=0, le=256)] = None,
    limit: Annotated[int | None, Form(ge=1, le=10000)] = None,
    nsfw_max: Annotated[float | None, Form(ge=0, le=1, description=NSFW_MAX_DOC)] = None,
    tag: Annotated[str | None, Form(max_length=200, description=TAG_DOC)] = None,
) -> SearchResponse:
    library = lib(request)
    data = read_upload(file, library.settings.max_image_bytes)
    kind = match_type or library.default_match_type()
    with http_errors():
        thr, hits = library.search_image(data, kind, threshold, limit, filters.to_filters(nsfw_max, tag))
    return _search_response(kind, thr, hits)


@router.post("/search/url", response_model=SearchResponse, summary="Search by an image URL (not stored)")
def search_url(request: Request, body: SearchUrlRequest, filters: Filters) -> SearchResponse:
    library = lib(request)
    kind = body.match_type or library.default_match_type()
    with http_errors():
        fetched = fetch_image_bytes(body.url, library.settings)
        thr, hits = library.search_image(
            fetched.data, kind, body.threshold, body.limit, filters.to_filters(body.nsfw_max, body.tag)
        )
    return _search_response(kind, thr, hits)


@router.get("/search/item/{item_id}", response_model=SearchResponse, summary="Items similar to an item")
def search_item(
    request: Request,
    item_id: int,
    filters: Filters,
    match_type: MatchTypeParam | None = None,
    threshold: Annotated[float | None, Query(ge=0, le=256)] = None,
    limit: Annotated[int | None, Query(ge=1, le=10000)] = None,
    nsfw_max: Annotated[float | None, Query(ge=0, le=1, description=NSFW_MAX_DOC)] = None,
    tag: Annotated[str | None, Query(max_length=200, description=TAG_DOC)] = None,
) -> SearchResponse:
    library = lib(request)
    kind = match_type or library.default_match_type()
    with http_errors():
        thr, hits = library.search_item(item_id, kind, threshold, limit, filters.to_filters(nsfw_max, tag))
    return _search_response(kind, thr, hits)


@router.get("/search/text", response_model=SearchResponse, summary="Search by text: OCR, CLIP or both")
def search_text(
    request: Request,
    q: Annotated[str, Query(min_length=1, max_length=1000)],
    filters: Filters,
    mode: Literal["ocr", "clip", "hybrid"] = "ocr",
    limit: Annotated[int | None, Query(ge=1, le=10000)] = None,
    nsfw_max: Annotated[float | None, Query(ge=0, le=1, description=NSFW_MAX_DOC)] = None,
    tag: Annotated[str | None, Query(max_length=200, description=TAG_DOC)] = None,
) -> SearchResponse:
    with http_errors():
        hits = lib(request).search_text(q, mode, limit, filters.to_filters(nsfw_max, tag))
    return _search_response(mode, None, hits)


@router.get("/duplicates", summary="Groups of near-duplicate items (PDQ)")
def duplicates(
    request: Request,
    threshold: Annotated[float | None, Query(ge=0, le=256)] = None,
    kind: MatchTypeParam = "pdq",
) -> dict[str, list[list[HitModel]]]:
    with http_errors():
        groups = lib(request).duplicates(threshold, kind)
    return {"groups": [[HitModel(**h) for h in g] for g in groups]}


@router.post("/blocklist/hashes", response_model=ImportResponse, summary="Import PDQ hashes (ThreatExchange text)")
def import_hashes(request: Request, file: Annotated[UploadFile, File()]) -> ImportResponse:
    library = lib(request)
    raw = read_upload(file, library.settings.max_blocklist_import_bytes)
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(400, "the hash list is not UTF-8 text") from None
    report = library.import_blocklist_text(content, file.filename or "upload")
    if report.added == 0 and report.already_listed == 0 and report.errors:
        raise HTTPException(400, "no PDQ hash found; " + "; ".join(report.errors[:5]))
    return ImportResponse(**report.__dict__)


@router.post("/blocklist/images", response_model=ImportResponse, summary="Add reference images (hashed, not kept)")
def import_images(request: Request, files: Annotated[list[UploadFile], File()]) -> ImportResponse:
    library = lib(request)
    images = [(f.filename or "upload", read_upload(f, library.settings.max_image_bytes)) for f in files]
    return ImportResponse(**library.import_blocklist_images(images).__dict__)


@router.get("/blocklist/hits", summary="Items that matched the blocklist")
def blocklist_hits(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> dict[str, list[dict[str, Any]]]:
    with lib(request).db.conn() as conn:
        return {"hits": blocklist.list_hits(conn, limit, offset)}


@router.post("/blocklist/check", response_model=BlockCheckResponse, summary="Check an image; it is never stored")
def blocklist_check(request: Request, file: Annotated[UploadFile, File()]) -> BlockCheckResponse:
    library = lib(request)
    data = read_upload(file, library.settings.max_image_bytes)
    with http_errors():
        found = library.check_blocklist(data)
    if found is None:
        return BlockCheckResponse(match=False)
    return BlockCheckResponse(match=True, distance=found.distance, entry_id=found.entry_id, label=found.label)


# ---- metrics ----------------------------------------------------------------------------------------------


class _LibraryCollector:
    """Counts read from the database at scrape time, so they are right whatever process did the work."""

    def __init__(self, library: Library) -> None:
        self.library = library

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self.library.db.conn() as conn:
            row = conn.execute("SELECT count(*) FROM item").fetchone()
            entries, hits = blocklist.counts(conn)
            steps = items.step_counts(conn)
        yield GaugeMetricFamily("library_items", "Items in the library", value=int(row[0]) if row else 0)
        yield GaugeMetricFamily("library_blocklist_entries", "Reference hashes in the blocklist", value=entries)
        yield GaugeMetricFamily("library_blocked_items", "Items flagged by the blocklist", value=hits)
        family = GaugeMetricFamily("library_steps", "Pipeline steps by step and state", labels=["step", "state"])
        for step, states in sorted(steps.items()):
            for state, n in sorted(states.items()):
                family.add_metric([step, state], n)
        yield family


# ---- the app ----------------------------------------------------------------------------------------------


def create_app(library: Library | None = None, settings: LibrarySettings | None = None) -> FastAPI:
    """The app; with ``library=None`` its lifespan opens the library (embedded database, workers)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own = library is None
        app.state.library = library or Library(limits)
        if own:
            app.state.library.start_workers()
        app.state.registry = CollectorRegistry(auto_describe=False)
        app.state.registry.register(_LibraryCollector(app.state.library))
        try:
            yield
        finally:
            if own:
                app.state.library.close()

    app = FastAPI(title="immich-zh-ai library", lifespan=lifespan)
    app.include_router(router)
    limits = library.settings if library is not None else (settings or LibrarySettings())
    # Bodies are refused while they stream in, before a multipart parser spools them to disk: the largest
    # legitimate body is one image or one hash list, plus multipart framing.
    app.add_middleware(
        RequestBodyMiddleware,
        max_bytes=max(limits.max_image_bytes, limits.max_blocklist_import_bytes) + 1024 * 1024,
        setting_name="LIBRARY_MAX_IMAGE_BYTES / LIBRARY_MAX_BLOCKLIST_IMPORT_BYTES",
    )

    from library import imgsmlr

    app.include_router(imgsmlr.router)

    page = Path(__file__).with_name("static") / "library.html"

    @app.get("/", include_in_schema=False)
    def library_page() -> HTMLResponse:
        return HTMLResponse(page.read_text(encoding="utf-8"))

    @app.get("/ping", include_in_schema=False)
    def ping() -> PlainTextResponse:
        return PlainTextResponse("pong")

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        return Response(generate_latest(request.app.state.registry), media_type="text/plain; version=0.0.4")

    @app.exception_handler(UnicodeDecodeError)
    async def _bad_text(request: Request, exc: UnicodeDecodeError) -> JSONResponse:
        return JSONResponse({"detail": "request is not valid UTF-8"}, status_code=400)

    return app
