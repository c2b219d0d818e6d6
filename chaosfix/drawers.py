"""MemPalace-shaped drawers, generated deterministically from (seed, index).

Both the palace builder (inside a chromadb child process) and the tests that judge a
repair need the same ids, documents and vectors without storing them, so everything is
a pure function of the seed and the drawer's index.
"""

from __future__ import annotations

import hashlib

WINGS = ("code", "notes", "mail", "chat", "docs")
ROOMS = ("alpha", "beta", "gamma", "delta", "eps", "zeta", "eta")
COLLECTION = "mempalace_drawers"


def drawer(index: int, seed: int = 0, version: int = 0) -> tuple[str, str, dict]:
    """Return (id, document, metadata) of drawer ``index``.

    ``version`` > 0 gives the text an update/upsert would write to the same id.
    """
    wing = WINGS[index % len(WINGS)]
    room = ROOMS[(index // len(WINGS)) % len(ROOMS)]
    tag = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=6).hexdigest()
    did = f"drawer_{wing}_{room}_{tag}"
    doc = f"drawer {index} in {wing}/{room} (seed {seed}, v{version}): note {tag}"
    meta = {"wing": wing, "room": room, "n": index}
    return did, doc, meta


def drawers(start: int, count: int, seed: int = 0, version: int = 0) -> list[tuple[str, str, dict]]:
    return [drawer(i, seed, version) for i in range(start, start + count)]
