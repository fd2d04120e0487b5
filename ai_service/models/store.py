"""The model folder, in Immich's cache layout: ``<root>/<task>/<name>/<type>/model.onnx``.

Pointing ``AI_SERVICE_MODEL_DIR`` at an immich-machine-learning cache folder reuses the models it
already downloaded. Names reaching this module are already cleaned (see ``base.clean_name``), so a
path built here never leaves ``root``.
"""

from __future__ import annotations

from pathlib import Path

from ai_service.protocol.immich import ModelTask

MODEL_FILE = "model.onnx"


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()

    def model_dir(self, task: ModelTask | str, name: str) -> Path:
        path = (self.root / str(task) / name).resolve()
        root = self.root.resolve()
        if root not in path.parents:
            raise ValueError(f"model path {path} escapes the model folder {root}")
        return path

    def has_files(self, task: ModelTask | str, name: str, types: tuple[str, ...]) -> bool:
        base = self.model_dir(task, name)
        return all((base / t / MODEL_FILE).is_file() for t in types)

    def installed(self, task: ModelTask | str) -> list[str]:
        """Names under ``<root>/<task>/`` that hold at least one ``<type>/model.onnx``."""
        task_dir = self.root / str(task)
        if not task_dir.is_dir():
            return []
        return sorted(
            d.name for d in task_dir.iterdir() if d.is_dir() and any(d.glob(f"*/{MODEL_FILE}"))
        )
