"""Immich's ML protocol: ``GET /``, ``GET /ping``, ``POST /predict``."""

from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import PlainTextResponse, Response

from ai_service.inference import InferenceService
from ai_service.tasks import TASKS, parse_entries

router = APIRouter(tags=["immich"])


def _service(request: Request) -> InferenceService:
    return request.app.state.inference


class ORJSONBytes(Response):
    media_type = "application/json"


@router.get("/", summary="Service banner (Immich ML compatible)")
async def root() -> dict[str, str]:
    return {"message": "Immich ML"}


@router.get("/ping", response_class=PlainTextResponse, summary="Health check used by Immich")
async def ping() -> str:
    return "pong"


@router.post(
    "/predict",
    summary=f"Run the models of one or more tasks ({', '.join(TASKS)}) on one image or text",
    responses={
        400: {"description": "Missing image/text, undecodable image, or a dependent task without its dependency"},
        404: {"description": "Unknown model; the message lists the installed ones"},
        413: {"description": "Body, image or text over the configured limit"},
        422: {"description": "'entries' missing or malformed"},
        503: {"description": "Model not installed (the message says how to install it) or failed to load"},
    },
)
async def predict(
    request: Request,
    entries: Annotated[str, Form(description="JSON: {task: {type: {modelName, options}}}")],
    image: Annotated[UploadFile | None, File(description="Encoded image (JPEG, PNG, WebP, …)")] = None,
    text: Annotated[str | None, Form(description="Query text for CLIP textual")] = None,
) -> Response:
    parsed = parse_entries(entries)
    data = await image.read() if image is not None else None
    result = await _service(request).predict(parsed, data, text)
    return ORJSONBytes(orjson.dumps(result))
