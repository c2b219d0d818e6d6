"""Which chromadb generation wrote a palace, told from the palace's own files.

Every chromadb release applies its SQLite migrations on open, so the ``migrations``
table (the highest version per migration dir) names the newest chromadb that opened the
palace, and with it the encodings that chromadb reads and writes. Never the installed
chromadb, and never one column's presence (``schema_str`` only appears in 1.3, yet 1.0
already stores integer seq_ids and dict pickles).

| generation | migrations (sysdb / metadb / embeddings_queue) | max_seq_id | pickle | vector seq |
|---|---|---|---|---|
| 0.4     | <= 4 / <= 3 / 1  | 8-byte big-endian blob | object | in the pickle |
| 0.5-0.6 | 5-9 / 4 / 2      | 8-byte big-endian blob | object | max_seq_id row |
| 1.0-1.2 | 9 / 5 / 2        | integer                | dict   | max_seq_id row |
| 1.3-1.4 | 10 / 5 / 2       | integer                | dict   | max_seq_id row |
| 1.5     | 10 / 6 / 2       | integer                | dict   | max_seq_id row |

A chromadb newer than the palace's generation migrates it on open (after which the
palace's own chromadb may no longer open it), so nothing chaosfix runs may open the
palace itself with chromadb: see ``chaosfix.chromadb_probe``.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field

GENERATIONS = ("0.4", "0.5-0.6", "1.0-1.2", "1.3-1.4", "1.5")
UNKNOWN = "unknown"
NEWER = "newer"  # migrations beyond every generation chaosfix knows


@dataclass
class Generation:
    """The palace's generation and the encodings every value chaosfix writes must use."""

    name: str
    migrations: dict[str, int] = field(default_factory=dict)
    evidence: list[str] = field(default_factory=list)

    @property
    def known(self) -> bool:
        return self.name in GENERATIONS

    @property
    def rank(self) -> int:
        """Order of generations (-1 unknown; NEWER above every known one)."""
        if self.name == NEWER:
            return len(GENERATIONS)
        return GENERATIONS.index(self.name) if self.known else -1

    @property
    def family(self) -> str:
        """'0.6' for the pre-1.0 Python generations, '1.x' for the Rust ones."""
        return "0.6" if self.name in ("0.4", "0.5-0.6") else "1.x"

    @property
    def seq_encoding(self) -> str:
        """How max_seq_id and embeddings.seq_id values are stored: 'blob' or 'int'."""
        return "blob" if self.family == "0.6" else "int"

    @property
    def pickle_format(self) -> str:
        """index_metadata.pickle: a PersistentData 'object' (0.4-0.6) or a plain 'dict' (1.x)."""
        return "object" if self.family == "0.6" else "dict"

    @property
    def vector_seq_in_pickle(self) -> bool:
        """0.4 keeps the vector segment's max_seq_id in the pickle, not in the table."""
        return self.name == "0.4"

    @property
    def keeps_whole_wal(self) -> bool:
        """0.4 never purges its WAL (0.5 began purging below every segment's max_seq_id):
        each record's first write is still there, unless a tool outside chromadb pruned it."""
        return self.name == "0.4"

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "migrations": self.migrations,
            "seq_encoding": self.seq_encoding,
            "pickle_format": self.pickle_format,
            "evidence": self.evidence,
        }


def classify(migrations: dict[str, int]) -> str:
    """Generation name from the highest migration version per dir."""
    sysdb, metadb, queue = (migrations.get(k, 0) for k in ("sysdb", "metadb", "embeddings_queue"))
    if not sysdb or not metadb:
        return UNKNOWN
    if sysdb > 10 or metadb > 6 or queue > 2:
        return NEWER
    if metadb == 6:
        return "1.5"
    if metadb == 5:
        return "1.3-1.4" if sysdb >= 10 else "1.0-1.2"
    if metadb == 4 or sysdb >= 5:
        return "0.5-0.6"
    return "0.4"


def of_version(version: str) -> str:
    """Generation a chromadb release writes, from its version string (for the installed
    chromadb, whose migrations only show once it has opened a palace)."""
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return UNKNOWN
    if major == 0:
        return "0.4" if minor <= 4 else "0.5-0.6"
    if major == 1:
        return "1.0-1.2" if minor <= 2 else "1.3-1.4" if minor <= 4 else "1.5" if minor == 5 else NEWER
    return NEWER


def rank_of(name: str) -> int:
    return Generation(name).rank


def read_migrations(conn: sqlite3.Connection) -> dict[str, int]:
    """dir -> highest applied migration version ({} when the table is missing)."""
    try:
        rows = conn.execute("SELECT dir, max(version) FROM migrations GROUP BY dir").fetchall()
    except sqlite3.Error:
        return {}
    return {str(d): int(v) for d, v in rows if v is not None}


def detect(conn: sqlite3.Connection) -> Generation:
    """Read the palace's generation from its SQLite file, with the evidence for it.

    The migrations table decides; seq encodings and config keys are recorded as evidence
    (a disagreement is noted, e.g. blob seq_ids left in a palace 1.x has migrated)."""
    mig = read_migrations(conn)
    gen = Generation(classify(mig), mig)
    ev = gen.evidence
    ev.append("migrations: " + (", ".join(f"{d} {v}" for d, v in sorted(mig.items())) if mig else "table missing"))
    kinds: dict[str, int] = {}
    try:
        for (kind,) in conn.execute("SELECT typeof(seq_id) FROM max_seq_id"):
            kinds[kind] = kinds.get(kind, 0) + 1
    except sqlite3.Error:
        pass
    if kinds:
        ev.append("max_seq_id: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    if gen.name == UNKNOWN and kinds:
        gen.name = "0.5-0.6" if "blob" in kinds else "1.0-1.2"  # best guess, said as such
        ev.append(f"no usable migrations: generation guessed {gen.name} from the seq encoding")
    elif gen.known and kinds.get("blob" if gen.seq_encoding == "int" else "integer"):
        ev.append(f"some max_seq_id rows are not in {gen.name}'s {gen.seq_encoding} encoding")
    cols = {r[1] for r in conn.execute("PRAGMA table_info(collections)")}
    if "schema_str" in cols:
        ev.append("collections.schema_str present")
    if "config_json_str" in cols:
        keys: set[str] = set()
        for (raw,) in conn.execute("SELECT config_json_str FROM collections"):
            keys |= config_keys(raw)
        if keys:
            ev.append("config_json_str keys: " + ", ".join(sorted(keys)))
    else:
        ev.append("collections.config_json_str absent")
    return gen


def config_keys(raw: str | None) -> set[str]:
    """Top-level keys of a config_json_str (with 'vector_index.hnsw' spelled out)."""
    try:
        cfg = json.loads(raw) if raw else {}
    except ValueError:
        return {"<unparsable>"}
    if not isinstance(cfg, dict):
        return set()
    keys = {k for k in cfg if k != "_type"}
    vi = cfg.get("vector_index")
    if isinstance(vi, dict):
        keys |= {f"vector_index.{k}" for k in vi}
    return keys


def hnsw_config(cfg: dict) -> dict:
    """The HNSW parameters of a collection config in any generation's layout: 0.5-0.6
    ``hnsw_configuration`` (M, ef_construction), 1.0-1.2 ``vector_index.hnsw``
    (max_neighbors, ef_construction), 1.3+ ``hnsw``. Keys normalized to 0.6's metadata
    names (space, M, construction_ef, search_ef)."""
    raw = cfg.get("hnsw") or cfg.get("hnsw_configuration") or (cfg.get("vector_index") or {}).get("hnsw") or {}
    if not isinstance(raw, dict):
        return {}
    alias = {"max_neighbors": "M", "ef_construction": "construction_ef", "ef_search": "search_ef"}
    return {alias.get(k, k): v for k, v in raw.items() if k != "_type"}
