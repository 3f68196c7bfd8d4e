"""Offline retrieval jobs: embedding runs (embed), FAISS indexes and search (index), zero-shot
classification (classify). The HTTP app that serves them is `flava.serve`."""
