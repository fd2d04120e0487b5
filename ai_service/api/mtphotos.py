"""MT Photos AI API on the same app: ``/check``, ``/ocr``, ``/clip/img``, ``/clip/txt``, ``/represent``.

Every route except ``/ping`` needs the ``api-key`` header (``AI_SERVICE_MTPHOTOS_API_KEY``); a wrong or
missing key is a 401. Failures are real HTTP errors (never a 200 with an empty result), and their
body also carries MT Photos' ``msg``/``result`` fields so its clients show the reason.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, File, Header, HTTPException, Request, UploadFile

from ai_service.errors import InvalidInput
from ai_service.inference import InferenceService
from ai_service.protocol.immich import ModelTask, ModelType
from ai_service.protocol.mtphotos import (
    API_KEY_HEADER,
    CheckResponse,
    ClipResponse,
    ClipTextRequest,
    FacialArea,
    OcrBox,
    OcrResponse,
    OcrResult,
    RepresentFace,
    RepresentResponse,
    format_number,
)
from ai_service.runtime.onnx import choose_providers


def _service(request: Request) -> InferenceService:
    return request.app.state.inference


async def require_api_key(
    request: Request,
    api_key: Annotated[str | None, Header(alias=API_KEY_HEADER, include_in_schema=True)] = None,
) -> None:
    expected = _service(request).settings.mtphotos_api_key
    # Constant-time compare: the key is a secret and the endpoint is reachable on the network. An empty
    # setting switches the API off: no header, empty or not, matches it.
    if not expected or api_key is None or not hmac.compare_digest(api_key.encode(), expected.encode()):
        raise HTTPException(status_code=401, detail="Invalid API key")


# MT Photos' error body: ``detail`` plus MT Photos' own ``msg`` / ``result`` fields, which its clients show.
_ERROR = {
    "application/json": {
        "schema": {
            "type": "object",
            "required": ["detail"],
            "properties": {"detail": {"type": "string"}, "msg": {"type": "string"}, "result": {"type": "array"}},
        }
    }
}


def _errors(**statuses: str) -> dict[int | str, dict[str, Any]]:
    return {int(code.removeprefix("s")): {"description": text, "content": _ERROR} for code, text in statuses.items()}


# Every MT Photos route: the key is checked first.
router = APIRouter(
    tags=["mt-photos"],
    dependencies=[Depends(require_api_key)],
    responses=_errors(s401="Missing or wrong api-key header"),
)
# The routes that run a model on an uploaded image or a text.
MODEL_ERRORS = _errors(
    s400="Empty or undecodable file, invalid multipart body, or unusable text",
    s404="The configured model is not a known model",
    s413="Body, image or text over the configured limit",
    s503="The configured model is not installed or failed to load",
)


def _device() -> str:
    try:
        return "cuda" if "CUDAExecutionProvider" in choose_providers(None) else "cpu"
    except RuntimeError:
        return "cpu"


@router.post("/check", response_model=CheckResponse, summary="MT Photos: verify the key and the service")
async def check() -> CheckResponse:
    return CheckResponse(device=_device())


@router.post("/restart", summary="MT Photos: free loaded models (they reload on the next request)")
@router.post("/restart_v2", include_in_schema=False)
async def restart(request: Request) -> dict[str, str]:
    service = _service(request)
    await service.run_blocking(service.cache.unload_all)
    return {"result": "pass"}


async def _read(file: UploadFile) -> bytes:
    data = await file.read()
    if not data:
        raise InvalidInput("'file' is empty")
    return data


@router.post(
    "/ocr", response_model=OcrResponse, responses=MODEL_ERRORS, summary="MT Photos: recognise text in an image"
)
async def ocr(request: Request, file: Annotated[UploadFile, File()]) -> OcrResponse:
    service = _service(request)
    ref = await service.resolve(ModelTask.OCR, ModelType.DETECTION, service.settings.mtphotos_ocr_model)
    lines, _ = await service.run_blocking(service.ocr, ref, await _read(file))
    boxes = []
    for quad in np.asarray(lines.quads).reshape(-1, 4, 2):
        x0, y0 = quad.min(axis=0)
        x1, y1 = quad.max(axis=0)
        boxes.append(
            OcrBox(
                x=format_number(round(float(x0), 2)),
                y=format_number(round(float(y0), 2)),
                width=format_number(round(float(x1 - x0), 2)),
                height=format_number(round(float(y1 - y0), 2)),
            )
        )
    return OcrResponse(
        result=OcrResult(
            texts=list(lines.texts),
            scores=[format_number(float(s), 2) for s in lines.text_scores],
            boxes=boxes,
        )
    )


@router.post(
    "/clip/img", response_model=ClipResponse, responses=MODEL_ERRORS, summary="MT Photos: CLIP image embedding"
)
async def clip_image(request: Request, file: Annotated[UploadFile, File()]) -> ClipResponse:
    service = _service(request)
    ref = await service.resolve(ModelTask.CLIP, ModelType.VISUAL, service.settings.mtphotos_clip_model)
    vector, _ = await service.run_blocking(service.encode_image, ref, await _read(file))
    return ClipResponse(result=[format_number(v) for v in vector.tolist()])


@router.post("/clip/txt", response_model=ClipResponse, responses=MODEL_ERRORS, summary="MT Photos: CLIP text embedding")
async def clip_text(request: Request, body: ClipTextRequest) -> ClipResponse:
    service = _service(request)
    service.check_text(body.text)
    ref = await service.resolve(ModelTask.CLIP, ModelType.TEXTUAL, service.settings.mtphotos_clip_model)
    vector = await service.run_blocking(service.encode_text, ref, body.text, None)
    return ClipResponse(result=[format_number(v) for v in vector.tolist()])


@router.post(
    "/represent",
    response_model=RepresentResponse,
    responses=MODEL_ERRORS,
    summary="MT Photos: detect faces and embed them",
)
async def represent(request: Request, file: Annotated[UploadFile, File()]) -> RepresentResponse:
    service = _service(request)
    name = service.settings.mtphotos_face_model
    detector = await service.resolve(ModelTask.FACIAL_RECOGNITION, ModelType.DETECTION, name)
    recognizer = await service.resolve(ModelTask.FACIAL_RECOGNITION, ModelType.RECOGNITION, name)
    found, _ = await service.run_blocking(
        service.faces, detector, recognizer, await _read(file), service.settings.mtphotos_face_min_score
    )
    faces = []
    assert found.embeddings is not None
    for box, score, embedding in zip(found.boxes, found.scores, found.embeddings, strict=True):
        x1, y1, x2, y2 = (round(float(v)) for v in box)
        norm = float(np.linalg.norm(embedding)) or 1.0
        # MT Photos stores InsightFace's normed_embedding: send unit vectors whatever the model.
        faces.append(
            RepresentFace(
                embedding=(np.asarray(embedding, dtype=np.float64) / norm).tolist(),
                facial_area=FacialArea(x=x1, y=y1, w=x2 - x1, h=y2 - y1),
                face_confidence=float(score),
            )
        )
    backend = "dlib" if detector.name == "dlib" else "insightface"
    return RepresentResponse(detector_backend=backend, recognition_model=detector.name, result=faces)
