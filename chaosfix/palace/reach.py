"""Which elements hnswlib's search can ever return, read from the level-0 graph alone.

hnswlib's ``searchKnn`` descends the upper levels greedily from the entry point to some
element ``start`` (the entry point or an element with upper levels), then searches level
0 from ``start`` keeping the ``ef`` best. While fewer than ``ef`` results are held it
never stops, and it follows the links of deleted elements too (it only leaves them out
of the results), so at an ``ef`` of at least the element count it visits exactly the
elements reachable from ``start`` over level-0 links. So when every element can reach
the entry point (then every possible ``start`` reaches whatever the entry point
reaches), an element the entry point reaches is found by a deep enough search, whatever
the query: one breadth-first pass over the links proves it for every element at once,
with no distance computed. An element it does not reach may still be found from some
other start: the verification counts it unreachable, which errs on the side of caution.

Why: a self-query at ef 1600 costs as much as 40 at ef 40; on 500k random 384-d vectors
a quarter of the self-queries miss at ef 40, and re-asking them at doubling ef cost more
than the 10,000 inserts of the repair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHUNK = 65536  # rows of the link table gathered at once: 8 MB of ids at M=16
# breadth-first rounds before giving up: a chromadb graph of 1M elements is 7 rounds deep
# each way; a hostile chain of n elements would cost n rounds of O(n) each
MAX_ROUNDS = 64
# the backward pass re-reads the links of every element not yet known to reach the entry
# point each round: it gives up once it has read the table this many times over (a
# chromadb graph needs about 1.5; one deep only backwards would cost MAX_ROUNDS)
MAX_BACKWARD_READS = 6


@dataclass
class Reach:
    from_entry: np.ndarray  # bool per element: reachable at level 0 from the entry point
    # every element reaches the entry point at level 0, both passes done within MAX_ROUNDS:
    # only then does ``from_entry`` say what a search finds
    proves: bool


def level0_reach(links: np.ndarray, entry: int) -> Reach:
    """``links``: uint32 (elements, maxM0) level-0 neighbour ids, unused entries set to
    the element count (``HnswFiles.slots(links=True)``). Both passes cost O(links)."""
    n = len(links)
    if not 0 <= entry < n:
        return Reach(np.zeros(n, dtype=bool), False)
    # forward: a frontier at a time; index n is the sentinel, "seen" from the start
    seen = np.zeros(n + 1, dtype=bool)
    seen[n] = seen[entry] = True
    frontier = np.array([entry], dtype=np.int64)
    for _ in range(MAX_ROUNDS):
        if not len(frontier):
            break
        fresh = np.zeros(n + 1, dtype=bool)
        for s in range(0, len(frontier), CHUNK):
            nb = links[frontier[s : s + CHUNK]].ravel()
            fresh[nb[~seen[nb]]] = True
        frontier = np.flatnonzero(fresh)
        seen[frontier] = True
    if len(frontier):
        return Reach(seen[:n], False)
    # backward: an element reaches the entry point once one of its neighbours does
    to_entry = np.zeros(n + 1, dtype=bool)  # the sentinel never does
    to_entry[entry] = True
    rest = np.flatnonzero(~to_entry[:n])
    budget = MAX_BACKWARD_READS * n
    for _ in range(MAX_ROUNDS):
        if not len(rest) or budget < len(rest):
            break
        budget -= len(rest)
        left = []
        for s in range(0, len(rest), CHUNK):  # marks a chunk finds count for the next ones
            part = rest[s : s + CHUNK]
            hit = to_entry[links[part]].any(axis=1)
            to_entry[part[hit]] = True
            left.append(part[~hit])
        done, rest = len(rest), np.concatenate(left)
        if len(rest) == done:
            break
    return Reach(seen[:n], len(rest) == 0)
