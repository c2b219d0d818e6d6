"""How much memory this process can still be given, without swapping or an OOM kill.

The chromadb post-check loads the repaired index beside chaosfix's verification only
when both fit; this says how much room there is.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_memory() -> int | None:
    """Bytes this process can still take: the machine's ``MemAvailable`` (Linux: free
    pages plus the page cache and slabs the kernel can drop; else the free pages alone,
    an underestimate), and no more than the room left under each memory limit of its
    cgroups (a container's ``--memory``, systemd's ``MemoryMax``), where ``/proc/meminfo``
    still shows the whole host. None where nothing says."""
    found = [n for n in (_meminfo(), *_cgroup_rooms()) if n is not None]
    return min(found) if found else None


def _meminfo() -> int | None:
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


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):  # ("max": no limit; a file that is not there)
        return None


def _inactive_file(stat: Path) -> int:
    """The page cache of the group and the groups below it that the kernel can drop
    before it reclaims anything else (v1's ``inactive_file`` is the group's own, its
    ``total_`` one the subtree's, which its usage counts; v2's covers the subtree)."""
    found: dict[str, int] = {}
    try:
        for line in stat.read_text(encoding="ascii").splitlines():
            key, _, value = line.partition(" ")
            if key in ("inactive_file", "total_inactive_file"):
                found[key] = int(value)
    except (OSError, ValueError):
        pass
    return found.get("total_inactive_file", found.get("inactive_file", 0))


def _cgroup_rooms(membership: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> list[int]:
    """Room under the limit of this process's cgroup and of every group above it
    (cgroup v2: ``memory.max`` - ``memory.current``; v1: ``memory.limit_in_bytes`` -
    ``memory.usage_in_bytes``), counting the page cache it can drop as room.
    ``membership``: the process's groups, as ``/proc/self/cgroup`` lists them; ``root``:
    where the hierarchies are mounted."""
    try:
        lines = membership.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    rooms: list[int] = []
    for line in lines:
        _, controllers, rel = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2
            base, limit_file, usage_file, stat_file = root, "memory.max", "memory.current", "memory.stat"
        elif "memory" in controllers.split(","):  # v1
            base = root / "memory"
            limit_file, usage_file, stat_file = "memory.limit_in_bytes", "memory.usage_in_bytes", "memory.stat"
        else:
            continue
        # (normpath: the kernel's path, read as text; nothing on disk is followed)
        group = Path(os.path.normpath(base / rel.lstrip("/"))) if rel.startswith("/") else base
        while True:  # this group, then each one above it, up to the hierarchy's root
            limit, usage = _read_int(group / limit_file), _read_int(group / usage_file)
            if limit is not None and usage is not None and limit < 1 << 60:  # (v1's "no limit" is ~2**63)
                rooms.append(max(0, limit - usage + _inactive_file(group / stat_file)))
            if group == base or base not in group.parents:
                break
            group = group.parent
    return rooms
