"""``POST /predict``'s form read straight from the body, for the shape Immich sends and nothing else.

Immich's server sends one Node (undici) FormData per request: an ``entries`` text part, then an
``image`` file part (``filename="blob"``) or a ``text`` part. Read here with a few ``bytes`` operations
instead of FastAPI's form machinery (python-multipart, an UploadFile spooled per image, dependency
solving), that shape costs a small fraction of the CPU. Anything else (another part, a header, a
charset, a part too large for Starlette's form parser, a malformed body) returns None: the caller then
hands the request to FastAPI, whose answer for it is the reference, so no odd request is answered
differently than before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ai_service.api.limits import multipart_boundary

# Starlette's limit for a part that is not a file (a larger one is its 400): such bodies go to FastAPI.
_MAX_FIELD_BYTES = 1024 * 1024
_DISPOSITION = re.compile(rb'form-data; name="(entries|image|text)"(?:; filename="([^"\\\r\n]*)")?', re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class PredictForm:
    entries: str
    image: bytes | None
    text: str | None


def parse_predict_form(
    headers: list[tuple[bytes, bytes]] | tuple[tuple[bytes, bytes], ...], body: bytes
) -> PredictForm | None:
    """The form when ``body`` has exactly Immich's shape, else None (let FastAPI parse it)."""
    boundary = multipart_boundary(headers)
    if boundary is None:
        return None
    delimiter = b"--" + boundary
    opening = delimiter + b"\r\n"
    closing = b"\r\n" + delimiter + b"--"
    end = body.rfind(closing)
    if not body.startswith(opening) or end < 0 or body[end + len(closing) :] not in (b"", b"\r\n"):
        return None
    parts = body[len(opening) : end].split(b"\r\n" + delimiter + b"\r\n")
    if body.count(delimiter) != len(parts) + 1:
        return None  # the delimiter inside a part (not followed by CRLF): the parsers' rules differ, ask FastAPI's
    fields: dict[str, tuple[bytes | None, bytes]] = {}
    for part in parts:
        head, separator, content = part.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        name, _, value = lines[0].partition(b":")
        match = _DISPOSITION.fullmatch(value.strip())
        if not separator or name.strip().lower() != b"content-disposition" or match is None:
            return None
        field, filename = match.group(1).decode(), match.group(2)
        if field in fields or not _part_headers_ok(lines[1:], filename is not None):
            return None
        if filename is None and len(content) > _MAX_FIELD_BYTES:
            return None
        fields[field] = (filename, content)
    return _form(fields)


def _part_headers_ok(lines: list[bytes], is_file: bool) -> bool:
    """Only a file part may carry a header besides Content-Disposition, and only its Content-Type."""
    if not lines:
        return True
    return is_file and len(lines) == 1 and lines[0].partition(b":")[0].strip().lower() == b"content-type"


def _form(fields: dict[str, tuple[bytes | None, bytes]]) -> PredictForm | None:
    entries, image, text = fields.get("entries"), fields.get("image"), fields.get("text")
    # FastAPI's own answers for these: entries missing or sent as a file, an image that is not a file.
    if entries is None or entries[0] is not None or (image is not None and image[0] is None):
        return None
    if text is not None and text[0] is not None:
        return None
    # FastAPI reads an empty text field as a missing one; empty files and names are its business too.
    if not entries[1] or (text is not None and not text[1]) or (image is not None and not (image[0] and image[1])):
        return None
    try:
        return PredictForm(
            entries=entries[1].decode(),
            image=image[1] if image is not None else None,
            text=text[1].decode() if text is not None else None,
        )
    except UnicodeDecodeError:  # Starlette falls back to latin-1 there: its rule, its parser
        return None
