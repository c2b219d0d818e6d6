"""How much memory the machine can still give, without swapping.

The chromadb post-check loads the repaired index beside chaosfix's verification only
when the machine can hold both; this says whether it can.
"""

from __future__ import annotations

import os


def available_memory() -> int | None:
    """Bytes the kernel can hand out without swapping: ``MemAvailable`` (Linux: free
    pages plus the page cache and slabs it can drop), else the free pages alone (an
    underestimate, which only makes callers more careful), else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):  # (no such name on this platform)
        return None
