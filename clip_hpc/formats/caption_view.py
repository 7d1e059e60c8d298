"""An EMB_DIR seen through its caption embeddings: what `clip-hpc index --vectors captions` builds from.

The index build reads shards, counts and ids through `EmbDir`; this view answers the same calls with each shard's
caption embeddings in place of its image embeddings and only the rows that have a caption, so the build (train,
add, self-check, metadata) is the image build, unchanged, and ids stay the image ids.
"""

from __future__ import annotations

import os

import numpy as np

from clip_hpc.errors import UserError
from clip_hpc.formats.emb_dir import EmbDir, EmbSummary
from clip_hpc.formats.shard import Shard, ShardError, read_shard

VECTORS = ("images", "captions")  # what an index may be built over (`index.json` "vectors")


class CaptionVectors(EmbDir):
    """`EmbDir` whose shards hold the caption embeddings of the captioned rows (ids and metadata of those rows)."""

    @staticmethod
    def rows_of(shard: Shard) -> int:
        return int(shard.caption_embedded.sum())

    def read_shard(self, unit: int, *, with_embeddings: bool = True) -> Shard:
        shard = super().read_shard(unit, with_embeddings=with_embeddings)
        if not shard.has_captions:
            raise ShardError(
                f"{self.shard_path(unit)}: embedded without --captions; re-run clip-hpc embed with "
                "--captions (it redoes only such units) before indexing --vectors captions"
            )
        shard.select(shard.caption_embedded.copy())
        if with_embeddings and shard.caption_embeddings is not None:  # it is: `has_captions`
            shard.embeddings = shard.caption_embeddings
        return shard

    def shard_ids(self, unit: int) -> np.ndarray:
        shard = read_shard(self.shard_path(unit), with_embeddings=False)
        return shard.ids[shard.caption_embedded]

    def check_set(self) -> EmbSummary:
        """The image set's checks, plus: every shard carries caption embeddings, and at least one row has one."""
        summary = super().check_set()
        for entry in summary.shards:
            self.read_shard(entry.unit, with_embeddings=False)  # raises for a shard embedded without --captions
        if not summary.n_captioned:
            raise UserError(f"{self.root}: no image has a caption, so there is no caption to index")
        return summary


def emb_view(root: str | os.PathLike, vectors: str = "images") -> EmbDir:
    """The EMB_DIR at `root` as the index build reads it for `vectors` (one of `VECTORS`)."""
    if vectors not in VECTORS:
        raise UserError(f"--vectors {vectors!r} is not known; use one of {', '.join(VECTORS)}")
    return CaptionVectors(root) if vectors == "captions" else EmbDir(root)
