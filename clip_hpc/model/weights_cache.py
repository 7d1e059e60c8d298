"""Where pretrained weights are cached: one answer for `clip-hpc fetch-model` on a login node and for the jobs.

A login shell and a job that each take open_clip's default (HF_HOME, ~/.cache/clip) from their own environment
look in two places; the cluster profile names one directory, CLIP_HPC_WEIGHTS (Perlmutter: under $HOME, which is
never purged, unlike $SCRATCH), and both sides pass it to open_clip. Standard library only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

WEIGHTS_ENV = "CLIP_HPC_WEIGHTS"
OLD_WEIGHTS_ENV = "CLIP_HPC_CACHE_DIR"  # read before CLIP_HPC_WEIGHTS existed; still honoured
URL_CACHE_DEFAULT = "~/.cache/clip"  # where open_clip puts weights fetched by URL when given no directory


def weights_dir(explicit: str | None = None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The cache directory to hand open_clip: `explicit` (--cache-dir), else the profile's CLIP_HPC_WEIGHTS, else
    None (open_clip's defaults: HF_HOME's hub cache for hub weights, ~/.cache/clip for URLs)."""
    found = explicit or environ.get(WEIGHTS_ENV) or environ.get(OLD_WEIGHTS_ENV)
    return os.path.abspath(os.path.expanduser(found)) if found else None


def offline(environ: Mapping[str, str] = os.environ) -> bool:
    """HF_HUB_OFFLINE, as the hub reads it: jobs (the profiles set it there) read the cache and never download."""
    return environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def url_weights_missing(cfg: Mapping[str, str], cache_dir: str | None) -> str | None:
    """For weights open_clip fetches by URL (not from the hub, which checks HF_HUB_OFFLINE itself): the file it
    would download to when that file is not there yet, else None."""
    url = cfg.get("url", "")
    if not url or cfg.get("hf_hub") or cfg.get("file"):
        return None
    target = os.path.join(cache_dir or os.path.expanduser(URL_CACHE_DEFAULT), os.path.basename(url))
    return None if os.path.isfile(target) else target


def where(cache_dir: str | None) -> str:
    """The cache named for a person: the directory, or what open_clip defaults to."""
    return cache_dir or f"the default cache (HF_HOME or ~/.cache/huggingface; {URL_CACHE_DEFAULT} for URLs)"
