"""Caption embeddings for `clip-hpc embed --captions`: each image's caption through the same model's text tower, in
the same pass, and the image-caption cosine (`similarity`, what LAION's curation filters on).

Rows without a caption get a zero vector and a NaN similarity, which the shard stores as "no caption" (never an
embedding of the empty string, which would look like a real, if poor, caption to every later stage).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from clip_hpc.model.loading import LoadedModel

CAPTION_BATCH = 256  # texts per text-tower call; the packed encoder's cost is its real tokens, not the batch


@dataclass
class CaptionRows:
    """One batch's caption embeddings (zero rows where none), and the cosine with its image (NaN where none)."""

    embeddings: np.ndarray
    similarity: np.ndarray

    @property
    def embedded(self) -> np.ndarray:
        return np.isfinite(self.similarity)


def embed_captions(
    loaded: LoadedModel, captions: Sequence[str], image_embeddings: np.ndarray, batch_size: int = CAPTION_BATCH
) -> CaptionRows:
    """Encode the non-blank `captions` with `loaded.encode_text` (the exact short-context, packed encoder where
    the model allows it: model/text_context.py) in batches; `image_embeddings` (unit rows) give the similarity."""
    image = np.asarray(image_embeddings, dtype=np.float32)
    out = np.zeros(image.shape, dtype=np.float32)
    similarity = np.full(len(captions), np.nan, dtype=np.float32)
    rows = [i for i, text in enumerate(captions) if text and text.strip()]
    for lo in range(0, len(rows), batch_size):
        chunk = rows[lo : lo + batch_size]
        out[chunk] = loaded.encode_text([captions[i] for i in chunk])
    if rows:
        similarity[rows] = np.einsum("ij,ij->i", out[rows], image[rows])
    return CaptionRows(out, similarity)


def similarity_auc(similarity: np.ndarray, is_true_pair: np.ndarray) -> float:
    """ROC AUC of `similarity` telling true pairs from false ones: the chance a random true pair scores above a
    random false one (ties count half), by ranks; numpy only."""
    scores = np.asarray(similarity, dtype=np.float64)
    truth = np.asarray(is_true_pair, dtype=bool)
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks over ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    n_true, n_false = int(truth.sum()), int((~truth).sum())
    if not n_true or not n_false:
        raise ValueError("the AUC needs both true and false pairs")
    return float((ranks[truth].sum() - n_true * (n_true + 1) / 2) / (n_true * n_false))
