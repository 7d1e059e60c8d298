"""Reading clip-retrieval's embedding folder (formats/embedding_folder.py) into an EMB_DIR: whatever a folder holds,
`clip-hpc index` on it ends in an index or one line naming the file. No model; about 2 s."""

from __future__ import annotations

import numpy as np
import pytest

from clip_hpc.errors import UserError
from clip_hpc.formats.embedding_folder import emb_file, import_embedding_folder
from clip_hpc.formats.shard import ShardBatch

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


def test_text_emb_of_an_export_is_read_so_a_caption_index_builds_from_it(tmp_path):
    """Our export (and clip-retrieval's) holds text_emb/ row for row; the import dropped it, so `clip-hpc index
    FOLDER --vectors captions` told the user to re-run embed --captions on a temporary directory already gone."""
    from clip_hpc.formats.emb_dir import EmbDir
    from clip_hpc.formats.index_dir import IndexDir
    from conftest import run_cli

    emb, n = EmbDir(tmp_path / "emb"), 12
    emb.write_inputs([f"/img/{i}.jpg" for i in range(n)])
    image, text = _unit_rows(n, 32), _unit_rows(n + 1, 32)[:n]
    captioned = np.arange(n) % 3 != 0  # ids 0, 3, 6, 9 have no caption: zero rows, null similarity
    text[~captioned] = 0
    similarity = np.where(captioned, np.einsum("ij,ij->i", image, text, dtype=np.float32), np.nan)
    for unit in (0, 1):
        rows = slice(6 * unit, 6 * unit + 6)
        emb.write_shard(
            unit,
            ShardBatch(
                embeddings=image[rows],
                ids=range(n)[rows],
                paths=[f"/img/{i}.jpg" for i in range(n)][rows],
                captions=[f"caption {i}" if captioned[i] else "" for i in range(n)][rows],
                caption_embeddings=text[rows],
                similarity=similarity[rows],
                attrs={"model": "clip-hpc-tiny", "pretrained": "none", "unit_size": 6},
            ),
        )
    assert emb.write_manifest(2, 6) is not None
    run_cli("export", emb.root, "--out", tmp_path / "er", check=True)
    run_cli(
        "index",
        tmp_path / "er",
        "--out",
        tmp_path / "idx",
        "--vectors",
        "captions",
        "--model",
        "clip-hpc-tiny",
        "--pretrained",
        "none",
        "--quiet",
        check=True,
    )
    index_dir = IndexDir(tmp_path / "idx")
    assert index_dir.load_info().n == int(captioned.sum())
    with index_dir.open_metadata() as meta:
        assert meta.all_ids() == np.flatnonzero(captioned).tolist()
        assert meta.captions_of([1]) == {1: "caption 1"}
        some = meta.all_ids()[:5] + [10**9]  # and one id no row has
        assert meta.paths_and_captions(some) == (meta.paths_of(some), meta.captions_of(some))  # one query, the same
        assert abs(meta.similarities_of([1])[1] - similarity[1]) < 1e-3
    vectors = np.asarray(index_dir.open_vectors(), np.float32)
    assert np.array_equal(vectors[captioned], text[captioned].astype(np.float32))


@pytest.mark.parametrize(
    "rows, problem",
    [
        (np.full((4, 32), np.nan, np.float16), "hold NaN or infinite values"),
        (np.ones((4, 32), np.float32), "are not unit length"),
        (np.zeros((4, 32), np.float16), "are not unit length"),
    ],
)
def test_vectors_an_index_cannot_take_are_named_by_their_npy_file(tmp_path, rows, problem):
    """The check ran on the imported shard: its message named a temporary shard already removed and said to
    re-run clip-hpc embed, which never made these vectors."""
    folder = tmp_path / "folder"
    emb_file(folder, 0).parent.mkdir(parents=True)
    np.save(emb_file(folder, 0), _unit_rows(4, 32))
    np.save(emb_file(folder, 1), rows)
    with pytest.raises(UserError, match=rf"^{folder}/img_emb/img_emb_1\.npy: 4 embeddings {problem}.*L2-normalised"):
        import_embedding_folder(folder, tmp_path / "emb", model="m", pretrained="p")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"not an npy file", r"img_emb_0\.npy: not a \.npy array"),
        (np.array([[1.0, 0.0]], dtype=object), r"img_emb_0\.npy: not a \.npy array"),
        (
            np.array([[1.0, 0.0]], dtype=np.complex64),
            r"img_emb_0\.npy: expected floating-point vectors, found complex64",
        ),
        (np.array([[1, 0]], dtype=np.int64), r"img_emb_0\.npy: expected floating-point vectors, found int64"),
    ],
)
def test_a_file_that_is_not_an_array_of_floats_is_one_line(tmp_path, content, message):
    """Random bytes and an object array were numpy tracebacks; complex vectors were indexed by their real part."""
    folder = tmp_path / "folder"
    emb_file(folder, 0).parent.mkdir(parents=True)
    if isinstance(content, bytes):
        emb_file(folder, 0).write_bytes(content)
    else:
        np.save(emb_file(folder, 0), content, allow_pickle=True)
    with pytest.raises(UserError, match=message):
        import_embedding_folder(folder, tmp_path / "emb", model="m", pretrained="p")


def test_a_parquet_file_that_does_not_read_is_one_line(tmp_path):
    """A cut or foreign metadata_0.parquet was a pyarrow.lib.ArrowInvalid traceback."""
    from clip_hpc.formats.embedding_folder import metadata_file

    folder = tmp_path / "folder"
    emb_file(folder, 0).parent.mkdir(parents=True)
    np.save(emb_file(folder, 0), _unit_rows(4, 32))
    metadata_file(folder, 0).parent.mkdir(parents=True)
    metadata_file(folder, 0).write_bytes(b"PAR1 cut short")
    with pytest.raises(UserError, match=r"metadata_0\.parquet: not a readable parquet file \(.*magic bytes"):
        import_embedding_folder(folder, tmp_path / "emb", model="m", pretrained="p")
