"""Edits of ``index_metadata.pickle`` (the id <-> label map), written in the map's own format.

Reading goes through ``chaosfix.palace.idmap.loads`` (the restricted unpickler), never
plain ``pickle.load``; writing goes through ``idmap.dumps``, so a 0.6 object pickle stays
an object pickle and a 1.x dict stays a dict. Every function accepts the pickle file, its
segment folder or the palace folder.
"""

from __future__ import annotations

import io
from pathlib import Path

from chaosfix.faults.locate import pickle_path
from chaosfix.palace import idmap


def _load(path: str | Path) -> tuple[Path, idmap.IdMap]:
    p = pickle_path(path)
    return p, idmap.loads(p.read_bytes())


def _save(p: Path, m: idmap.IdMap) -> None:
    # in place (truncate + write), as chromadb does
    with open(p, "wb") as f:
        f.write(idmap.dumps(m))


def off_by_one(path: str | Path) -> int:
    """Set ``total_elements_added`` to (max label - 1): the next add reuses a live label.

    Returns the new ``total_elements_added``.
    """
    p, m = _load(path)
    if not m.label_to_id:
        raise ValueError(f"{p}: empty map, nothing to be off by one from")
    m.total_elements_added = m.max_label - 1
    _save(p, m)
    return m.total_elements_added


def drop_map_entry(path: str | Path, which: str = "both", id: str | None = None) -> tuple[str, int]:  # noqa: A002
    """Remove one id's entry from ``id_to_label``, ``label_to_id`` or both.

    ``id`` defaults to the id holding the smallest label. Returns ``(id, label)``.
    - ``both``: the label stays live in the index but no map side knows it.
    - ``id_to_label`` / ``label_to_id``: the two maps stop being inverse.
    """
    if which not in ("both", "id_to_label", "label_to_id"):
        raise ValueError(f"which must be both, id_to_label or label_to_id, not {which!r}")
    p, m = _load(path)
    if id is None:
        if not m.label_to_id:
            raise ValueError(f"{p}: empty map")
        label = min(m.label_to_id)
        id = m.label_to_id[label]
    label = m.id_to_label[id]
    if which in ("both", "id_to_label"):
        del m.id_to_label[id]
        m.id_to_seq_id.pop(id, None)
    if which in ("both", "label_to_id"):
        del m.label_to_id[label]
    _save(p, m)
    return id, label


def dimensionality_none(path: str | Path) -> int | None:
    """Set ``dimensionality`` to None (as 1.x writes it; 0.6 then treats the index as absent).

    Returns the previous value.
    """
    p, m = _load(path)
    old = m.dimensionality
    m.dimensionality = None
    _save(p, m)
    return old


class _OpenOnUnpickle:
    """Pickles as ``io.open(marker, "w")``: plain unpickling creates ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (io.open, (self.marker, "w"))


def hostile_payload(path: str | Path, marker_file: str | Path) -> Path:
    """Rewrite the pickle as a hostile one: the real map plus a payload.

    The result still loads as a plausible map with plain ``pickle.load`` (as chromadb 0.6.3
    does), and loading it calls ``io.open(marker_file, "w")``, creating the marker: proof
    that the unpickler ran foreign code. The restricted unpickler refuses the global.
    Returns the pickle's path.
    """
    p, m = _load(path)
    m.extra["__reduce_payload__"] = _OpenOnUnpickle(str(Path(marker_file).resolve()))
    _save(p, m)
    return p
