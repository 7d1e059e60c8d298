"""Subsets of an EMB_DIR: `clip-hpc dedup` (semantic near-duplicates, dedup*.py)."""
