"""Which Immich ``facialRecognition.maxDistance`` fits which face model: the one place this is written down.

Immich joins two faces into one person when the cosine distance of their stored vectors is at most
``maxDistance`` (0.5 by default, 0.1–2 allowed). What distance separates people depends on the model
that made the vectors, so a value that suits InsightFace's packs can merge everyone with another model.
The gateway warns (log, ``/status``, ``/ai/``) when Immich's value is outside the range of the model that
will answer Immich's face requests; for a model not listed here it makes no claim.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MaxDistanceRange:
    low: float  # below this the same person is split into several people
    high: float  # above this different people are merged into one
    basis: str  # where the numbers come from

    def fits(self, max_distance: float) -> bool:
        return self.low <= max_distance <= self.high


_INSIGHTFACE = MaxDistanceRange(
    0.3,
    0.7,
    "a band around Immich's own default 0.5 for these packs, not measured by this project",
)

# Immich's InsightFace packs (its Hugging Face organisation publishes them in Immich's layout).
INSIGHTFACE_PACKS = ("antelopev2", "buffalo_l", "buffalo_m", "buffalo_s")

FACE_MAX_DISTANCE: dict[str, MaxDistanceRange] = {
    # tests/test_faces_model.py::test_dlib_at_immichs_defaults_keeps_people_apart measures this on ten people
    # (tests/data/faces): the same person at most 0.26 apart, different people at least 0.53.
    "dlib": MaxDistanceRange(
        0.3, 0.5, "measured on real photos of ten people: same person <= 0.26 apart, different people >= 0.53"
    ),
    **dict.fromkeys(INSIGHTFACE_PACKS, _INSIGHTFACE),
}


def max_distance_range(model: str) -> MaxDistanceRange | None:
    """The fitting range for ``model`` (a name as the AI service knows it), or None: no claim."""
    return FACE_MAX_DISTANCE.get(model)
