"""Using a model: embeddings of image folders and texts, FAISS indexes and search, the HTTP API
and its web page."""
