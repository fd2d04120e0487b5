"""Every backend reply is checked before Immich sees it: a failure must never reach Immich as a 200.

Immich stores what it gets without looking: an empty or short CLIP vector breaks its SQL insert
(or worse, lands in the table), a fractional face box breaks an integer column, an OCR box in
pixels lands as nonsense coordinates. Whatever does not fit raises :class:`InvalidResponse`, which
the dispatcher treats as that backend's failure and fails over. Each task's check lives with the
task (``ai_service/tasks/<task>.py``, ``check_reply``); this module adds what is common to all.

Small repairs that cannot change meaning are made there instead of failing: face boxes are rounded
to integer values and OCR coordinates a rounding error outside 0-1 are clamped. Fields a task does not
know pass through unchanged.
"""

from __future__ import annotations

from typing import Any

from ai_service.protocol.immich import IMAGE_HEIGHT, IMAGE_WIDTH
from ai_service.tasks import InvalidReply, task_for
from ai_service.tasks.base import is_number
from gateway.routing import RoutedTask

InvalidResponse = InvalidReply  # the gateway's name for it


def _image_dimension(response: dict[str, Any], key: str) -> int:
    value = response.get(key)
    if not is_number(value) or value != int(value) or value <= 0:  # type: ignore[operator,arg-type]
        raise InvalidResponse(f"'{key}' must be a positive integer for image requests, got {value!r}")
    return int(value)  # type: ignore[arg-type]


def validate_response(routed: RoutedTask, response: dict[str, Any], *, image: bool) -> dict[str, Any]:
    """The reply for one task, checked and normalised; raises InvalidResponse.

    Only this task's key (and the image size) is kept: a backend's answer to a task nobody asked it
    for must not slip into the merged reply."""
    name = routed.task.value
    if name not in response:
        raise InvalidResponse(f"reply has no '{name}'")
    task = task_for(routed.task)  # an unknown task is an error, never another task's check
    out: dict[str, Any] = {name: task.check_reply(response[name], routed.entries, routed.model.expected_dim)}
    if image:
        # Immich's face job stores both in asset_face; its own service always sends them for images.
        out[IMAGE_HEIGHT] = _image_dimension(response, IMAGE_HEIGHT)
        out[IMAGE_WIDTH] = _image_dimension(response, IMAGE_WIDTH)
    return out
