"""Configuration of the AI service: one pydantic-settings class, env prefix ``AI_SERVICE_``.

Every field documents itself; ``python -m ai_service settings`` prints them with their
current values, and the README table is generated from the same descriptions.
"""

from __future__ import annotations

import ipaddress
import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ai_service.protocol.mtphotos import MTPHOTOS_CLIP_MODEL, MTPHOTOS_FACE_MODEL
from ai_service.runtime.batching import DEFAULT_MAX_SIZE, DEFAULT_WAIT_MS, BatchOptions
from ai_service.runtime.http_limits import HttpLimits
from ai_service.runtime.onnx import ALLOW_SPINNING_KEY, SessionOptions
from ai_service.runtime.slots import worker_slot

# Where `models pull` converts Chinese-CLIP from (ai_service.models.clip.transformers_js): the ONNX
# exports published for transformers.js. Kept here, not in the CLIP catalog, because that package
# imports these settings.
DEFAULT_CN_CLIP_REPOS: dict[str, str] = {
    "ViT-B-16__cn-clip": "Xenova/chinese-clip-vit-base-patch16",
    "ViT-L-14__cn-clip": "Xenova/chinese-clip-vit-large-patch14",
    "ViT-L-14-336__cn-clip": "Xenova/chinese-clip-vit-large-patch14-336px",
}
_CN_CLIP_SUFFIX = "__cn-clip"  # catalog.CN_CLIP_SUFFIX; importing the catalog here would be circular

# MT Photos' own default key: public, so anyone who can reach the service would know it.
DEFAULT_MTPHOTOS_API_KEY = "mt_photos_ai_extra"


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` keeps the service to this machine (a name other than localhost: no)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _default_model_dir() -> Path:
    return Path.home() / ".cache" / "immich-zh-ai" / "models"


class PreloadSettings(BaseModel):
    """Comma-separated model names to load at start-up, per task and type (Immich's scheme)."""

    clip_visual: list[str] = Field(default_factory=list, description="CLIP visual models to preload.")
    clip_textual: list[str] = Field(default_factory=list, description="CLIP textual models to preload.")
    facial_recognition: list[str] = Field(
        default_factory=list, description="Face models (detection + recognition) to preload."
    )
    ocr: list[str] = Field(default_factory=list, description="OCR models to preload.")


class AIServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="AI_SERVICE_",
        env_nested_delimiter="__",
        case_sensitive=False,
        extra="ignore",
    )

    host: str = Field("127.0.0.1", description="Address to listen on (use 0.0.0.0 or [::] in containers).")
    port: int = Field(3004, ge=1, le=65535, description="TCP port to listen on.")
    log_level: str = Field("info", description="Python log level: debug, info, warning, error.")
    http: HttpLimits = Field(
        default_factory=HttpLimits,
        description="Limits per HTTP connection: header size and count, slow-client timeouts (AI_SERVICE_HTTP__*).",
    )

    model_dir: Path = Field(
        default_factory=_default_model_dir,
        description=(
            "Model folder in Immich's cache layout (<task>/<name>/<type>/model.onnx). May point at an "
            "existing immich-machine-learning cache to reuse the models it downloaded."
        ),
    )
    insightface_dir: Path | None = Field(
        None,
        description=(
            "Optional InsightFace models folder (e.g. ~/.insightface/models) whose packs (buffalo_l/…) are "
            "also served as face models."
        ),
    )
    face_dlib_min_face_px: float = Field(
        48.0,
        ge=16,
        le=400,
        description=(
            "Smallest face, in pixels of the image sent, the bundled dlib detector looks for. Cost grows with the "
            "square of 72/this: about 0.16 s at 72, 0.36 s at 48, 0.66 s at 36 per 1440-px preview on 2 cores."
        ),
    )
    face_max_batch_size: int | None = Field(
        None,
        ge=1,
        description="Most faces per ArcFace recognition run (unset: all faces of an image in one run).",
    )
    ocr_use_angle_classifier: bool = Field(
        False,
        description=(
            "Run PaddleOCR's 0/180° line classifier before recognition: helps with upside-down text inside a photo, "
            "costs about 5 % more time, and gave no recall gain on the test set (EXIF orientation is applied anyway)."
        ),
    )
    ocr_rec_batch_size: int = Field(
        6, ge=1, le=64, description="Text-line crops per OCR recogniser call (Immich's MAX_BATCH_SIZE__OCR)."
    )
    ocr_det_bucket_px: int | None = Field(
        None,
        ge=0,
        le=4096,
        multiple_of=32,
        description=(
            "Pad the OCR detector's input up to multiples of this many pixels, so that a GPU provider meets a few "
            "input shapes and reuses its compiled kernels instead of recompiling per image size (0: off). Unset: "
            "128 on a GPU, off on a CPU (nothing to gain there; padding only adds pixels)."
        ),
    )
    ocr_max_resolution_ceiling: int = Field(
        2048,
        ge=32,
        le=16384,
        description=(
            "Largest OCR maxResolution honoured (the detector input's shorter side); larger values, which Immich "
            "sends as its admin typed them, are lowered to this one rather than refused."
        ),
    )
    ocr_det_max_side: int = Field(
        2048,
        ge=512,
        le=16384,
        multiple_of=32,
        description=(
            "Longest side, in pixels, of one OCR detector input. A larger (resized) image, such as a panorama or a "
            "long screenshot, is read in overlapping tiles of at most this size, so the detector's working memory "
            "is that of one tile whatever the aspect ratio (at most about 190 bytes per tile pixel)."
        ),
    )
    ocr_det_max_pixels: int = Field(
        16_000_000,
        ge=1024,
        le=400_000_000,
        description=(
            "Most pixels the OCR detector covers per image, all tiles together; a larger resized image is scaled "
            "down to fit. Bounds time (about 2-4 s per million pixels on 2 CPU cores) and the stitched probability "
            "map; at maxResolution 736 it is reached only beyond a 30:1 aspect ratio."
        ),
    )
    ocr_memory_release: Literal["shrink", "no-arena", "keep"] = Field(
        "shrink",
        description=(
            "How OCR's ONNX sessions give back a request's working memory: 'shrink' returns the CPU arena's free "
            "chunks after every run, 'no-arena' allocates per run without an arena, 'keep' keeps the arena at the "
            "largest request's peak for as long as the model stays loaded (ONNX Runtime's default)."
        ),
    )
    model_ttl: float = Field(
        300.0, description="Seconds a model may sit idle before it is unloaded (<= 0 keeps models loaded)."
    )
    model_ttl_poll_s: float = Field(10.0, gt=0, description="How often, in seconds, idle models are checked.")
    preload: PreloadSettings = Field(
        default_factory=PreloadSettings,
        description="Models loaded at start-up, e.g. AI_SERVICE_PRELOAD__CLIP_TEXTUAL='[\"ViT-B-16__cn-clip\"]'.",
    )

    providers: list[str] | None = Field(
        None,
        description=(
            "ONNX Runtime execution providers in order of preference, e.g. "
            '\'["CUDAExecutionProvider","CPUExecutionProvider"]\'. Unset: CUDA when available, else CPU.'
        ),
    )
    device_id: int = Field(
        0, ge=0, description="GPU index used by the CUDA execution provider (when AI_SERVICE_DEVICE_IDS is unset)."
    )
    device_ids: Annotated[list[int] | None, NoDecode] = Field(
        None,
        description=(
            "GPUs to spread worker processes over, e.g. '0,1' or '[0,1]': worker i of AI_SERVICE_WORKERS uses "
            "device_ids[i % len]. Each worker loads its own copy of every model on its GPU. Unset: "
            "AI_SERVICE_DEVICE_ID for every worker."
        ),
    )
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "Processes `python -m ai_service` starts, sharing one port. Each loads its own models: use more "
            "than 1 to drive several GPUs (with AI_SERVICE_DEVICE_IDS), not to add CPU threads."
        ),
    )
    precision: Literal["fp32", "fp16"] = Field(
        "fp32",
        description=(
            "fp16: use model_fp16.onnx next to model.onnx if present, else convert at load (needs the 'onnx' "
            "package, in the 'gpu' extra); float32 inputs/outputs either way. For GPUs: on a CPU fp16 is slower."
        ),
    )
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads per session (0: auto).")
    inter_op_threads: int = Field(1, ge=0, description="ONNX Runtime inter-op threads per session (0: auto).")
    onnx_spinning: bool = Field(
        False,
        description=(
            "Let ONNX Runtime's intra-op threads busy-wait for work after each run (its own default). Off: they "
            "sleep, which measured the same latency and a fraction of the CPU between requests on a 2-core machine."
        ),
    )
    request_threads: int = Field(
        0,
        ge=0,
        description=(
            "Requests decoded and run at once (0: CPU cores, or AI_SERVICE_BATCH_MAX_SIZE if larger and "
            "batching is on, so that concurrent requests can meet in one batch)."
        ),
    )

    batch_enabled: bool | None = Field(
        None,
        description=(
            "Batch concurrent requests for one CLIP visual, CLIP textual or ArcFace model into one ONNX Runtime "
            "call. Results are the same as unbatched ones (float rounding aside); a failing item fails only its "
            "own request. Unset: on for models running on a GPU, off on a CPU (where batches measured no faster, "
            "ViT-B/16 slower); true/false force it."
        ),
    )
    batch_max_size: int = Field(
        DEFAULT_MAX_SIZE,
        ge=1,
        le=1024,
        description="Most items per batched call (images, queries, or faces for ArcFace). 1 turns batching off.",
    )
    batch_wait_ms: float = Field(
        DEFAULT_WAIT_MS,
        ge=0,
        le=1000,
        description=(
            "Longest time, in milliseconds, a request waits for others to share its batch while the model is busy; "
            "a full batch runs at once, and a lone request on an idle model runs at once (never held)."
        ),
    )
    batch_concurrency: int = Field(
        0,
        ge=0,
        le=64,
        description=(
            "Batches of one model running at once (0: 1 on a GPU; on a CPU, cores / intra-op threads, so "
            "batching never leaves cores idle)."
        ),
    )

    max_upload_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="Largest accepted request body, in bytes (413 above it)."
    )
    max_image_pixels: int = Field(
        100_000_000,
        gt=0,
        description="Largest accepted decoded image, in pixels (width x height); guards against decompression bombs.",
    )
    max_text_chars: int = Field(
        2000, gt=0, description="Longest accepted CLIP query text, in characters (413 above it)."
    )
    request_timeout_s: float = Field(
        120.0, gt=0, description="Longest time one inference request may take before it fails with 504."
    )

    mtphotos_api_key: str = Field(
        DEFAULT_MTPHOTOS_API_KEY,
        description=(
            "Key MT Photos clients must send in the 'api-key' header; empty switches the MT Photos API off. "
            "The public default (MT Photos' own) is accepted on a loopback address only: with it the service "
            "refuses to listen on any other. The Docker images set it empty."
        ),
        repr=False,
    )
    mtphotos_clip_model: str = Field(
        MTPHOTOS_CLIP_MODEL, description="CLIP model used by the MT Photos /clip endpoints."
    )
    mtphotos_face_model: str = Field(
        MTPHOTOS_FACE_MODEL,
        description=(
            "Face model used by the MT Photos /represent endpoint; buffalo_l is what MT Photos' own face service "
            "runs. 'dlib' needs no download, but its vectors differ from buffalo_l's."
        ),
    )
    mtphotos_ocr_model: str = Field("PP-OCRv6_small", description="OCR model used by the MT Photos /ocr endpoint.")
    mtphotos_face_min_score: float = Field(
        0.65, ge=0, le=1, description="Face detection threshold for the MT Photos /represent endpoint."
    )

    hf_endpoint: str = Field(
        "https://huggingface.co",
        description=(
            "Hugging Face-compatible endpoint that 'models pull' and download on first use fetch from (a mirror "
            "works, e.g. https://hf-mirror.com)."
        ),
    )
    hub_timeout_s: float = Field(
        15.0,
        gt=0,
        le=600,
        description=(
            "Longest wait, in seconds, for the download endpoint to connect or to send the next bytes: a hub that "
            "stops answering fails the download after this long instead of hanging it (a slow download is not cut)."
        ),
    )
    auto_pull: bool = Field(
        True,
        description=(
            "Download a model that a request needs and that is not installed, then answer (as Immich's ML service "
            "does). false: such requests get a 503 that says how to install the model."
        ),
    )
    auto_pull_wait_s: float = Field(
        240.0,
        ge=0,
        le=3600,
        description=(
            "Longest time, in seconds, one request waits for a model being downloaded; then it gets a 503 saying "
            "how far the download got, and the download goes on. Immich gives up on a request after about 300 s."
        ),
    )
    auto_pull_retry_s: float = Field(
        10.0,
        ge=0,
        le=3600,
        description=(
            "Seconds after a failed download during which requests for that model get the same 503 at once "
            "instead of starting another download (so an unreachable hub costs each request nothing)."
        ),
    )
    hf_token: str | None = Field(None, description="Token for the download endpoint, if it needs one.", repr=False)
    model_repo_owner: str = Field(
        "immich-app",
        description="Owner of the model repositories on the endpoint ('models pull NAME' fetches OWNER/NAME).",
    )

    cn_clip_repos: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_CN_CLIP_REPOS),
        description=(
            "Repositories on AI_SERVICE_HF_ENDPOINT holding a transformers.js-style ONNX export of a Chinese-CLIP "
            "model (onnx/model*.onnx + tokenizer + configs), which 'models pull' converts to the service's layout "
            'without torch; JSON, e.g. \'{"ViT-B-16__cn-clip":"me/my-export"}\'. Entries given are merged over '
            "the defaults (the three Xenova/chinese-clip-vit-* repos); an empty repo makes that name pull "
            "AI_SERVICE_MODEL_REPO_OWNER/<name> as an Immich-layout model instead."
        ),
    )
    cn_clip_variant: Literal["fp32", "fp16", "quantized"] = Field(
        "fp32",
        description=(
            "Which graph of a transformers.js Chinese-CLIP repository to install: fp32 (onnx/model.onnx, the "
            "reference), fp16 (onnx/model_fp16.onnx: half the download, for GPUs) or quantized "
            "(onnx/model_quantized.onnx: 8-bit weights, a quarter of the download, slightly different vectors). "
            "Switching variants needs a new pull; vectors of different variants should not be mixed in one library."
        ),
    )

    @field_validator("cn_clip_repos", mode="after")
    @classmethod
    def _merge_cn_clip_repos(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [name for name in value if not name.endswith(_CN_CLIP_SUFFIX)]
        if bad:
            raise ValueError(f"cn_clip_repos keys must be Chinese-CLIP names ending in {_CN_CLIP_SUFFIX}: {bad}")
        bad = [repo for repo in value.values() if repo and repo.count("/") != 1]
        if bad:
            raise ValueError(f"cn_clip_repos values must be OWNER/NAME repository ids (or empty): {bad}")
        return {**DEFAULT_CN_CLIP_REPOS, **value}

    @field_validator("device_ids", mode="before")
    @classmethod
    def _parse_device_ids(cls, value: Any) -> Any:
        # CUDA_VISIBLE_DEVICES-style "0,1" as well as JSON "[0,1]"; empty means unset.
        if isinstance(value, str):
            text = value.strip()
            if not text:
                return None
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("device_ids")
    @classmethod
    def _check_device_ids(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (not value or any(d < 0 for d in value)):
            raise ValueError("device_ids must list at least one GPU index >= 0")
        return value

    def exposure_problem(self) -> str | None:
        """Why serving on ``host`` with these settings is refused, or None."""
        if self.mtphotos_api_key != DEFAULT_MTPHOTOS_API_KEY or is_loopback(self.host):
            return None
        return (
            f"refusing to listen on {self.host!r} with the MT Photos API's public default key: anyone who can "
            "reach this address could run inference and POST /restart. Set AI_SERVICE_MTPHOTOS_API_KEY to a "
            "secret of your own (and the same key in MT Photos), or to an empty value to switch the MT Photos "
            "API off (e.g. AI_SERVICE_MTPHOTOS_API_KEY= in .env), or listen on 127.0.0.1."
        )

    def effective_device_id(self) -> int:
        """The GPU this process uses: its worker slot's entry of device_ids, else device_id."""
        if self.device_ids:
            return self.device_ids[worker_slot() % len(self.device_ids)]
        return self.device_id

    def batch_options(self) -> BatchOptions:
        return BatchOptions(
            enabled=self.batch_enabled,
            max_size=self.batch_max_size,
            wait_ms=self.batch_wait_ms,
            concurrency=self.batch_concurrency,
        )

    def session_options(self) -> SessionOptions:
        """ONNX Runtime options for every session this service opens."""
        return SessionOptions(
            providers=tuple(self.providers) if self.providers else None,
            device_id=self.effective_device_id(),
            intra_op_threads=self.intra_op_threads,
            inter_op_threads=self.inter_op_threads,
            precision=self.precision,
            batching=self.batch_options(),
            extra={ALLOW_SPINNING_KEY: "1" if self.onnx_spinning else "0"},
        )


@lru_cache
def get_settings() -> AIServiceSettings:
    return AIServiceSettings()
