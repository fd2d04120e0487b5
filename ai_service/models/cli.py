"""``python -m ai_service models …``: list, pull and export models in the model folder.

    models list [--task TASK]
    models pull NAME [--task clip|facial-recognition] [--revision REV]
    models export-cn-clip --arch ViT-B-16 [--checkpoint-dir DIR | --checkpoint FILE] [--name NAME]

Exit status: 0 done, 1 failed (the reason on stderr), 2 bad usage.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from ai_service.models.base import ModelError
from ai_service.models.clip.catalog import CN_CLIP_ARCHS, KNOWN_CLIP_MODELS
from ai_service.models.clip.family import ClipFamily
from ai_service.models.install import pull_model
from ai_service.models.store import MODEL_FILE, ModelStore
from ai_service.protocol.immich import ModelTask
from ai_service.protocol.immich_face_models import INSIGHTFACE_PACKS
from ai_service.settings import AIServiceSettings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ai_service models", description="Manage the model folder.")
    commands = parser.add_subparsers(dest="command", required=True)

    listing = commands.add_parser("list", help="installed models per task, and known ones not installed yet")
    listing.add_argument("--task", choices=[str(t) for t in ModelTask], help="only this task")

    pull = commands.add_parser(
        "pull",
        help=(
            "download a model from the Hugging Face-compatible endpoint (Chinese-CLIP: converted from the "
            "transformers.js export in AI_SERVICE_CN_CLIP_REPOS, no torch needed)"
        ),
    )
    pull.add_argument("name", help="model name (e.g. ViT-B-32__openai, buffalo_l) or OWNER/NAME")
    pull.add_argument(
        "--task",
        choices=[str(ModelTask.CLIP), str(ModelTask.FACIAL_RECOGNITION)],
        help="default: facial-recognition for Immich's face packs, clip otherwise",
    )
    pull.add_argument("--revision", help="branch, tag or commit to download (default: the default branch)")

    export = commands.add_parser(
        "export-cn-clip", help="export an official Chinese-CLIP checkpoint to ONNX (needs the 'export' extra)"
    )
    export.add_argument("--arch", required=True, choices=list(CN_CLIP_ARCHS), help="Chinese-CLIP architecture")
    source = export.add_mutually_exclusive_group()
    source.add_argument("--checkpoint-dir", type=Path, help="where to download / find the checkpoint (~/.cache/clip)")
    source.add_argument("--checkpoint", type=Path, help="a checkpoint file already on disk (clip_cn_*.pt)")
    export.add_argument("--name", help="installed name (default: <arch>__cn-clip)")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 14; default 17)")
    export.add_argument("--no-verify", action="store_true", help="skip the comparison against the torch model")
    export.add_argument("--allow-pickle", action="store_true", help="load a checkpoint that is not plain weights")
    return parser


def run(argv: list[str], settings: AIServiceSettings) -> int:
    """Run one ``models`` command; returns the process exit status."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help (0) and usage errors (2)
        return int(exc.code or 0)
    store = ModelStore(settings.model_dir)
    try:
        if args.command == "list":
            _list(settings, args.task, sys.stdout)
        elif args.command == "pull":
            _pull(store, settings, args, sys.stdout)
        elif args.command == "export-cn-clip":
            _export(store, settings, args, sys.stdout)
    except (ModelError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _list(settings: AIServiceSettings, only: str | None, out: TextIO) -> None:
    # Through the service's own registry, so bundled models (dlib, the OCR pack) and every family's
    # idea of "installed" show exactly as the service will see them.
    from ai_service.inference import build_registry

    registry = build_registry(settings)
    store = ModelStore(settings.model_dir)
    print(f"model folder: {store.root}", file=out)
    tasks = [ModelTask(only)] if only else list(registry.families)
    for task in tasks:
        family = registry.family(task)
        clip = family if isinstance(family, ClipFamily) else None
        installed = family.installed()
        print(f"\n{task}: installed", file=out)
        if not installed:
            print("  (none)", file=out)
        for name in installed:
            folder = store.root / str(task) / name
            parts = sorted(p.name for p in folder.iterdir() if (p / MODEL_FILE).is_file()) if folder.is_dir() else []
            dims = f" {clip.embedding_size(name) or '?'}-d" if clip else ""
            shown = f" [{', '.join(parts)}]" if parts else ""
            print(f"  {name}{dims}{shown}", file=out)
        missing = [n for n in family.known() if n not in installed]
        if clip:  # cn-clip first: the reason this service exists
            missing.sort(key=lambda n: (n not in KNOWN_CLIP_MODELS or KNOWN_CLIP_MODELS[n].source != "cn-clip", n))
        if missing:
            print(f"{task}: known, not installed", file=out)
        for name in missing:
            print(f"  {name}{_describe_known(settings, task, name)}", file=out)


def _describe_known(settings: AIServiceSettings, task: ModelTask, name: str) -> str:
    if task == ModelTask.FACIAL_RECOGNITION and name in INSIGHTFACE_PACKS:
        return " (models pull)"
    known = KNOWN_CLIP_MODELS.get(name) if task == ModelTask.CLIP else None
    if known is None:
        return ""
    how = "models pull"
    if known.source == "cn-clip":
        how = "models pull, or models export-cn-clip" if settings.cn_clip_repos.get(name) else "models export-cn-clip"
    return f" {known.embed_dim}-d, {known.source} ({how})"


def _pull(store: ModelStore, settings: AIServiceSettings, args: argparse.Namespace, out: TextIO) -> None:
    task = ModelTask(args.task) if args.task else None
    path = pull_model(store, settings, args.name, task, revision=args.revision)
    print(f"installed {path}", file=out)


def _export(store: ModelStore, settings: AIServiceSettings, args: argparse.Namespace, out: TextIO) -> None:
    from ai_service.models.export_cn_clip import export_cn_clip

    report = export_cn_clip(
        args.arch,
        store,
        checkpoint=args.checkpoint,
        checkpoint_dir=args.checkpoint_dir,
        name=args.name,
        opset=args.opset,
        verify=not args.no_verify,
        allow_pickle=args.allow_pickle,
        session_options=settings.session_options(),
        settings=settings,
    )
    print(f"installed {report.path} ({report.embed_dim}-d)", file=out)
    if report.verified:
        print(
            f"verified against torch: image cosine >= {min(report.image_cosines):.6f}, "
            f"text cosine >= {min(report.text_cosines):.6f}, "
            f"preprocessing max |diff| {report.preprocess_max_abs_diff:.2e}",
            file=out,
        )
    else:
        print("not verified (--no-verify)", file=out)
