"""The queries as vectors, made by the model the vectors were made with: text through its text tower, a query image
decoded as `embed` decodes (same `decode_image`, same minimum size) and through its image tower."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from clip_hpc.errors import UserError


class QueryVectors(NamedTuple):
    positives: np.ndarray  # (P, dim) float32 unit rows: the texts, then the images, in the order given
    negatives: np.ndarray  # (Q, dim) float32


def encode_queries(
    model: str,
    pretrained: str,
    texts: Sequence[str],
    images: Sequence[str],
    negatives: Sequence[str],
    device: str = "auto",
    dim: int | None = None,
) -> QueryVectors:
    """Load the recorded model once and encode everything; a dimension other than the vectors' is refused."""
    import torch

    from clip_hpc.ingest.images import as_query_image
    from clip_hpc.model.loading import load_model

    loaded = load_model(model, pretrained, device)
    parts = []
    if texts:
        parts.append(loaded.encode_text(list(texts)))
    if images:
        pixels = [loaded.preprocess(as_query_image(path, min_size=loaded.image_size)) for path in images]
        parts.append(loaded.encode_images(torch.stack(pixels)))
    positives = np.concatenate(parts).astype(np.float32)
    negative_rows = (
        loaded.encode_text(list(negatives)).astype(np.float32) if negatives else np.zeros((0, loaded.dim), np.float32)
    )
    if dim is not None and positives.shape[1] != dim:
        raise UserError(f"model {model} gives {positives.shape[1]}-dim queries, the vectors have {dim}")
    return QueryVectors(positives, negative_rows)
