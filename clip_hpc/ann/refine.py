"""The bound on --refine-factor, which building and searching share (the ann layer: neither wing imports the other)."""

from __future__ import annotations

from clip_hpc.errors import UserError

MAX_REFINE_FACTOR = 10_000  # twice the self-check's widest (5,000): past it a re-rank reads more rows than it saves


def check_refine_factor(refine_factor: int | None) -> None:
    """A --refine-factor outside 1..MAX_REFINE_FACTOR is a one-line error, before any work or memory is spent."""
    if refine_factor is not None and not 1 <= refine_factor <= MAX_REFINE_FACTOR:
        raise UserError(f"--refine-factor must be between 1 and {MAX_REFINE_FACTOR:,}, not {refine_factor}")
