"""Give freed heap memory back to the OS before a large allocation.

glibc keeps memory a process freed (the big hash tables of a 500k-id map, for one) in
its heap, so the peak RSS of "free the id map, then load the index" is the sum of
both. ``malloc_trim(0)`` returns it: measured at 500k drawers, 423 MB -> 250 MB right
before hnswlib loads the 840 MB index. A no-op where libc has no ``malloc_trim``
(musl, macOS).
"""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def _trim():  # noqa: ANN202 - a ctypes function or None
    try:
        # the process's own symbols, libc's among them: ctypes.util.find_library would run
        # ``ldconfig -p`` in a subprocess (0.1 s, in the middle of a repair)
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_freed_memory() -> None:
    """Return the heap's free pages to the OS (glibc), else nothing."""
    fn = _trim()
    if fn is not None:
        fn(0)
