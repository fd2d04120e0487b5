"""The order of OCR lines in an Immich reply: top-to-bottom, then left-to-right within a line.

One rule for every OCR reply Immich gets, whichever model produced it: the AI service's own OCR
(``ai_service/models/ocr.py``) and the MT Photos adapter (``gateway/backends/mtphotos.py``). Boxes whose top
edges differ by less than ``SAME_LINE_PX`` from the previous box (in y order) continue the same line, as in
PaddleOCR's ``sorted_boxes``, so "left-to-right" survives a few pixels of slant; lines are then read by x.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")

#: Top edges closer than this many pixels are one line (PaddleOCR's rule).
SAME_LINE_PX = 10.0


def reading_order(tops: Sequence[float] | np.ndarray, lefts: Sequence[float] | np.ndarray) -> np.ndarray:
    """Indices that put boxes (given by their top-left corners, in pixels) into reading order."""
    y = np.asarray(tops, dtype=np.float64)
    if len(y) == 0:
        return np.zeros(0, dtype=np.int64)
    x = np.asarray(lefts, dtype=np.float64)
    by_y = np.argsort(y, kind="stable")
    line = np.concatenate([[0], np.cumsum(np.diff(y[by_y]) >= SAME_LINE_PX)])
    return by_y[np.lexsort((x[by_y], line))]


def sort_lines(lines: Sequence[tuple[float, float, T]]) -> list[T]:
    """(top, left, payload) -> payloads in reading order."""
    order = reading_order([top for top, _, _ in lines], [left for _, left, _ in lines])
    return [lines[i][2] for i in order]
