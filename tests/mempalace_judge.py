"""Judge a palace with MemPalace's own API (run as a child: it imports chromadb).

Prints one JSON line: SQL row count, MemPalace's count, ids, and the drawers a search
for their own text did not find in the top 5.
"""

from __future__ import annotations

import json
import sqlite3
import sys


def main(palace: str) -> None:
    from mempalace.backends.chroma import ChromaBackend

    col = ChromaBackend().get_collection(palace, "mempalace_drawers")
    got = col.get(include=["documents"])
    ids, docs = list(got.ids), list(got.documents)
    missed = []
    for s in range(0, len(ids), 50):
        res = col.query(query_texts=docs[s : s + 50], n_results=5, include=[])
        missed += [rid for rid, hits in zip(ids[s : s + 50], res.ids) if rid not in hits]
    conn = sqlite3.connect(f"file:{palace}/chroma.sqlite3?mode=ro", uri=True)
    sql = conn.execute(
        "SELECT count(*) FROM embeddings e JOIN segments s ON s.id = e.segment_id "
        "JOIN collections c ON c.id = s.collection WHERE c.name = 'mempalace_drawers'").fetchone()[0]
    print(json.dumps({"sql": sql, "count": col.count(), "ids": len(ids), "missed": missed}))


if __name__ == "__main__":
    main(sys.argv[1])
