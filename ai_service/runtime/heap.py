"""Hand freed heap memory back to the system after a request that decoded a large image.

Pillow allocates a decoded image in 16 MiB blocks and numpy its arrays with ``malloc``; glibc serves
allocations of that size from its heaps (its mmap threshold rises to 32 MiB as large blocks are freed)
and keeps freed heap memory for reuse. Measured: one 100 MP decode in a worker thread left the process
440 MiB larger after everything was freed; ``malloc_trim(0)`` gave all of it back in milliseconds.
Elsewhere than glibc (musl, macOS) there is no ``malloc_trim`` and this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Requests that decoded fewer pixels than this (Immich's 1440-px previews are 2-4 MP) skip the trim:
# what they free is reused by the next request anyway.
TRIM_MIN_PIXELS = 8_000_000


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()
_decoded = threading.local()


def note_decoded(pixels: int) -> None:
    """Called by the decoder: this thread's request holds an image of ``pixels``."""
    _decoded.pixels = getattr(_decoded, "pixels", 0) + pixels


def call_then_release(fn: Callable[..., T], *args: object) -> T:
    """Run ``fn`` (one request's blocking work) and, if it decoded a large image, trim the heap after it."""
    _decoded.pixels = 0
    try:
        return fn(*args)
    finally:
        if _malloc_trim is not None and _decoded.pixels >= TRIM_MIN_PIXELS:
            _malloc_trim(0)
        _decoded.pixels = 0
