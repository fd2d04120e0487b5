"""Real photos of several people (``tests/data/faces``, sources and licences in its README) and the cosine
distances Immich would compute between the face vectors a model stores for them.

Ten people: Obama (four photos, one a partial face), Biden, Tom Hanks, the six people of InsightFace's
``t1.jpg`` and the astronaut of scikit-image. Each photo is also used mirrored, re-encoded at JPEG
quality 20 and brightened: the same person in a different picture. None of these photos is used to make
the dlib population mean (``scripts/dlib_population_mean.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ai_service.imaging import decode_image
from ai_service.models.base import FaceDetections
from tests.assets import astronaut_jpeg, decode_rgb, encode_jpeg
from tests.conftest import DATA_DIR

FACES_DIR = DATA_DIR / "faces"
ONE_PERSON = {
    "obama": ["obama.jpg", "obama2.jpg", "obama3.jpg", "obama_partial_face.jpg"],
    "biden": ["biden.jpg"],
    "hanks": ["Tom_Hanks_54745.png"],
}
# Face centres in t1.jpg (1280x886), from dlib's CNN detector at 2x: six people.
T1_FACE_CENTRES = np.array([[111, 331], [959, 140], [780, 414], [507, 338], [1172, 332], [306, 213]], float)

Detect = Callable[[np.ndarray], FaceDetections]
Embed = Callable[[np.ndarray, FaceDetections], np.ndarray]


@dataclass(frozen=True)
class Distances:
    same: np.ndarray  # cosine distances between two faces of one person
    different: np.ndarray  # ... of two different people

    @property
    def margin(self) -> float:
        return float(self.different.min() - self.same.max())

    def summary(self) -> str:
        return (
            f"{len(self.same)} same-person pairs: max {self.same.max():.3f}; {len(self.different)} "
            f"different-person pairs: min {self.different.min():.3f}, 5th percentile "
            f"{np.percentile(self.different, 5):.3f}; margin (min different - max same) {self.margin:.3f}"
        )


def read_photo(path: Path | bytes) -> np.ndarray:
    data = path if isinstance(path, bytes) else path.read_bytes()
    return decode_image(data, max_pixels=100_000_000).rgb


def variants(rgb: np.ndarray) -> Iterator[tuple[str, np.ndarray, bool]]:
    """(name, image, mirrored)."""
    yield "original", rgb, False
    yield "mirrored", np.ascontiguousarray(rgb[:, ::-1]), True
    yield "jpeg20", decode_rgb(encode_jpeg(rgb, quality=20)), False
    yield "brighter", np.clip(rgb.astype(np.int16) + 40, 0, 255).astype(np.uint8), False


def labelled_vectors(detect: Detect, embed: Embed) -> tuple[list[str], np.ndarray]:
    """Every face of every photo and variant, with its person's name."""
    labels: list[str] = []
    vectors: list[np.ndarray] = []
    photos = [(name, read_photo(FACES_DIR / f)) for name, files in ONE_PERSON.items() for f in files]
    photos.append(("collins", read_photo(astronaut_jpeg())))
    for name, rgb in photos:
        for variant, image, _ in variants(rgb):
            faces = detect(image)
            assert len(faces) == 1, f"{name} ({variant}): {len(faces)} faces found, expected one"
            labels.append(name)
            vectors.append(embed(image, faces)[0])
    t1 = read_photo(FACES_DIR / "t1.jpg")
    for variant, image, mirrored in variants(t1):
        faces = detect(image)
        found = (faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2
        if mirrored:
            found[:, 0] = t1.shape[1] - found[:, 0]
        people = [int(np.linalg.norm(T1_FACE_CENTRES - c, axis=1).argmin()) for c in found]
        assert sorted(people) == list(range(6)), f"t1 ({variant}): faces found at {found.tolist()}"
        labels += [f"t1-person{p}" for p in people]
        vectors.append(embed(image, faces))
    return labels, np.vstack(vectors)


def cosine_distances(labels: list[str], vectors: np.ndarray) -> Distances:
    """Pairwise cosine distances (what pgvector's ``<=>`` gives Immich), split by same/different person."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    matrix = 1.0 - unit @ unit.T
    upper = np.triu_indices(len(labels), 1)
    names = np.asarray(labels)
    same = names[upper[0]] == names[upper[1]]
    return Distances(same=matrix[upper][same], different=matrix[upper][~same])
