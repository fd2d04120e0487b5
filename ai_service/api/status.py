"""``GET /status``: what the service has installed and loaded, and its model downloads (no secrets)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from ai_service.inference import InferenceService

router = APIRouter(tags=["status"])


@router.get("/status", summary="Installed and loaded models, and downloads in progress or failed")
async def status(request: Request) -> dict[str, Any]:
    service: InferenceService = request.app.state.inference
    return {
        "model_dir": str(service.settings.model_dir),
        "auto_pull": service.settings.auto_pull,
        "installed": await service.run_blocking(service.registry.installed),
        "loaded": [
            {"task": str(ref.task), "model": ref.name, "component": ref.component} for ref in service.cache.loaded()
        ],
        "downloads": service.downloader.snapshot(),
    }
