"""Which embedding function re-embeds a palace's rows, proven before it is used.

``resolve`` lists the candidates a palace itself points to (``--embedder``, the
application's own record, the collection's configured function, chromadb's default
model when it is on disk), ``server`` runs chromadb's embedding functions in a child
process (reconcile never imports chromadb), ``guard`` measures whether a candidate
reproduces the vectors the palace still holds, and ``select`` ties them together.
"""
