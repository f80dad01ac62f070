"""Compiled hot paths of hypercache (Cython). See each module's ``.pyi`` for its API."""
