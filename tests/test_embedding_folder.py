"""Reading clip-retrieval's embedding folder (formats/embedding_folder.py) into an EMB_DIR: whatever a folder holds,
`clip-hpc index` on it ends in an index or one line naming the file. No model; about 2 s."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clip_hpc.errors import UserError
from clip_hpc.formats.embedding_folder import emb_file, import_embedding_folder

pytest.importorskip("pyarrow")


def _unit_rows(n: int, dim: int) -> np.ndarray:
    rows = np.random.default_rng(n * dim).normal(size=(n, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16)


def test_files_of_different_widths_are_one_line_naming_the_file(tmp_path):
    """img_emb_1.npy of 16-d vectors after a 32-d img_emb_0.npy: numpy's concatenate raised a traceback."""
    folder = tmp_path / "folder"
    emb_file(folder, 0).parent.mkdir(parents=True)
    np.save(emb_file(folder, 0), _unit_rows(5, 32))
    np.save(emb_file(folder, 1), _unit_rows(5, 16))
    with pytest.raises(UserError, match=r"img_emb_1\.npy: 16-d vectors, but img_emb_0\.npy holds 32-d ones"):
        import_embedding_folder(folder, tmp_path / "emb", model="m", pretrained="p")
