"""``models pull ViT-B-16__cn-clip`` from a transformers.js export: download, split, install, first answer.

A random-weight Chinese-CLIP with ViT-B-16's real shapes (text: RoBERTa-wwm-ext-base over 21128 tokens;
image: ViT-B/16 at 224 px; ~750 MB fp32) is exported the way the Xenova repos were, served by the
tests' fake hub on loopback, and pulled with the service's code into an empty model folder, per variant.
Figures per variant:

* download: ``download_snapshot`` alone into a throw-away staging folder (loopback: disk-bound);
* pull: ``install.pull_model`` end to end (download + split + load check + atomic install);
* first answer: loading both encoders and one text and one image vector after that;
* peak staging: the largest size ``<model dir>/.incoming/`` reached (sampled every 50 ms), and the
  installed size. Needs the test extra (torch CPU + transformers) to build the model.

    .venv/bin/python bench/bench_cn_clip_pull.py [--variants fp32,quantized] [--work DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ai_service.models import install  # noqa: E402
from ai_service.models.clip import ClipFamily  # noqa: E402
from ai_service.models.clip.transformers_js import TransformersJsSource  # noqa: E402
from ai_service.models.store import ModelStore, download_snapshot  # noqa: E402
from ai_service.runtime.onnx import SessionOptions  # noqa: E402
from ai_service.settings import AIServiceSettings  # noqa: E402
from tests.builders.transformers_js_clip import build_transformers_js_repo  # noqa: E402
from tests.fake_hub import FakeHub  # noqa: E402

NAME = "ViT-B-16__cn-clip"
REPO_ID = "bench/chinese-clip-vit-base-patch16"


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


class PeakSampler:
    def __init__(self, folder: Path) -> None:
        self.folder, self.peak = folder, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            with contextlib.suppress(OSError):  # files vanish while being summed
                self.peak = max(self.peak, _size(self.folder))

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="fp32,quantized", help="comma-separated: fp32, fp16, quantized")
    parser.add_argument("--work", type=Path, help="folder for the repo and model folders (default: a temp dir)")
    args = parser.parse_args()
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        tiny = build_transformers_js_repo(work / "repo", variants=variants, full_size=True)
        print(f"built the ViT-B-16-shaped export in {time.perf_counter() - started:.0f} s (not part of the figures)")
        for path, data in sorted(tiny.files.items()):
            if path.startswith("onnx/"):
                print(f"  {path}: {len(data) / 1e6:.0f} MB")
        hub = FakeHub()
        try:
            hub.add(REPO_ID, tiny.files)
            header = ("variant", "download", "pull", "first answer", "peak staging", "installed")
            print("\n{:<10} {:>9} {:>7} {:>13} {:>13} {:>10}".format(*header))
            for variant in variants:
                _run_variant(work / variant, hub, variant)
        finally:
            hub.close()


def _run_variant(folder: Path, hub: FakeHub, variant: str) -> None:
    source = TransformersJsSource(REPO_ID, variant)  # type: ignore[arg-type]
    staging = folder / "download-only"
    staging.mkdir(parents=True)
    started = time.perf_counter()
    download_snapshot(
        REPO_ID,
        staging,
        endpoint=hub.url,
        token=None,
        revision=None,
        allow_patterns=source.allow_patterns(),
        target=folder / "unused",
    )
    download_s = time.perf_counter() - started

    settings = AIServiceSettings(
        model_dir=folder / "models", hf_endpoint=hub.url, cn_clip_repos={NAME: REPO_ID}, cn_clip_variant=variant
    )
    store = ModelStore(settings.model_dir)
    with PeakSampler(store.root / ".incoming") as sampler:
        started = time.perf_counter()
        path = install.pull_model(store, settings, NAME)
        pull_s = time.perf_counter() - started
    started = time.perf_counter()
    family = ClipFamily(store, SessionOptions(), settings)
    family.load(NAME, "textual").encode_text("一只猫")  # type: ignore[attr-defined]
    family.load(NAME, "visual").encode_image(np.full((1080, 1440, 3), 128, np.uint8))  # type: ignore[attr-defined]
    first_s = time.perf_counter() - started
    print(
        f"{variant:<10} {download_s:>8.1f}s {pull_s:>6.1f}s {first_s:>12.1f}s "
        f"{sampler.peak / 1e6:>10.0f} MB {_size(path) / 1e6:>7.0f} MB"
    )


if __name__ == "__main__":
    main()
