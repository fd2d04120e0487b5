"""Limits on what one HTTP client may make the server hold: header size and count, and how slowly it may
send a request. Shared by the AI service (``AI_SERVICE_HTTP__*``) and the gateway (``GATEWAY_HTTP__*``);
:mod:`ai_service.runtime.http_server` enforces them. Kept free of uvicorn so that reading the settings
stays cheap.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class HttpLimits(BaseModel):
    """Per-connection limits of the HTTP server (uvicorn with httptools)."""

    max_header_bytes: int = Field(
        64 * 1024,
        ge=1024,
        le=16 * 1024 * 1024,
        description=(
            "Largest request head (request line plus all headers), in bytes; a larger one gets 431 and the "
            "connection is closed. Immich's requests need about 1 KiB."
        ),
    )
    max_headers: int = Field(
        100, ge=8, le=10_000, description="Most header fields in one request; more get 431 and the connection closed."
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description=(
            "Seconds a client has to send a complete request head, counted from the connection's opening (first "
            "request) or from the head's first byte (later requests on a kept-alive connection); then 408 and the "
            "connection is closed. Stops slowloris clients holding connections open."
        ),
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description=(
            "Seconds a client has to send a request body, plus one second per HTTP__BODY_MIN_BYTES_PER_S bytes "
            "received; a slower client is cut off (408 unless a reply has started). Time the server itself is "
            "not reading (the app is busy) does not count."
        ),
    )
    body_min_bytes_per_s: int = Field(
        16 * 1024,
        ge=0,
        le=1024 * 1024 * 1024,
        description=(
            "Upload rate, in bytes per second, that earns a body more time beyond HTTP__BODY_TIMEOUT_S (a 64 MiB "
            "image at 16 KiB/s gets 30 s + 68 min); 0: the whole body must arrive within HTTP__BODY_TIMEOUT_S."
        ),
    )
