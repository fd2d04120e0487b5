"""Recompute the population mean of dlib's face descriptor and write it to
``ai_service/models/faces/dlib_population_mean.py``.

The ``dlib`` face model subtracts this mean from dlib's 128-d descriptor and re-normalises before padding
to Immich's 512 (see ``ai_service/models/faces/dlib_models.py`` for why). The mean is estimated on real
faces that are NOT the photos the tests measure with (``tests/data/faces``):

* the six group photos of ``@vladmandic/face-api`` 1.7.15 (npm, MIT; ``demo/sample1-6.jpg``) and the
  face-match screenshot of ``@vladmandic/human`` 3.3.6 (npm, MIT; ``assets/screenshot-facematch.jpg``,
  about 100 small face crops, mostly young women, one man many times): found with the dlib model's own
  HOG detector at Immich's default ``minScore`` 0.7;
* the 100 faces of scikit-image's ``data.lfw_subset()`` (BSD-3 package; 25x25 grey thumbnails from Labeled
  Faces in the Wild, mostly adult men), upscaled to 150x150 and described as one whole-image face.

The two sources are pooled because each alone is one-sided (young women / grey thumbnails of men); a mean
that sits off the population's centre leaves faces far from it, and their cosine distances shrink.

    .venv/bin/python scripts/dlib_population_mean.py [--cache DIR] [--check]

It downloads the two npm packages with ``npm pack`` (the npm registry is the only network access; the
images are checked by SHA-256), and ``--check`` only compares with the shipped file (exit 1 if it differs
by more than 1e-5).
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ai_service.imaging import decode_image  # noqa: E402
from ai_service.models.base import FaceDetections  # noqa: E402
from ai_service.models.faces.dlib_models import DlibFaceDetector, DlibFaceRecognizer  # noqa: E402

TARGET = REPO / "ai_service" / "models" / "faces" / "dlib_population_mean.py"
MIN_SCORE = 0.7  # Immich's default facialRecognition.minScore
LFW_FACES = 100  # lfw_subset(): the first 100 images are faces, the other 100 are not

# npm package -> {member in the tarball: SHA-256}
NPM_IMAGES: dict[str, dict[str, str]] = {
    "@vladmandic/face-api@1.7.15": {
        "package/demo/sample1.jpg": "8ecae4b267b2d3169e06e00c7dee97097aa2a94635d45216f7732a5f4943cb51",
        "package/demo/sample2.jpg": "7d2b60ae6f13bf30f422e04df87451081a02c83de469056f25afb44b7000c691",
        "package/demo/sample3.jpg": "8eb081c9efb14370fa94d9feab9e5fbeafd19a627491853a80c2bf67f7ffa936",
        "package/demo/sample4.jpg": "729efa5923061d40eb4ed5f267a18cc7b8ba6f852bb2757b16d8b7e4937476fc",
        "package/demo/sample5.jpg": "6d45095ebb182d8f975c0790e0e4eefd86fbb40609cf4b271776d92e12662938",
        "package/demo/sample6.jpg": "9baad80f9d5e306fb9b8c0913d44445f1e95848df317530efb03d0934c57ba87",
    },
    "@vladmandic/human@3.3.6": {
        "package/assets/screenshot-facematch.jpg": "0d3e56e29cf588faf2d5515f10ab18ad0f1bab4959b7e3cc885bd43f1d305465",
    },
}


def npm_images(cache: Path) -> list[bytes]:
    """The calibration photos, from ``npm pack`` tarballs kept in ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    images: list[bytes] = []
    for spec, members in NPM_IMAGES.items():
        name = spec.rsplit("@", 1)[0].lstrip("@").replace("/", "-") + "-" + spec.rsplit("@", 1)[1] + ".tgz"
        tarball = cache / name
        if not tarball.is_file():
            subprocess.run(["npm", "pack", spec, "--pack-destination", str(cache)], check=True, capture_output=True)
        with tarfile.open(tarball, "r:gz") as tar:
            for member, digest in members.items():
                extracted = tar.extractfile(member)
                if extracted is None:
                    sys.exit(f"{tarball.name} has no {member}")
                data = extracted.read()
                if hashlib.sha256(data).hexdigest() != digest:
                    sys.exit(f"{spec}:{member} is not the expected file (SHA-256 differs)")
                images.append(data)
    return images


def photo_descriptors(images: list[bytes]) -> np.ndarray:
    detector, recognizer = DlibFaceDetector(), DlibFaceRecognizer()
    found = []
    for data in images:
        rgb = decode_image(data, max_pixels=100_000_000).rgb
        found.append(recognizer.descriptors(rgb, detector.detect(rgb, MIN_SCORE)))
    return np.concatenate(found)


def lfw_descriptors() -> np.ndarray:
    import skimage.data

    recognizer = DlibFaceRecognizer()
    whole = FaceDetections(np.array([[0, 0, 150, 150]], np.float32), np.array([1.0], np.float32))
    out = []
    for grey in skimage.data.lfw_subset()[:LFW_FACES]:
        big = cv2.resize((grey * 255).round().astype(np.uint8), (150, 150), interpolation=cv2.INTER_CUBIC)
        out.append(recognizer.descriptors(np.ascontiguousarray(np.dstack([big] * 3)), whole)[0])
    return np.stack(out)


def render(mean: np.ndarray, counts: dict[str, int]) -> str:
    rows = "\n".join("    " + ", ".join(f"{v:.7f}" for v in mean[i : i + 6]) + "," for i in range(0, len(mean), 6))
    sources = ", ".join(f"{n} {k}" for k, n in counts.items())
    return (
        '"""Population mean of dlib\'s 128-d face descriptor (dlib_face_recognition_resnet_model_v1).\n\n'
        "GENERATED by scripts/dlib_population_mean.py (which says where the faces come from); do not edit.\n"
        f"Faces: {sources}.\n"
        '"""\n\n'
        f"FACES_USED = {sum(counts.values())}\n\n"
        f"DLIB_POPULATION_MEAN: tuple[float, ...] = (\n{rows}\n)\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "immich-zh-ai" / "dlib-mean")
    parser.add_argument("--check", action="store_true", help="compare with the shipped mean instead of writing")
    args = parser.parse_args()
    photos = photo_descriptors(npm_images(args.cache))
    lfw = lfw_descriptors()
    mean = np.concatenate([photos, lfw]).mean(axis=0)
    print(f"{len(photos)} faces from the npm photos, {len(lfw)} from lfw_subset; mean norm {np.linalg.norm(mean):.4f}")
    if args.check:
        from ai_service.models.faces.dlib_population_mean import DLIB_POPULATION_MEAN

        diff = float(np.abs(np.asarray(DLIB_POPULATION_MEAN) - mean).max())
        print(f"largest difference from the shipped mean: {diff:.2e}")
        sys.exit(0 if diff <= 1e-5 else 1)
    counts = {"faces in the npm photos": len(photos), "faces of lfw_subset": len(lfw)}
    TARGET.write_text(render(mean, counts), encoding="utf-8")
    print(f"wrote {TARGET.relative_to(REPO)}")


if __name__ == "__main__":
    main()
