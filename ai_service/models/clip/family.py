"""The CLIP model family: Immich's on-disk layout, names, install hints, and the two loaders.

Layout per model (Immich's; ``<model_dir>/clip/<name>/``)::

    config.json                  embed_dim, vision_cfg.image_size, text_cfg.context_length, ...
    visual/model.onnx            input "image" N x 3 x S x S float32
    visual/preprocess_cfg.json   size, mean, std, interpolation, resize_mode
    textual/model.onnx           input "text" (or "input_ids" + "attention_mask")
    textual/tokenizer.json
    textual/tokenizer_config.json
"""

from __future__ import annotations

from ai_service.models.base import ModelLoadError, UnknownModelError
from ai_service.models.clip.catalog import KNOWN_CLIP_MODELS, canonical_clip_name, cn_clip_arch
from ai_service.models.clip.common import CONFIG_FILE, config_embed_dim, read_json
from ai_service.models.clip.textual import ClipTextualEncoder
from ai_service.models.clip.visual import ClipVisualEncoder
from ai_service.models.store import ModelStore
from ai_service.protocol.immich import ModelTask, ModelType
from ai_service.runtime.onnx import SessionOptions
from ai_service.settings import AIServiceSettings

COMPONENTS = ("visual", "textual")


class ClipFamily:
    task = ModelTask.CLIP

    def __init__(self, store: ModelStore, session_options: SessionOptions, settings: AIServiceSettings) -> None:
        self.store = store
        self.session_options = session_options
        self.settings = settings

    def canonical_name(self, name: str) -> str:
        # A folder on disk wins over an alias: a user who installed "ViT-B-16" by hand gets that one.
        if (self.store.root / str(self.task) / name).is_dir():
            return name
        return canonical_clip_name(name)

    def component(self, type_: ModelType) -> str:
        value = str(type_)
        if value not in COMPONENTS:
            raise UnknownModelError(f"clip models have no '{value}' part; types: {', '.join(COMPONENTS)}")
        return value

    def installed(self) -> list[str]:
        return self.store.installed(self.task)

    def is_installed(self, name: str, component: str) -> bool:
        return self.store.has_files(self.task, name, (component,))

    def known(self) -> list[str]:
        return sorted(KNOWN_CLIP_MODELS)

    def embedding_size(self, name: str) -> int | None:
        """The vector size of ``name``: from its installed config.json, else from the catalog."""
        config_path = self.store.model_dir(self.task, name) / CONFIG_FILE
        if config_path.is_file():
            try:
                dim = config_embed_dim(read_json(config_path, name))
            except ModelLoadError:  # a broken config must not break listings; load() reports it properly
                dim = None
            if dim is not None:
                return dim
        known = KNOWN_CLIP_MODELS.get(name)
        return known.embed_dim if known else None

    def downloadable(self, name: str) -> bool:
        # Immich's allow-list is on its hub; Chinese-CLIP names only where a source repo is configured.
        if cn_clip_arch(name) is not None:
            return name in self.settings.cn_clip_repos
        return name in KNOWN_CLIP_MODELS

    def install_hint(self, name: str) -> str:
        endpoint = self.settings.hf_endpoint.rstrip("/")
        source = f"{endpoint}/{self.settings.model_repo_owner}/{name}"
        pull = f"`python -m ai_service models pull {name}`"
        arch = cn_clip_arch(name)
        if arch is None:
            return f"Install it with {pull} (downloads {source})."
        export = (
            f"`python -m ai_service models export-cn-clip --arch {arch.arch}` on a machine that can download the "
            "official Chinese-CLIP checkpoint (needs the 'export' extra and torch)"
        )
        repo = self.settings.cn_clip_repos.get(name)
        if repo:
            return (
                f"Install it with {pull} (converts the ONNX export {endpoint}/{repo}, no torch needed; "
                f"AI_SERVICE_CN_CLIP_REPOS / AI_SERVICE_HF_ENDPOINT choose the source), or export it with {export}."
            )
        return (
            f"Export it with {export} and copy the resulting folder to {self.store.root / str(self.task) / name}, "
            f"or run {pull} if {source} hosts an export (set AI_SERVICE_HF_ENDPOINT / AI_SERVICE_MODEL_REPO_OWNER)."
        )

    def load(self, name: str, component: str) -> ClipVisualEncoder | ClipTextualEncoder:
        model_dir = self.store.model_dir(self.task, name)
        config = read_json(model_dir / CONFIG_FILE, f"clip model '{name}'")
        if component == "visual":
            return ClipVisualEncoder(name, model_dir, config, self.session_options)
        if component == "textual":
            return ClipTextualEncoder(name, model_dir, config, self.session_options)
        raise UnknownModelError(f"clip models have no '{component}' part; types: {', '.join(COMPONENTS)}")
