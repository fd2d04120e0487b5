"""Per-tag thresholds for zero-shot tags, calibrated without labelled data.

A CLIP tag score is the cosine of the image's embedding and the tag prompt's text embedding. Its scale
differs from tag to tag: some prompts sit close to every photo ("hubs": generic words, people, text),
others far from all of them, so one global cut-off floods some tags and silences others. The
calibration asks, per tag, "how similar to this prompt is an ordinary image?" over a *reference set* of
unlabelled image embeddings (the library's own photos, a random sample) and puts the tag's threshold
``k`` robust standard deviations above that:

    threshold_t = median_t + k * 1.4826 * MAD_t

over the reference scores of tag ``t`` (1.4826 * MAD estimates the standard deviation of a normal
distribution). Most tags are absent from most images (a photo shows a handful of 1 136 concepts), so
the reference distribution approximates the tag's "absent" scores; the median and the MAD are used
instead of mean and standard deviation so that the images that do show the tag (a tail of high scores)
barely move it. A tag then fires when the image is an outlier *for that tag*, which corrects the
per-tag bias; how good the result is depends on the CLIP model, ``k`` and how representative the
reference set is, and is not measured here (the project ships no labelled photos).
"""

from __future__ import annotations

import numpy as np

MAD_TO_STD = 1.4826  # sigma of a normal distribution = 1.4826 * its median absolute deviation


def robust_stats(texts: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``texts``: T x D unit rows (one per tag); ``reference``: N x D unit rows (unlabelled images).
    Returns each tag's median reference score and robust spread (1.4826 x MAD), T float32 each."""
    if reference.ndim != 2 or reference.shape[0] < 2:
        raise ValueError("calibration needs at least two reference embeddings")
    if texts.shape[1] != reference.shape[1]:
        raise ValueError(f"text embeddings have {texts.shape[1]} dimensions, reference ones {reference.shape[1]}")
    scores = np.asarray(reference, dtype=np.float32) @ np.asarray(texts, dtype=np.float32).T  # N x T
    median = np.median(scores, axis=0)
    spread = MAD_TO_STD * np.median(np.abs(scores - median), axis=0)
    return median.astype(np.float32), spread.astype(np.float32)


def robust_thresholds(texts: np.ndarray, reference: np.ndarray, k: float) -> np.ndarray:
    """T thresholds: each tag's median reference score plus ``k`` robust standard deviations."""
    median, spread = robust_stats(texts, reference)
    return median + np.float32(k) * spread


def read_overrides(text: str) -> dict[str, float]:
    """A per-tag override file: ``tag<TAB>threshold`` per line, ``#`` comments and blank lines ignored.
    Raises ValueError naming the line that is wrong."""
    found: dict[str, float] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) != 2 or not parts[0].strip():
            raise ValueError(f"line {number}: expected 'tag<TAB>threshold', got {line[:80]!r}")
        try:
            value = float(parts[1])
        except ValueError:
            raise ValueError(f"line {number}: {parts[1][:40]!r} is not a number") from None
        if not -1.0 <= value <= 1.0:
            raise ValueError(f"line {number}: threshold {value} is outside [-1, 1]")
        found[parts[0].strip()] = value
    return found
