"""`clip-hpc embed --captions` end to end with the shipped demo model on captioned sample tars in which half of the
captions were swapped between images: the stored similarity tells true pairs from swapped ones (ROC AUC printed),
caption-less rows are marked (not faked), `info` counts them, a re-run redoes only units without caption
embeddings, and the embedding-reader export is read by the real embedding_reader and autofaiss. About 30 s."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from caption_fixtures import DEMO, NO_CAPTION, N, stored
from clip_hpc.formats.emb_dir import EmbDir
from clip_hpc.formats.shard import ShardBatch, read_shard
from clip_hpc.ingest.captions import similarity_auc
from conftest import run_cli


def test_similarity_separates_true_pairs_from_swapped_ones(swapped):
    own = swapped.own
    ids, image, text, similarity = stored(swapped.emb)
    assert ids.tolist() == list(range(N))
    has = np.isfinite(similarity)
    assert has.sum() == N - len(NO_CAPTION) and (~own).sum() == N // 2
    auc = similarity_auc(similarity[has], own[has])
    print(
        f"\nimage-caption similarity, {int(own[has].sum())} true vs {int((~own).sum())} swapped pairs: "
        f"ROC AUC {auc:.4f}; mean {similarity[has & own].mean():.3f} vs {similarity[~own].mean():.3f}"
    )
    assert auc >= 0.95
    # the stored similarity is the cosine of the stored vectors (float16 rounding aside)
    cos = np.einsum("ij,ij->i", image[has].astype(np.float32), text[has].astype(np.float32))
    assert np.allclose(cos, similarity[has], atol=0.01)
    # and the caption vectors are the model's own text encoding (its exact short-context encoder)
    from clip_hpc.model.loading import load_model

    loaded = load_model("clip-hpc-demo", device="cpu")
    rows = [0, 3, 40, 79]
    expected = loaded.encode_text([swapped.captions[i] for i in rows])
    assert np.abs(text[rows].astype(np.float32) - expected).max() < 2e-3, loaded.text_context.describe()


def test_rows_without_a_caption_are_marked_not_faked(swapped):
    root, captions = swapped.root, swapped.captions
    ids, _, text, similarity = stored(root / "emb")
    shard = read_shard(EmbDir(root / "emb").shard_path(0))
    assert shard.has_captions and not shard.caption_embedded[NO_CAPTION[0]] and shard.captions[NO_CAPTION[0]] == ""
    for i in NO_CAPTION:
        assert np.isnan(similarity[i]) and not np.any(text[i])  # no vector made up for a missing caption
    norms = np.linalg.norm(np.delete(text, NO_CAPTION, axis=0).astype(np.float32), axis=1)
    assert np.allclose(norms, 1, atol=0.01)
    info = json.loads(run_cli("info", root / "emb", "--json", check=True).stdout)
    assert (info["n_embedded"], info["n_captioned"]) == (N, N - len(NO_CAPTION))
    assert EmbDir(root / "emb").load_manifest().n_captioned == N - len(NO_CAPTION)
    assert captions[3] == shard.captions[3]  # the caption embedded is the one the tar holds (swapped or not)


def test_rerun_with_captions_redoes_only_units_without_them(swapped, tmp_path):
    """A shard written without --captions (or before them) still reads, counts 0 captioned rows, and is the only
    unit a re-run with --captions redoes; a re-run without --captions keeps every unit."""
    root = swapped.root
    emb = EmbDir(tmp_path / "emb")
    shutil.copytree(root / "emb", emb.root)
    old = read_shard(emb.shard_path(1))
    emb.write_shard(
        1,
        ShardBatch(
            embeddings=old.embeddings,
            ids=old.ids,
            paths=old.paths,
            captions=old.captions,
            meta=old.meta,
            offsets=old.offsets,
            sizes=old.sizes,
            attrs=old.attrs,
        ),
    )  # no caption datasets
    plain = read_shard(emb.shard_path(1))
    assert not plain.has_captions and not plain.caption_embedded.any() and np.isnan(plain.similarity).all()
    assert json.loads(run_cli("info", emb.root, "--json", check=True).stdout)["n_captioned"] == N - 30 - len(
        NO_CAPTION
    )  # 5 and 61: units 0, 2

    proc = run_cli("embed", root / "tars", "--out", emb.root, *DEMO, check=True)
    assert "rank 0 has 0 of its 3 units to do" in proc.stderr
    bad = run_cli("export", emb.root, "--out", tmp_path / "mixed")
    assert bad.returncode == 2 and "--captions" in bad.stderr and not (tmp_path / "mixed").exists()

    proc = run_cli("embed", root / "tars", "--out", emb.root, *DEMO, "--captions", check=True)
    assert "rank 0 has 1 of its 3 units to do" in proc.stderr
    redone = read_shard(emb.shard_path(1))
    first = read_shard(EmbDir(root / "emb").shard_path(1))
    assert np.allclose(redone.similarity, first.similarity, atol=1e-3, equal_nan=True)
    assert EmbDir(emb.root).load_manifest().n_captioned == N - len(NO_CAPTION)


def test_export_text_emb_read_by_embedding_reader_and_autofaiss(swapped):
    EmbeddingReader = pytest.importorskip("embedding_reader").EmbeddingReader
    build_index = pytest.importorskip("autofaiss").build_index
    pd = pytest.importorskip("pandas")
    root = swapped.root
    ids, image, text, similarity = stored(root / "emb")
    out = root / "er"
    run_cli("export", root / "emb", "--format", "embedding-reader", "--out", out, check=True)
    assert sorted(p.name for p in (out / "text_emb").iterdir()) == [f"text_emb_{n}.npy" for n in range(3)]

    def read(kind: str) -> tuple[np.ndarray, pd.DataFrame]:
        reader = EmbeddingReader(
            str(out / kind),
            metadata_folder=str(out / "metadata"),
            file_format="parquet_npy",
            meta_columns=["id", "caption", "similarity"],
        )
        got = list(reader(batch_size=25, start=0, end=reader.count, parallel_pieces=1, show_progress=False))
        return np.concatenate([b for b, _ in got]), pd.concat([m for _, m in got])

    img_rows, img_meta = read("img_emb")
    text_rows, text_meta = read("text_emb")
    assert len(img_rows) == len(text_rows) == N  # row for row
    assert np.array_equal(img_rows, image.astype(np.float32)) and np.array_equal(text_rows, text.astype(np.float32))
    assert text_meta["id"].tolist() == img_meta["id"].tolist() == ids.tolist()
    sims = text_meta["similarity"].to_numpy(dtype=np.float64)
    assert np.isnan(sims[list(NO_CAPTION)]).all()  # null in the parquet
    assert np.allclose(sims, similarity, atol=1e-6, equal_nan=True)

    index, _ = build_index(
        embeddings=str(out / "text_emb"),
        save_on_disk=False,
        max_index_memory_usage="64M",
        current_memory_available="512M",
        verbose=40,
    )
    assert index.ntotal == N
    _, rows = index.search(text[[0, 40, 79]].astype(np.float32), 1)
    assert rows[:, 0].tolist() == [0, 40, 79]


@pytest.mark.mpi
def test_two_ranks_store_the_same_caption_embeddings(swapped, tmp_path):
    """Several ranks: each embeds the captions of its own units; the result is the one-rank result."""
    from test_embed import mpi_embed

    proc = mpi_embed(2, swapped.root / "tars", "--out", tmp_path / "emb", *DEMO, "--captions")
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = stored(swapped.emb), stored(tmp_path / "emb")
    assert np.array_equal(one[0], two[0])
    assert np.allclose(one[3], two[3], atol=2e-3, equal_nan=True)
    assert np.abs(one[2].astype(np.float32) - two[2].astype(np.float32)).max() < 2e-3
