"""Index-building defaults that the CLI help quotes: here, not in index.py, so `clip-hpc --help` (and every
laptop-side command that builds the parser) does not import faiss or h5py to print them."""

from __future__ import annotations

from clip_hpc.errors import UserError

TRAIN_PER_LIST = 30  # training vectors per inverted list (the contract allows 30 to 256)
TRAIN_PER_LIST_MAX = 256
TRAIN_SAMPLE_TARGET = 65_536  # small indexes train on up to this many, for the PQ codebooks
MAX_REFINE_FACTOR = 10_000  # twice the self-check's widest (5,000): past it a re-rank reads more rows than it saves


def check_refine_factor(refine_factor: int | None) -> None:
    """A --refine-factor outside 1..MAX_REFINE_FACTOR is a one-line error, before any work or memory is spent."""
    if refine_factor is not None and not 1 <= refine_factor <= MAX_REFINE_FACTOR:
        raise UserError(f"--refine-factor must be between 1 and {MAX_REFINE_FACTOR:,}, not {refine_factor}")


def train_size_help() -> str:
    return (
        f"training sample size (default {TRAIN_PER_LIST} x lists, raised towards {TRAIN_SAMPLE_TARGET:,} "
        f"for the PQ codebooks but at most {TRAIN_PER_LIST_MAX} x lists)"
    )
