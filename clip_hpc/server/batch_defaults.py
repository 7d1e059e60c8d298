"""Micro-batching defaults that `clip-hpc serve --help` quotes: here, not in server/micro_batch.py, so building the
parser (also for laptop-side commands) imports no numpy."""

from __future__ import annotations

BATCH_WINDOW_MS = 10.0  # long enough for 8 kept-alive clients to send their next query (measured: 5 ms split them)
MAX_BATCH = 32
