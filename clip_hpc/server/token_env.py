"""The environment variable that carries the server's token (serve reads it, `search --url` falls back on it):
here, not in server/auth.py, so the laptop-side CLI names it without importing FastAPI."""

from __future__ import annotations

TOKEN_ENV = "CLIP_HPC_TOKEN"
