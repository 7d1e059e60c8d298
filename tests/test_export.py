"""`clip-hpc export --format embedding-reader` read back by the real embedding_reader and autofaiss, `clip-hpc index`
on such a folder, and shards / meta.sqlite written before captions still read. About 10 s, no model."""

import json
import sqlite3

import h5py
import numpy as np
import pytest

from clip_hpc.formats.emb_dir import EmbDir
from clip_hpc.formats.index_dir import IndexDir
from clip_hpc.formats.metadata import MetadataStore
from clip_hpc.formats.shard import ShardBatch
from conftest import run_cli

pytest.importorskip("pyarrow")
DIM = 32


@pytest.fixture(scope="module")
def captioned_emb_dir(tmp_path_factory):
    """Units of 40 ids: unit 1 has failures, unit 2 failed whole (no file pair for it), 150 inputs in all."""
    root = tmp_path_factory.mktemp("export")
    emb = EmbDir(root / "emb")
    rng = np.random.default_rng(0)
    n, size = 150, 40
    emb.write_inputs([f"/data/{i:05d}.tar::{i:09d}.jpg" for i in range(n)])
    kept = []
    for unit, lo in enumerate(range(0, n, size)):
        ids = [i for i in range(lo, min(lo + size, n)) if not (unit == 1 and i % 7 == 0) and unit != 2]
        failed = sorted(set(range(lo, min(lo + size, n))) - set(ids))
        vectors = rng.normal(size=(len(ids), DIM))
        vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)  # as embed writes
        emb.write_shard(
            unit,
            ShardBatch(
                embeddings=vectors,
                ids=ids,
                paths=[f"/data/x::{i}.jpg" for i in ids],
                captions=[f"caption {i}" for i in ids],
                meta=[json.dumps({"key": f"{i:09d}", "url": f"https://e/{i}"}) for i in ids],
                offsets=[512 * i for i in ids],
                sizes=[100] * len(ids),
                failed_ids=failed,
                failed_paths=[str(i) for i in failed],
                failed_reasons=["not an image"] * len(failed),
                attrs={"model": "clip-hpc-tiny", "pretrained": "none", "unit_size": size, "dtype": "float16"},
            ),
        )
        kept.append((np.asarray(ids, dtype=np.int64), vectors))
    assert emb.write_manifest(-(-n // size), size) is not None
    ids = np.concatenate([k[0] for k in kept])
    return root, ids, np.concatenate([k[1] for k in kept])


def test_embedding_reader_reads_our_export_and_autofaiss_indexes_it(captioned_emb_dir):
    EmbeddingReader = pytest.importorskip("embedding_reader").EmbeddingReader
    build_index = pytest.importorskip("autofaiss").build_index
    root, ids, vectors = captioned_emb_dir
    out = root / "er"
    proc = run_cli("export", root / "emb", "--format", "embedding-reader", "--out", out, check=True)
    assert f"{len(ids)} embeddings" in proc.stdout
    assert sorted(p.name for p in (out / "img_emb").iterdir()) == [f"img_emb_{n}.npy" for n in range(3)]
    reader = EmbeddingReader(
        str(out / "img_emb"),
        metadata_folder=str(out / "metadata"),
        file_format="parquet_npy",
        meta_columns=["image_path", "caption", "url", "key", "id"],
    )
    assert (reader.count, reader.dimension) == (len(ids), DIM)
    got, meta = [], []
    for batch, batch_meta in reader(batch_size=17, start=0, end=reader.count, parallel_pieces=1, show_progress=False):
        got.append(batch)
        meta.append(batch_meta)
    frame = __import__("pandas").concat(meta)
    assert np.array_equal(np.concatenate(got), vectors.astype(np.float32))
    assert frame["id"].tolist() == ids.tolist()
    assert frame["caption"].tolist() == [f"caption {i}" for i in ids]
    assert frame["key"].tolist() == [f"{i:09d}" for i in ids] and frame["url"].iloc[0] == f"https://e/{ids[0]}"

    index, _ = build_index(
        embeddings=str(out / "img_emb"),
        save_on_disk=False,
        max_index_memory_usage="64M",
        current_memory_available="512M",
        verbose=40,
    )
    assert index.ntotal == len(ids)
    _, rows = index.search(vectors[:5].astype(np.float32), 1)
    assert rows[:, 0].tolist() == list(range(5))  # row i of the export is the i-th embedded id

    again = run_cli("export", root / "emb", "--out", out)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_index_builds_from_an_embedding_reader_folder(captioned_emb_dir):
    root, ids, vectors = captioned_emb_dir
    if not (root / "er").exists():
        run_cli("export", root / "emb", "--out", root / "er", check=True)
    run_cli(
        "index",
        root / "er",
        "--out",
        root / "idx",
        "--model",
        "clip-hpc-tiny",
        "--pretrained",
        "none",
        "--quiet",
        check=True,
    )
    index_dir = IndexDir(root / "idx")
    assert index_dir.load_info().model == "clip-hpc-tiny"
    assert np.array_equal(np.asarray(index_dir.open_vectors()[: len(ids)], np.float32), vectors.astype(np.float32))
    with index_dir.open_metadata() as meta:
        assert meta.captions_of([0, len(ids) - 1]) == {0: f"caption {ids[0]}", len(ids) - 1: f"caption {ids[-1]}"}
        assert meta.full_record(3)["key"] == f"{ids[3]:09d}"


def test_shards_and_metadata_from_before_captions_still_read(tmp_path):
    emb = EmbDir(tmp_path / "emb")
    emb.write_shard(
        0,
        ShardBatch(
            embeddings=np.eye(2, 4, dtype=np.float16), ids=[0, 1], paths=["/a.jpg", "/b.jpg"], attrs={"unit_size": 2}
        ),
    )
    with h5py.File(emb.shard_path(0), "a") as f:
        for name in ("captions", "meta", "offsets", "sizes"):
            del f[name]
    shard = emb.read_shard(0)
    assert shard.captions == ["", ""] and shard.offsets.tolist() == [-1, -1]
    old = tmp_path / "meta.sqlite"
    with sqlite3.connect(old) as conn:
        conn.executescript(
            "CREATE TABLE images (id INTEGER PRIMARY KEY, path TEXT NOT NULL, size INTEGER, mtime REAL);"
            "INSERT INTO images VALUES (0, '/a.jpg', NULL, NULL);"
        )
    reader = MetadataStore(old, readonly=True)
    assert reader.captions_of([0]) == {} and reader.full_record(0)["caption"] is None
    reader.close()
    with MetadataStore(old) as writer:  # index --update copies an old store: it gains the columns
        writer.add([1], ["/t.tar::b.jpg"], [10], captions=["a cat"], offsets=[512])
        assert writer.captions_of([0, 1]) == {1: "a cat"} and writer.ids_matching(caption="cat") == [1]


def test_export_reads_only_the_units_the_checked_set_holds(tmp_path):
    """A shard file outside the unit plan (left by a run with another --shard-size: unit 3 of units of 2 holds ids
    6 and 7 of a 6-input set cut in 3s) was exported beside the real ones: ids twice, more rows than inputs."""
    emb = EmbDir(tmp_path / "emb")
    emb.write_inputs([f"/img/{i}.jpg" for i in range(6)])
    vectors = np.eye(DIM, dtype=np.float16)
    for unit, size, ids in ((0, 3, [0, 1, 2]), (1, 3, [3, 4, 5]), (3, 2, [6, 7])):
        emb.write_shard(
            unit,
            ShardBatch(
                embeddings=vectors[: len(ids)],
                ids=ids,
                paths=[f"/img/{i}.jpg" for i in ids],
                attrs={"model": "clip-hpc-tiny", "pretrained": "none", "unit_size": size},
            ),
        )
    proc = run_cli("export", tmp_path / "emb", "--format", "embedding-reader", "--out", tmp_path / "er")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "er" / "img_emb").iterdir()) == ["img_emb_0.npy", "img_emb_1.npy"]


def test_export_of_an_emb_dir_where_nothing_was_embedded_is_refused(tmp_path):
    """Every image failed: the export was an empty img_emb/ that embedding_reader refuses ("No embeddings found"),
    with exit 0 and nothing said."""
    emb = EmbDir(tmp_path / "emb")
    emb.write_inputs(["/img/0.jpg", "/img/1.jpg"])
    emb.write_shard(
        0,
        ShardBatch(
            embeddings=np.zeros((0, DIM), np.float16),
            ids=[],
            paths=[],
            failed_ids=[0, 1],
            failed_paths=["/img/0.jpg", "/img/1.jpg"],
            failed_reasons=["not an image"] * 2,
            attrs={"model": "clip-hpc-tiny", "pretrained": "none", "unit_size": 2},
        ),
    )
    assert emb.write_manifest(1, 2) is not None
    proc = run_cli("export", emb.root, "--out", tmp_path / "er")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "no embedded images" in proc.stderr and not (tmp_path / "er").exists()


def test_index_of_a_folder_records_the_models_own_weights_when_none_are_named(tmp_path):
    """`clip-hpc index FOLDER --model clip-hpc-demo` recorded laion2b_s34b_b79k (ViT-B-32's tag) as its weights, so
    every text search of the index failed ("neither a file nor a pretrained tag of clip-hpc-demo")."""
    from clip_hpc.formats.embedding_folder import emb_file

    rows = np.random.default_rng(1).normal(size=(20, 128))
    emb_file(tmp_path / "er", 0).parent.mkdir(parents=True)
    np.save(emb_file(tmp_path / "er", 0), (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16))
    run_cli("index", tmp_path / "er", "--out", tmp_path / "idx", "--model", "clip-hpc-demo", "--quiet", check=True)
    assert IndexDir(tmp_path / "idx").load_info().pretrained.endswith("clip-hpc-demo.safetensors")
    proc = run_cli("search", tmp_path / "idx", "a red circle", "-k", "3", "--json")
    assert proc.returncode == 0 and len(json.loads(proc.stdout)["results"]) == 3, proc.stderr


def test_export_writes_one_dtype_when_shards_hold_two(tmp_path):
    """Shards of float32 and float16 (an imported folder whose files differ, or shards merged by hand): the export
    wrote each file in its shard's dtype, and embedding_reader, which sizes every file by the first one's, failed
    ("failed reading file img_emb_1.npy")."""
    from embedding_reader import EmbeddingReader

    emb = EmbDir(tmp_path / "emb")
    emb.write_inputs([f"/img/{i}.jpg" for i in range(8)])
    rows = np.random.default_rng(2).normal(size=(8, DIM))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    for unit, dtype in ((0, "float32"), (1, "float16")):
        emb.write_shard(
            unit,
            ShardBatch(
                embeddings=rows[4 * unit : 4 * unit + 4].astype(dtype),
                ids=range(4 * unit, 4 * unit + 4),
                paths=[f"/img/{i}.jpg" for i in range(4 * unit, 4 * unit + 4)],
                attrs={"model": "clip-hpc-tiny", "pretrained": "none", "unit_size": 4, "dtype": dtype},
            ),
        )
    assert emb.write_manifest(2, 4) is not None
    run_cli("export", emb.root, "--out", tmp_path / "er", check=True)
    assert {np.load(p).dtype for p in (tmp_path / "er" / "img_emb").iterdir()} == {np.dtype("float32")}
    got = np.concatenate(
        [
            e
            for e, _ in EmbeddingReader(str(tmp_path / "er" / "img_emb"), file_format="npy")(
                batch_size=3, show_progress=False
            )
        ]
    )
    assert np.allclose(got, rows.astype(np.float16), atol=1e-3) and len(got) == 8
