"""The task table: every Immich task this project serves, each described once in its own module.

Adding a task = one module here (a :class:`~ai_service.tasks.base.Task` subclass) plus one entry in
:data:`TASKS` (and its name in :class:`~ai_service.protocol.immich.ModelTask`). The service, the
gateway's routing, reply validation, per-task settings and the MT Photos adapter all read this table;
none of them branches on a task name, and a task missing from the table is an error, never another task.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

from pydantic import ValidationError

from ai_service.protocol.immich import (
    IMAGE_HEIGHT,
    IMAGE_WIDTH,
    DependencyError,
    Entries,
    EntriesError,
    ModelTask,
    ModelType,
    PipelineEntry,
    load_entries_json,
)
from ai_service.tasks.base import InvalidReply, Task
from ai_service.tasks.clip import CLIP, ClipOutput
from ai_service.tasks.faces import FACES, FacesOutput
from ai_service.tasks.nsfw import NSFW, NsfwOutput
from ai_service.tasks.ocr import OCR, OcrOutput
from ai_service.tasks.tagging import TAGGING, TaggingOutput

__all__ = ["TASKS", "InvalidReply", "PredictResponse", "Task", "task_for"]

TASKS: dict[ModelTask, Task] = {task.name: task for task in (CLIP, FACES, OCR, NSFW, TAGGING)}

PredictResponse = TypedDict(
    "PredictResponse",
    {
        "clip": NotRequired[ClipOutput],
        "facial-recognition": NotRequired[FacesOutput],
        "ocr": NotRequired[OcrOutput],
        "nsfw": NotRequired[NsfwOutput],
        "tagging": NotRequired[TaggingOutput],
        IMAGE_HEIGHT: NotRequired[int],
        IMAGE_WIDTH: NotRequired[int],
    },
)
"""The /predict reply: one key per task requested, and the image's size for image requests."""

RequestEntries = dict[ModelTask, dict[ModelType, PipelineEntry]]


class UnknownTaskError(EntriesError):
    """A task name with no entry in the table."""


def task_for(name: ModelTask | str) -> Task:
    try:
        return TASKS[name]  # type: ignore[index]  # a StrEnum hashes as its value: one lookup per call
    except KeyError:
        raise UnknownTaskError(f"unknown task '{name}'; expected one of {', '.join(TASKS)}") from None


def parse_entries(raw: str | bytes) -> RequestEntries:
    """Parse and check ``entries``: known tasks and types, at least one entry."""
    return validate_entries(load_entries_json(raw))


def validate_entries(data: Any) -> RequestEntries:
    """Check already-decoded ``entries`` data (see :func:`parse_entries`)."""
    try:
        entries = Entries.model_validate(data).root
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'entries'}: {err['msg']}" for err in exc.errors()
        )
        raise EntriesError(f"'entries' has the wrong shape: {problems}") from None
    if not entries or not any(entries.values()):
        raise EntriesError('\'entries\' names no task; expected e.g. {"clip":{"textual":{"modelName":…}}}')
    for name, types in entries.items():
        task = task_for(name)
        invalid = set(types) - task.types
        if invalid:
            allowed = ", ".join(sorted(task.types))
            raise EntriesError(f"task '{name}' has no type {', '.join(sorted(invalid))}; expected {allowed}")
    return entries


def check_dependencies(entries: RequestEntries) -> None:
    """A dependent entry (e.g. recognition) needs the entry whose output it uses."""
    for name, types in entries.items():
        for type_ in types:
            needed = task_for(name).depends_on.get(type_)
            if needed is not None and needed not in types:
                raise DependencyError(f"Task {name}/{type_} depends on output of {name}/{needed}")


def input_problem(entries: RequestEntries, image: bool) -> str | None:
    """Why the request's input (an image, or else a text) does not fit its entries, or None."""
    text_types = {(name, t) for name, types in entries.items() for t in types if t == task_for(name).text_type}
    if image:
        if text_types:
            return ", ".join(sorted(f"{n}/{t}" for n, t in text_types)) + " needs a 'text' field, not an image"
        return None
    needs = sorted(f"{n}/{t}" for n, types in entries.items() for t in types if (n, t) not in text_types)
    return f"{', '.join(needs)} needs an 'image' file" if needs else None
