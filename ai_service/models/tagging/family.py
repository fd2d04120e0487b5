"""The tagging model family: two kinds of tagger behind one task.

* A folder ``<model_dir>/tagging/<name>/`` holding a RAM++-layout ONNX export (:mod:`.ram`): that model.
* Otherwise the name of an installed CLIP model: the zero-shot tagger over the shipped vocabulary
  (:mod:`.zero_shot`), which needs no download beyond the CLIP model.

Both load to an object with ``names`` ((English, Chinese) per tag), ``thresholds`` (one per tag),
``input_size`` and ``scores(rgb)``; the task (``ai_service/tasks/tagging.py``) turns scores into tags.
"""

from __future__ import annotations

from ai_service.models.base import UnknownModelError
from ai_service.models.clip.family import ClipFamily
from ai_service.models.store import ModelStore
from ai_service.models.tagging.ram import RamTagger
from ai_service.models.tagging.zero_shot import CACHE_DIR, ZeroShotTagger
from ai_service.protocol.immich import ModelTask, ModelType
from ai_service.runtime.onnx import SessionOptions

COMPONENT = "visual"


class TaggingFamily:
    task = ModelTask.TAGGING

    def __init__(self, store: ModelStore, session_options: SessionOptions, clip: ClipFamily) -> None:
        self.store = store
        self.session_options = session_options
        self.clip = clip

    def _own(self, name: str) -> bool:
        return self.store.has_files(self.task, name, (COMPONENT,))

    def canonical_name(self, name: str) -> str:
        if (self.store.root / str(self.task) / name).is_dir():
            return name
        return self.clip.canonical_name(name)

    def component(self, type_: ModelType) -> str:
        if type_ is not ModelType.VISUAL:
            raise UnknownModelError(f"tagging models have no '{type_}' part; types: {COMPONENT}")
        return COMPONENT

    def installed(self) -> list[str]:
        """Installed taggers, and every installed CLIP model (each tags zero-shot)."""
        return sorted({*self.store.installed(self.task), *self.clip.installed()})

    def is_installed(self, name: str, component: str) -> bool:
        return self._own(name) or (self.clip.is_installed(name, "visual") and self.clip.is_installed(name, "textual"))

    def known(self) -> list[str]:
        return self.clip.known()

    def install_hint(self, name: str) -> str:
        if not name:  # nothing to suggest by name: say what makes a tagger
            return (
                "Zero-shot tags need an installed CLIP model (e.g. `python -m ai_service models pull "
                f"ViT-B-16__cn-clip`); a RAM++-layout tagger goes in {self.store.root / str(self.task)}/<name>/."
            )
        return (
            f"Zero-shot tags use the CLIP model of that name: {self.clip.install_hint(name)} A RAM++-layout "
            f"tagger goes in {self.store.root / str(self.task) / name}/ (visual/model.onnx, ram_tag_list.txt, "
            "ram_tag_list_chinese.txt)."
        )

    def downloadable(self, name: str) -> bool:
        return False  # the CLIP model is pulled as a CLIP model; RAM++ exports are installed by hand

    def load(self, name: str, component: str) -> RamTagger | ZeroShotTagger:
        if self._own(name):
            return RamTagger(name, self.store.model_dir(self.task, name), self.session_options)
        visual = self.clip.load(name, "visual")
        textual = self.clip.load(name, "textual")
        cache = self.store.root / str(self.task) / CACHE_DIR
        return ZeroShotTagger(name, visual, textual, cache)  # type: ignore[arg-type]
