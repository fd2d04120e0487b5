"""The face model family: which names exist, where their files are, and how they load.

Names (Immich sends the same name for ``detection`` and ``recognition``):

* ``buffalo_l``, ``buffalo_m``, ``buffalo_s``, ``antelopev2``: InsightFace packs (SCRFD detector +
  512-d ArcFace recogniser), exactly as Immich runs them. Read from
  ``<model_dir>/facial-recognition/<name>/{detection,recognition}/model.onnx`` (Immich's cache layout,
  what ``python -m ai_service models pull <name>`` writes), or else from an InsightFace models folder
  (``AI_SERVICE_INSIGHTFACE_DIR``, e.g. ``~/.insightface/models/buffalo_l/det_10g.onnx`` +
  ``w600k_r50.onnx``), where the detector and recogniser are recognised by their interfaces, not
  their file names. Any other name laid out the same way is served too. InsightFace's pretrained
  models are for non-commercial research use only.
* ``dlib``: dlib's HOG detector + ResNet descriptor, installed with the service (see
  :mod:`ai_service.models.faces.dlib_models`, including the ``maxDistance`` to use with Immich).

Optional settings read with defaults, so they can be added to ``AIServiceSettings`` later:
``face_dlib_min_face_px`` (float, 48) and ``face_max_batch_size`` (int | None, None).
"""

from __future__ import annotations

import threading
from pathlib import Path

from ai_service.models.base import ModelLoadError, ModelNotInstalledError, UnknownModelError
from ai_service.models.faces.arcface import ArcFaceRecognizer
from ai_service.models.faces.dlib_models import (
    DlibFaceDetector,
    DlibFaceRecognizer,
    dlib_available,
)
from ai_service.models.faces.onnx_info import (
    OnnxFormatError,
    looks_like_arcface,
    looks_like_scrfd,
    read_interface,
)
from ai_service.models.faces.scrfd import ScrfdDetector
from ai_service.models.store import MODEL_FILE, ModelStore
from ai_service.protocol.immich import ModelTask, ModelType
from ai_service.protocol.immich_face_models import INSIGHTFACE_PACKS
from ai_service.runtime.onnx import SessionOptions, create_session
from ai_service.settings import AIServiceSettings

DETECTION = "detection"
RECOGNITION = "recognition"
COMPONENTS = (DETECTION, RECOGNITION)
DLIB = "dlib"
INSIGHTFACE_LICENCE = (
    "InsightFace's pretrained models are licensed for non-commercial research use only; "
    "the built-in 'dlib' face model has no such restriction and needs no download."
)


class FaceFamily:
    task = ModelTask.FACIAL_RECOGNITION

    def __init__(self, store: ModelStore, session_options: SessionOptions, settings: AIServiceSettings) -> None:
        self.store = store
        self.session_options = session_options
        self.settings = settings
        folder = settings.insightface_dir
        self.insightface_dir: Path | None = Path(folder).expanduser() if folder else None
        self.dlib_min_face_px = float(settings.face_dlib_min_face_px)
        self.max_batch_size: int | None = settings.face_max_batch_size
        # Probing a pack's files reads their headers; remember the verdict per file version.
        self._probe_lock = threading.Lock()
        self._probes: dict[tuple[str, int, int], str | None] = {}

    # ---- ModelFamily -------------------------------------------------------------------------------

    def canonical_name(self, name: str) -> str:
        return name

    def component(self, type_: ModelType) -> str:
        if type_ == ModelType.DETECTION:
            return DETECTION
        if type_ == ModelType.RECOGNITION:
            return RECOGNITION
        raise UnknownModelError(f"{self.task} has no '{type_}' model; types: detection, recognition")

    def installed(self) -> list[str]:
        names = {
            name
            for name in self.store.installed(self.task)
            if name != DLIB and self.store.has_files(self.task, name, COMPONENTS)
        }
        names.update(self._insightface_packs())
        if all(dlib_available(c) for c in COMPONENTS):
            names.add(DLIB)
        return sorted(names)

    def is_installed(self, name: str, component: str) -> bool:
        if component not in COMPONENTS:
            return False
        if name == DLIB:
            return dlib_available(component)
        return self.model_path(name, component) is not None

    def known(self) -> list[str]:
        return sorted({*INSIGHTFACE_PACKS, DLIB})

    def downloadable(self, name: str) -> bool:
        return name in INSIGHTFACE_PACKS  # Immich's packs, in Immich's layout on the hub

    def install_hint(self, name: str) -> str:
        if name == DLIB:
            return (
                "The 'dlib' face model ships with the 'dlib-bin' and 'face_recognition_models' packages: "
                "reinstall them (pip install dlib-bin face_recognition_models)."
            )
        where = self.store.model_dir(self.task, name)
        hint = (
            f"Install it with `python -m ai_service models pull {name}` (downloads "
            f"{self.settings.model_repo_owner}/{name} into {where}), or set AI_SERVICE_INSIGHTFACE_DIR to an "
            f"InsightFace models folder that holds {name}/."
        )
        if name not in INSIGHTFACE_PACKS:
            hint = (
                f"Put its SCRFD detector and 512-d ArcFace recogniser at {where}/detection/{MODEL_FILE} and "
                f"{where}/recognition/{MODEL_FILE}, or set AI_SERVICE_INSIGHTFACE_DIR to a folder holding {name}/."
            )
        return f"{hint} {INSIGHTFACE_LICENCE}"

    def load(self, name: str, component: str) -> object:
        if component not in COMPONENTS:
            raise UnknownModelError(f"{self.task} has no '{component}' component")
        if name == DLIB:
            if not dlib_available(component):
                raise ModelNotInstalledError(
                    f"{self.task} model 'dlib' ({component}) is not installed. {self.install_hint(name)}"
                )
            if component == DETECTION:
                return DlibFaceDetector(min_face_px=self.dlib_min_face_px)
            return DlibFaceRecognizer()
        path = self.model_path(name, component)
        if path is None:
            raise ModelNotInstalledError(
                f"{self.task} model '{name}' ({component}) is not installed. {self.install_hint(name)}"
            )
        try:
            session = create_session(path, self.session_options)
            if component == DETECTION:
                return ScrfdDetector(session)
            return ArcFaceRecognizer(
                session, max_batch_size=self.max_batch_size, batching=self.session_options.batching
            )
        except ModelLoadError as exc:
            raise ModelLoadError(f"{self.task} model '{name}' ({component}) at {path}: {exc}") from exc
        except Exception as exc:  # ONNX Runtime's own exception types (InvalidProtobuf, Fail) are not OSErrors
            raise ModelLoadError(f"{self.task} model '{name}' ({component}) at {path} failed to load: {exc}") from exc

    # ---- files -------------------------------------------------------------------------------------

    def model_path(self, name: str, component: str) -> Path | None:
        """The ONNX file serving ``component`` of ``name``: Immich layout first, then the InsightFace folder."""
        if name == DLIB:
            return None
        immich = self.store.model_dir(self.task, name) / component / MODEL_FILE
        if immich.is_file():
            return immich
        return self.insightface_files(name).get(component)

    def insightface_files(self, name: str) -> dict[str, Path]:
        """Detector and recogniser files of pack ``name`` in the InsightFace folder (may be partial)."""
        pack = self._pack_dir(name)
        if pack is None:
            return {}
        # InsightFace's antelopev2.zip unpacks into antelopev2/antelopev2/; accept one nested level.
        files = sorted(pack.glob("*.onnx")) or sorted(pack.glob("*/*.onnx"))
        found: dict[str, Path] = {}
        for path in files:
            kind = self._probe(path)
            if kind is not None and kind not in found:  # several candidates: first in name order
                found[kind] = path
        return found

    def _pack_dir(self, name: str) -> Path | None:
        if self.insightface_dir is None:
            return None
        base = self.insightface_dir.resolve()
        pack = (base / name).resolve()
        if base not in pack.parents or not pack.is_dir():
            return None
        return pack

    def _insightface_packs(self) -> list[str]:
        if self.insightface_dir is None or not self.insightface_dir.is_dir():
            return []
        return [
            d.name
            for d in sorted(self.insightface_dir.iterdir())
            if d.is_dir() and d.name != DLIB and set(self.insightface_files(d.name)) == set(COMPONENTS)
        ]

    def _probe(self, path: Path) -> str | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        with self._probe_lock:
            if key in self._probes:
                return self._probes[key]
        try:
            info = read_interface(path)
        except (OSError, OnnxFormatError):
            kind = None
        else:
            kind = DETECTION if looks_like_scrfd(info) else RECOGNITION if looks_like_arcface(info) else None
        with self._probe_lock:
            self._probes[key] = kind
        return kind
