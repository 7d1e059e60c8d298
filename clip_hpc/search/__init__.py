"""Answering queries over an INDEX_DIR: the pure FAISS/numpy core and the engine that loads a directory."""
