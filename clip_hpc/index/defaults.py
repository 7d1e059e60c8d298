"""Index-building defaults that the CLI help quotes: here, not in index.py, so `clip-hpc --help` (and every
laptop-side command that builds the parser) does not import faiss or h5py to print them."""

from __future__ import annotations

TRAIN_PER_LIST = 30  # training vectors per inverted list (the contract allows 30 to 256)
TRAIN_PER_LIST_MAX = 256
TRAIN_SAMPLE_TARGET = 65_536  # small indexes train on up to this many, for the PQ codebooks


def train_size_help() -> str:
    return (
        f"training sample size (default {TRAIN_PER_LIST} x lists, raised towards {TRAIN_SAMPLE_TARGET:,} "
        f"for the PQ codebooks but at most {TRAIN_PER_LIST_MAX} x lists)"
    )
