"""Task -> ordered backends, and Immich model name -> backend model name.

Immich sends the model name its admin set (``ViT-B-32__openai``, ``cn-clip/ViT-B-16__openai``,
``buffalo_l``). The map in ``GATEWAY_MODEL_MAP__<TASK>`` turns it into the name the backends load;
the effective map is logged at start-up and served on ``GET /status``, so what answers which name is
never a guess. Every backend of a route receives the *same* mapped name: failing over must never
mix vectors of two models in one Immich table.

CLIP dimensions: Immich sizes ``smart_search.embedding`` from its own table for the name it sends
(the part after the last '/'), never from our reply. An exact mapping is checked once at start-up
(refusing to start on a mismatch, naming both numbers); a prefix mapping accepts any suffix, so it
is checked per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ai_service.errors import Unprocessable
from ai_service.models.clip.catalog import KNOWN_CLIP_MODELS
from ai_service.protocol.immich import ModelTask, ModelType, PipelineEntry
from ai_service.protocol.immich_clip_models import IMMICH_CLIP_DIMENSIONS, immich_clip_dimension
from ai_service.protocol.immich_face_models import max_distance_range
from ai_service.tasks import task_for
from gateway.settings import GatewaySettings

# Every CLIP model the AI service knows (Immich's allow-list and the Chinese-CLIP exports): embedding sizes.
KNOWN_CLIP_DIMENSIONS: dict[str, int] = {name: known.embed_dim for name, known in KNOWN_CLIP_MODELS.items()}


class ConfigError(ValueError):
    """The configuration cannot work; the gateway refuses to start with this message."""


class MappingError(Unprocessable, ValueError):
    """A request's model name cannot be served consistently (e.g. a prefix route with the wrong dimension)."""


def normalise_name(name: str) -> str:
    """Immich's own rule for the part that identifies a model: after the last '/', ':' -> '_'."""
    return name.split("/")[-1].replace(":", "_")


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    requested: str  # what Immich sent
    target: str  # what the backends are asked for
    rule: str | None  # the map key that matched, None for pass-through
    expected_dim: int | None  # embedding size the reply must have (None: unknown, only non-empty)


@dataclass(frozen=True, slots=True)
class RoutedTask:
    """One task of a request after mapping: typed entries for in-process use, raw JSON for forwarding."""

    task: ModelTask
    entries: dict[ModelType, PipelineEntry]
    raw: dict[str, Any]  # {type: {"modelName": target, "options": {... as Immich sent, unknown keys kept}}}
    model: ResolvedModel


@dataclass
class Router:
    settings: GatewaySettings
    clip_dims: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        declared = {normalise_name(k): v for k, v in self.settings.clip_dimensions.items()}
        # Declared sizes win: they describe the deployment's own exports.
        self.clip_dims = {**KNOWN_CLIP_DIMENSIONS, **declared}
        self.check_startup()

    # ---- routes ----------------------------------------------------------------------------------

    def backends_for(self, task: ModelTask) -> list[str]:
        return self.settings.route(task)

    # ---- model names -----------------------------------------------------------------------------

    def backend_dimension(self, target: str) -> int | None:
        return self.clip_dims.get(normalise_name(target))

    def resolve(self, task: ModelTask, requested: str) -> ResolvedModel:
        mapping = self.settings.model_map_for(task)
        rule: str | None = None
        if requested in mapping:
            rule = requested
        else:
            prefixes = [k for k in mapping if k.endswith("/") and requested.startswith(k)]
            if prefixes:
                rule = max(prefixes, key=len)
        target = mapping[rule] if rule is not None else requested
        expected: int | None = None
        if task is ModelTask.CLIP:
            immich_dim = immich_clip_dimension(requested)
            backend_dim = self.backend_dimension(target)
            if immich_dim is not None and backend_dim is not None and immich_dim != backend_dim:
                raise MappingError(
                    f"CLIP model '{requested}' is routed to '{target}' (rule '{rule}'), which returns "
                    f"{backend_dim}-d vectors, but Immich sizes its smart_search column for '{requested}' at "
                    f"{immich_dim} dimensions. Choose an Immich name with {backend_dim} dimensions after "
                    f"'{rule}' (e.g. '{rule}{self._example_name(backend_dim)}') or change GATEWAY_MODEL_MAP__CLIP."
                )
            expected = immich_dim if immich_dim is not None else backend_dim
        else:
            expected = task_for(task).embedding_dimension  # fixed by Immich's schema (faces: vector(512))
        return ResolvedModel(requested=requested, target=target, rule=rule, expected_dim=expected)

    def route_task(self, task: ModelTask, types: dict[ModelType, PipelineEntry], raw: dict[str, Any]) -> RoutedTask:
        names = {entry.model_name for entry in types.values()}
        if len(names) != 1:
            # Immich always names one model per task; two would mean two vector spaces in one reply.
            raise MappingError(f"task '{task}' names different models for its types: {sorted(names)}")
        model = self.resolve(task, names.pop())
        mapped = {type_: entry.model_copy(update={"model_name": model.target}) for type_, entry in types.items()}
        mapped_raw: dict[str, Any] = {}
        for type_ in types:
            entry_raw = raw.get(type_.value)
            entry_raw = dict(entry_raw) if isinstance(entry_raw, dict) else {}
            entry_raw["modelName"] = model.target
            mapped_raw[type_.value] = entry_raw
        return RoutedTask(task=task, entries=mapped, raw=mapped_raw, model=model)

    @staticmethod
    def _example_name(dim: int) -> str:
        # The shortest plain ViT name reads best in an error message (ViT-B-16__openai for 512).
        names = sorted(
            (n for n, d in IMMICH_CLIP_DIMENSIONS.items() if d == dim), key=lambda n: ("ViT" not in n, len(n))
        )
        return names[0] if names else "<name>"

    # ---- start-up check --------------------------------------------------------------------------

    def check_startup(self) -> None:
        problems: list[str] = []
        for immich_name, target in self.settings.model_map_for(ModelTask.CLIP).items():
            if immich_name.endswith("/"):
                if self.backend_dimension(target) is None:
                    problems.append(
                        f"CLIP prefix route '{immich_name}' -> '{target}': the gateway does not know the embedding "
                        f"size of '{target}'; declare it in GATEWAY_CLIP_DIMENSIONS"
                    )
                continue
            immich_dim = immich_clip_dimension(immich_name)
            backend_dim = self.backend_dimension(target)
            if immich_dim is None:
                # Immich's admin UI refuses names outside its table, so only a patched server sends this;
                # the reply is then checked against the backend's own size.
                continue
            if backend_dim is None:
                problems.append(
                    f"CLIP mapping '{immich_name}' -> '{target}': Immich expects {immich_dim} dimensions for "
                    f"'{immich_name}' but the size of '{target}' is unknown; declare it in GATEWAY_CLIP_DIMENSIONS"
                )
            elif backend_dim != immich_dim:
                problems.append(
                    f"CLIP mapping '{immich_name}' -> '{target}': Immich sizes its vector column at {immich_dim} "
                    f"dimensions for '{immich_name}', but '{target}' returns {backend_dim}-d vectors "
                    f"({immich_dim} != {backend_dim}); map a {backend_dim}-d Immich name instead"
                )
        for name, backend in self.settings.backends.items():
            served = backend.served_model(ModelTask.CLIP)
            if served is not None and self.backend_dimension(served) is None:
                problems.append(
                    f"backend '{name}' serves CLIP model '{served}' of unknown size; declare it in "
                    "GATEWAY_CLIP_DIMENSIONS"
                )
        if problems:
            raise ConfigError("refusing to start:\n  " + "\n  ".join(problems))

    def startup_warnings(self) -> list[str]:
        """Configurations that start but are probably not what the admin meant (logged, not fatal)."""
        warnings: list[str] = []
        for task in ModelTask:
            mapping = self.settings.model_map_for(task)
            targets = {normalise_name(t) for t in mapping.values()}
            for name in self.backends_for(task):
                backend = self.settings.backends[name]
                served = backend.served_model(task)
                if served is not None:
                    reachable = normalise_name(served) in targets or served not in mapping
                    if not reachable:
                        warnings.append(
                            f"{task}: backend '{name}' runs '{served}', but GATEWAY_MODEL_MAP__"
                            f"{task.name} maps '{served}' to '{mapping[served]}' and no name to '{served}': "
                            f"'{name}' will be skipped for every {task} request"
                        )
                elif backend.kind.value == "immich" and task is ModelTask.FACIAL_RECOGNITION and "dlib" in targets:
                    # A face map to the service's bundled dlib model; a stock immich-machine-learning has
                    # no 'dlib' and would fail every face request over.
                    warnings.append(
                        f"{task}: backend '{name}' will be asked for 'dlib' where Immich sends "
                        f"{sorted(k for k, v in mapping.items() if v == 'dlib')}; if it is a stock Immich ML "
                        "service, remove those names from GATEWAY_MODEL_MAP__FACIAL_RECOGNITION or route faces "
                        "to a backend that has dlib"
                    )
        return warnings

    def face_distance_warnings(self, immich_model: str, max_distance: float) -> list[str]:
        """Warnings when Immich's facialRecognition.maxDistance does not fit the face model that answers
        ``immich_model`` after the map (and any fixed model a backend on the face route runs); a model
        without a known range gets no claim."""
        task = ModelTask.FACIAL_RECOGNITION
        target = self.resolve(task, immich_model).target
        models = [target]
        for name in self.backends_for(task):
            served = self.settings.backends[name].served_model(task)
            if served is not None and served not in models:
                models.append(served)
        warnings: list[str] = []
        for model in models:
            fit = max_distance_range(normalise_name(model))
            if fit is None or fit.fits(max_distance):
                continue
            effect = (
                "different people will be merged into one"
                if max_distance > fit.high
                else ("one person will be split into several")
            )
            warnings.append(
                f"{task}: Immich's Max recognition distance (facialRecognition.maxDistance) is {max_distance:g}, "
                f"but its '{immich_model}' is answered by '{model}', which fits {fit.low:g}-{fit.high:g} "
                f"({fit.basis}): {effect}. Set it within that range in Immich's settings (Facial Recognition)"
            )
        return warnings

    def describe(self) -> dict[str, Any]:
        """The effective routing, for the start-up log and ``GET /status`` (no secrets in here)."""
        out: dict[str, Any] = {}
        for task in ModelTask:
            mapping = self.settings.model_map_for(task)
            entry: dict[str, Any] = {"backends": self.backends_for(task), "model_map": dict(mapping)}
            if task is ModelTask.CLIP:
                entry["dimensions"] = {
                    target: self.backend_dimension(target) for target in sorted(set(mapping.values()))
                }
            out[task.value] = entry
        return out
