"""What every task module provides, and the checks their reply validators share.

A task module (``clip.py``, ``faces.py``, ``ocr.py``) subclasses :class:`Task` once; the table in
``ai_service/tasks/__init__.py`` lists the instances. Everything that differs between tasks lives in
those modules, so the service, the gateway's reply validation and the MT Photos adapter never branch
on a task name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson

from ai_service.imaging import DecodedImage
from ai_service.protocol.immich import ModelTask, ModelType, PipelineEntry

_NUMBER_TYPES = frozenset({float, int})  # exact types: bool is an int subclass and is not a number here

Entries = Mapping[ModelType, PipelineEntry]
Models = Mapping[ModelType, object]  # the loaded model of each type a request names


class InvalidReply(ValueError):
    """A backend's reply does not have the task's response shape (the gateway fails over)."""


@dataclass(frozen=True, slots=True)
class MtPhotosCall:
    """The MT Photos endpoint that answers a request: ``path``, with the image as a file or ``json`` bytes."""

    path: str
    json: bytes | None = None


class Task:
    """One Immich task, described once. Subclasses set the class attributes and implement the methods."""

    name: ClassVar[ModelTask]
    types: ClassVar[frozenset[ModelType]]
    depends_on: ClassVar[Mapping[ModelType, ModelType]] = {}  # type -> the type whose output it needs
    text_type: ClassVar[ModelType | None] = None  # the one type that takes text instead of an image
    timeout_s: ClassVar[float]  # the gateway's default per-attempt timeout (GATEWAY_TIMEOUTS__<TASK>)
    embedding_dimension: ClassVar[int | None] = None  # fixed size of the reply's embeddings, if any
    default_model_map: ClassVar[Mapping[str, str]] = {}  # GATEWAY_MODEL_MAP__<TASK> when unset
    mtphotos: ClassVar[bool] = True  # whether MT Photos' API has an endpoint for it (routing skips it if not)

    @property
    def setting_key(self) -> str:
        """The key in per-task settings (``GATEWAY_TIMEOUTS__FACIAL_RECOGNITION``: ``facial_recognition``)."""
        return self.name.value.replace("-", "_")

    # ---- in the service -------------------------------------------------------------------------

    def min_side(self, models: Models) -> int | None:
        """The smallest image side the models need when this task is alone (lets JPEG decode downscale)."""
        return None

    def run_image(self, models: Models, entries: Entries, image: DecodedImage) -> Any:
        """The task's reply value for one decoded image."""
        raise NotImplementedError

    def run_text(self, models: Models, entries: Entries, text: str) -> Any:
        raise NotImplementedError(f"{self.name} takes no text")

    # ---- in the gateway -------------------------------------------------------------------------

    def check_reply(self, value: object, entries: Entries, expected_dim: int | None) -> Any:
        """A backend's reply value, checked and normalised; raises :class:`InvalidReply`."""
        raise NotImplementedError

    def check_size(self, value: Any, expected_dim: int | None) -> None:
        """The one check a reply of the project's own typed code (the in-process backend) still needs: an
        embedding size routing could not know at start-up. Raises :class:`InvalidReply`."""

    def mtphotos_call(self, entries: Entries, image: bytes | None, text: str | None) -> MtPhotosCall:
        raise NotImplementedError

    def from_mtphotos(self, data: dict[str, Any], entries: Entries, size: tuple[int, int] | None) -> Any:
        """An MT Photos reply as this task's Immich value; ``size`` is (width, height) of the image sent."""
        raise NotImplementedError


def option(entries: Entries, type_: ModelType, name: str, default: Any) -> Any:
    """A request option of one entry, ``default`` when the client left it out (Immich's server default)."""
    entry = entries.get(type_)
    value = getattr(entry.options, name) if entry is not None else None
    return default if value is None else value


# ---- shared reply checks ---------------------------------------------------------------------------


def is_number(value: object) -> bool:
    return type(value) in _NUMBER_TYPES and math.isfinite(value)  # type: ignore[arg-type]


def finite_number(value: object, what: str) -> float:
    """MT Photos' numbers: strings or numbers, always finite."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidReply(f"{what} is not a number: {value!r}") from None
    if not math.isfinite(number):
        raise InvalidReply(f"{what} is not finite: {value!r}")
    return number


def check_embedding(value: object, dimension: int | None, what: str) -> str:
    """A JSON-array string of finite numbers, non-zero, of ``dimension`` entries when known."""
    if not isinstance(value, str):
        raise InvalidReply(f"{what} must be a string holding a JSON array, got {type(value).__name__}")
    try:
        vector = orjson.loads(value)
    except orjson.JSONDecodeError:
        raise InvalidReply(f"{what} is not a JSON array: {value[:80]!r}") from None
    if not isinstance(vector, list) or not vector:
        raise InvalidReply(f"{what} is empty")
    if dimension is not None and len(vector) != dimension:
        raise InvalidReply(f"{what} has {len(vector)} dimensions, expected {dimension}")
    # C-level checks (map/set/sum), not a Python loop per element: this runs on every reply on the event loop.
    # orjson never yields inf/nan, so a non-finite sum can only come from absurd magnitudes.
    if not set(map(type, vector)) <= _NUMBER_TYPES or not math.isfinite(sum(vector)):
        raise InvalidReply(f"{what} holds something other than finite numbers")
    if not any(vector):
        raise InvalidReply(f"{what} is all zeros (cosine distance would be undefined)")
    return value
