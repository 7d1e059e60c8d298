"""`clip-hpc info` (info.py) on directories half made or damaged: what it reports must not call them complete.
No model; about 1 s."""

from __future__ import annotations

import numpy as np

from clip_hpc.formats.emb_dir import EmbDir
from clip_hpc.formats.shard import ShardBatch
from clip_hpc.info import describe


def test_an_emb_dir_that_lost_its_inputs_list_is_not_complete(tmp_path):
    """Shards holding 4 embeddings and no inputs.txt (deleted, or a copy that left it out): info said complete,
    0 inputs, 0 embedded, while index and export refuse the directory for that very file."""
    emb = EmbDir(tmp_path / "emb")
    emb.write_inputs([f"/img/{i}.jpg" for i in range(4)])
    emb.write_shard(
        0,
        ShardBatch(
            embeddings=np.eye(4, 8, dtype=np.float16),
            ids=range(4),
            paths=[f"/img/{i}.jpg" for i in range(4)],
            attrs={"model": "clip-hpc-tiny", "pretrained": "none", "unit_size": 4},
        ),
    )
    assert describe(emb.root)["complete"] and describe(emb.root)["n_embedded"] == 4
    emb.inputs_path.unlink()
    info = describe(emb.root)
    assert not info["complete"] and info["shards"] == 1
    assert "inputs.txt is missing or empty" in info["note"]
