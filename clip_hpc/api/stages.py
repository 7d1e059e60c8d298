"""The pipeline's stages as functions, the same entries `clip-hpc embed` and `clip-hpc index` call."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clip_hpc.ingest.embed import EmbedSummary


def embed(inputs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], **options: Any) -> EmbedSummary:
    """Embed images (files, directories, WebDataset tars, URLs) into an EMB_DIR, resumably: `clip-hpc embed`.
    `options` are `EmbedConfig`'s fields (model, pretrained, batch_size, workers, shard_size, device, ...).
    In one process this is one rank; under mpiexec each rank calls it and they share the work."""
    from clip_hpc.ingest.embed import EmbedConfig
    from clip_hpc.ingest.embed import embed as run_embed

    return run_embed(EmbedConfig(inputs=[os.fspath(i) for i in inputs], out=os.fspath(out), **options))
