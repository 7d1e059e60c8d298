"""`clip-hpc filter` against inputs nobody designed for: bad query arguments, damaged output directories, shards
changed after the manifest, unusable vectors and source images gone or changed before `--to tars`. In process
(`filter_subset`), on a small EMB_DIR of random unit vectors with the tiny model's dimension."""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from clip_hpc.devdata.synthetic_vectors import write_emb_dir
from clip_hpc.errors import UserError
from clip_hpc.formats.emb_dir import EmbDir
from clip_hpc.subsets.options import FilterOptions
from clip_hpc.subsets.run import filter_subset

N, DIM, UNIT = 24, 128, 8  # clip-hpc-tiny's dimension; 3 units


def options(source: Path, out: Path, **changes) -> FilterOptions:
    given = {"texts": ("a photo",), "threshold": -1.0, "progress": False, "device": "cpu", **changes}
    return FilterOptions(source=str(source), out=str(out), **given)


@pytest.fixture
def synthetic(tmp_path) -> Path:
    """24 random unit vectors in 3 whole units, recorded as made by clip-hpc-tiny, with a manifest."""
    vectors = np.random.default_rng(3).standard_normal((N, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    emb = write_emb_dir(tmp_path / "emb", vectors, np.zeros(N, int), UNIT, model="clip-hpc-tiny")
    assert EmbDir(emb).write_manifest(N // UNIT, UNIT) is not None
    return emb


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"texts": ("",)}, "--text is empty"),
        ({"texts": ("a cat", " \t\n")}, "--text is empty"),
        ({"negatives": (" ",)}, "--negative is empty"),
        ({"threshold": 1.5}, r"--threshold is a cosine in \[-1, 1\], not 1.5"),
        ({"threshold": -1.01}, r"--threshold is a cosine in \[-1, 1\], not -1.01"),
        ({"min_caption_similarity": 2.0}, r"--min-caption-similarity is a cosine in \[-1, 1\], not 2.0"),
    ],
)
def test_queries_that_cannot_select_are_refused_in_one_line(tmp_path, changes, message):
    with pytest.raises(UserError, match=message):
        options(tmp_path, tmp_path / "out", **changes).check()


def test_caption_similarity_on_an_emb_dir_without_captions_is_refused(synthetic, tmp_path):
    with pytest.raises(UserError, match="no caption embeddings .*embed --captions"):
        filter_subset(options(synthetic, tmp_path / "out", min_caption_similarity=0.2))


@pytest.mark.parametrize("recorded", ["[1, 2]", "null", '"text"'])
def test_a_damaged_settings_file_is_a_one_line_error(synthetic, tmp_path, recorded):
    out = tmp_path / "out"
    out.mkdir()
    (out / "filter-settings.json").write_text(recorded)
    with pytest.raises(UserError, match="filter-settings.json is unreadable"):
        filter_subset(options(synthetic, out))


def test_an_out_dir_named_in_bytes_that_are_not_utf8_and_a_part_without_its_count(synthetic, tmp_path):
    out = Path(os.fsdecode(bytes(tmp_path) + b"/out-\xff\xfe"))  # a Latin-1 name, as argv hands it over
    first = filter_subset(options(synthetic, out, to=("urls",)))
    assert first.n_kept == N and (out / "results.parquet").exists()
    part = out / "parts" / "unit-000001.parquet"
    with open(part, "rb") as f:
        table = pq.read_table(f)
    with open(part, "wb") as f:
        pq.write_table(table.replace_schema_metadata(None), f)  # a part from elsewhere: no n_scanned
    with pytest.raises(UserError, match="unit-000001.parquet: unreadable part"):
        filter_subset(options(synthetic, out, to=("urls",)))


def rewrite(emb: Path, unit: int, change) -> None:
    """Shard `unit` rewritten after the manifest was written, with `change` applied to its datasets and attrs."""
    import h5py

    with h5py.File(EmbDir(emb).shard_path(unit), "r+") as f:
        change(f)


def _replace(f, name: str, values: np.ndarray) -> None:
    del f[name]
    f.create_dataset(name, data=values)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f["ids"].write_direct(np.arange(8, dtype=np.int64)), r"ids outside \[8, 16\)"),
        (lambda f: f["ids"].write_direct(np.arange(15, 7, -1, dtype=np.int64)), "ids are not strictly ascending"),
        (lambda f: _replace(f, "embeddings", f["embeddings"][:, :64]), "64-dim vectors, the manifest says 128"),
        (lambda f: _replace(f, "ids", f["ids"][:5]), "5 ids for 8 vectors"),
        (lambda f: f.attrs.__setitem__("version", 2), "unsupported shard version 2"),
    ],
    ids=["ids-of-another-unit", "ids-descending", "other-dim", "rows-disagree", "newer-version"],
)
def test_a_shard_changed_after_the_manifest_is_named_not_scanned(synthetic, tmp_path, change, message):
    rewrite(synthetic, 1, change)
    with pytest.raises(UserError, match=f"shard-000001.h5: .*{message}"):
        filter_subset(options(synthetic, tmp_path / "out"))


def test_a_shard_with_other_rows_than_the_manifest_lists_is_named(synthetic, tmp_path):
    manifest = json.loads((synthetic / "manifest.json").read_text())
    manifest["shards"][2]["n"] = 7  # the unit was embedded again (one image failed) after the manifest
    (synthetic / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="shard-000002.h5: 8 vectors, the manifest lists 7"):
        filter_subset(options(synthetic, tmp_path / "out"))


@pytest.fixture
def with_files(tmp_path) -> tuple[Path, list[Path]]:
    """6 image files, as embed records them (path and stat identity), with random vectors: 2 units of 3."""
    from PIL import Image

    from clip_hpc.formats.input_identity import stat_identity
    from clip_hpc.formats.shard import ShardBatch

    files = [tmp_path / "images" / f"img{i}.png" for i in range(6)]
    files[0].parent.mkdir()
    for i, path in enumerate(files):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(path)
    vectors = np.random.default_rng(4).standard_normal((6, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    emb = EmbDir(tmp_path / "emb")
    emb.write_inputs([str(p) for p in files])
    for unit in range(2):
        ids = list(range(3 * unit, 3 * unit + 3))
        attrs = {"model": "clip-hpc-tiny", "pretrained": "none", "unit_size": 3}
        identities = [stat_identity(files[i].stat()) for i in ids]
        batch = ShardBatch(vectors[ids].astype(np.float16), ids, [str(files[i]) for i in ids], attrs=attrs)
        emb.write_shard(unit, replace(batch, identities=identities))
    assert emb.write_manifest(2, 3) is not None
    return emb.root, files


def test_tars_skip_and_record_images_gone_or_changed_since_embed(with_files, tmp_path):
    emb, files = with_files
    originals = [p.read_bytes() for p in files]
    files[1].unlink()
    files[4].write_bytes(b"other bytes now")  # replaced: its size and mtime are not the embedded file's
    out = Path(os.fsdecode(bytes(tmp_path) + b"/out \xff"))  # spaces and a non-UTF-8 name too
    result = filter_subset(options(emb, out, to=("tars",), samples_per_tar=2))
    assert (result.n_kept, result.n_tars, result.n_samples_skipped) == (6, 3, 2)
    with open(out / "skipped.parquet", "rb") as f:
        skipped = pq.read_table(f).to_pydict()
    assert skipped["id"] == [1, 4] and skipped["path"] == [str(files[1]), str(files[4])]
    assert "No such file" in skipped["reason"][0] and "changed after it was indexed" in skipped["reason"][1]
    found = {}
    for number in range(3):
        with tarfile.open(out / "tars" / f"{number:05d}.tar") as tar:
            found.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})  # type: ignore[union-attr]
    images = {name: data for name, data in found.items() if name.endswith(".png")}
    assert images == {f"{i:09d}.png": originals[i] for i in (0, 2, 3, 5)}  # keys stay the rows'
    assert json.loads((out / "filter.json").read_text())["counts"]["samples_skipped"] == 2
    again = filter_subset(options(emb, out, to=("tars",), samples_per_tar=2))  # a resume counts them again
    assert (again.n_tars_skipped, again.n_samples_skipped) == (3, 2)


def _no_direction(f) -> None:
    """Rows 0-2 of a shard (ids 8-10) hold a zero vector, a vector with one infinite component, and NaN."""
    vectors = f["embeddings"][...]
    vectors[0:3] = 0
    vectors[1, 0], vectors[2, :] = np.inf, np.nan
    f["embeddings"].write_direct(vectors)


@pytest.mark.parametrize("keep", [{"threshold": -1.0}, {"threshold": None, "top": 100}], ids=["threshold", "top"])
def test_vectors_without_a_direction_are_never_kept_and_are_counted(synthetic, tmp_path, keep):
    rewrite(synthetic, 1, _no_direction)
    result = filter_subset(options(synthetic, tmp_path / "out", **keep))
    with open(tmp_path / "out" / "results.parquet", "rb") as f:
        ids = pq.read_table(f).column("id").to_pylist()
    assert ids == [i for i in range(N) if i not in (8, 9, 10)] and result.n_kept == N - 3
    report = json.loads((tmp_path / "out" / "filter.json").read_text())
    assert report["counts"]["unusable_vectors"] == 3 and report["unusable_ids"] == [8, 9, 10]
