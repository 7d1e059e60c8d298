"""Embedding WebDataset tars end to end through the real CLI: every member embedded or failed exactly once with 1
and 2 ranks and after a SIGKILL, the same vectors as the same images given as loose files, captions and offsets in
the shards. About 25 s on 2 cores (the SIGKILL test, marked slow, another 15 s)."""

from pathlib import Path

import numpy as np
import pytest

from clip_hpc.formats.emb_dir import EmbDir
from clip_hpc.ingest.tars import Member, read_member
from conftest import BIN, kill_after_shards, make_images, run_cli
from tar_fixtures import write_bad_tars, write_wds_tars
from test_embed import TINY, coverage, load_all, mpi_embed

pytest.importorskip("webdataset")
N_GOOD = 40


@pytest.fixture(scope="module")
def tar_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("tars")
    images = make_images(root / "images", N_GOOD, seed=3)
    captions = write_wds_tars(images, root / "tars", per_tar=15)
    expected = write_bad_tars(root / "tars", root / "bad")
    return root, images, captions, expected


@pytest.fixture(scope="module")
def one_rank(tar_set):
    root, images, _, _ = tar_set
    out = root / "emb-tars"
    run_cli("embed", root / "tars", "--out", out, *TINY, "--shard-size", 10, "--workers", 1, check=True)
    loose = root / "emb-loose"
    run_cli("embed", images, "--out", loose, *TINY, "--shard-size", 10, "--workers", 1, check=True)
    return out, loose


def outcomes(emb_dir: Path) -> dict[str, str]:
    """member line -> 'ok' or the failure kind, for every input line of the tars."""
    found = {}
    for shard in EmbDir(emb_dir).iter_shards(with_embeddings=False):
        found.update({p: "ok" for p in shard.paths})
        found.update({p: r.split(":")[0] for p, r in zip(shard.failed_paths, shard.failed_reasons)})
    return found


def test_every_member_once_same_vectors_as_loose_files(tar_set, one_rank):
    root, _, captions, expected = tar_set
    out, loose = one_rank
    lines = EmbDir(out).read_inputs()
    assert len(lines) == N_GOOD + len(expected) and all("::" in line for line in lines)
    ids, _ = coverage(out)
    assert np.array_equal(ids, np.arange(len(lines)))  # each member embedded or failed exactly once
    found = outcomes(out)
    assert {line.rsplit("/", 1)[1]: kind for line, kind in found.items() if "/9000" in line} == expected
    tar_ids, tar_emb = load_all(out)
    loose_ids, loose_emb = load_all(loose)
    assert np.array_equal(tar_ids[:N_GOOD], loose_ids)
    assert np.array_equal(tar_emb[:N_GOOD], loose_emb)  # same bytes, same decode, same batches: same vectors
    loose_paths = EmbDir(loose).read_inputs()
    for shard in EmbDir(out).iter_shards(with_embeddings=False):
        for i, path, caption, offset, size in zip(shard.ids, shard.paths, shard.captions, shard.offsets, shard.sizes):
            if i < N_GOOD:
                assert caption == captions[i]
                assert (
                    read_member(path.split("::")[0], Member(int(offset), int(size)))
                    == Path(loose_paths[i]).read_bytes()
                )
                assert f'"url": "https://ex.org/{i:09d}"' in shard.meta[list(shard.ids).index(i)]
    manifest = EmbDir(out).load_manifest()
    assert manifest.failed_by_reason == {"not an image": 1, "no image": 1, "truncated tar": 1}


@pytest.mark.mpi
def test_two_ranks_cover_every_member_once_and_match_one_rank(tar_set, one_rank):
    root, _, _, expected = tar_set
    out = root / "emb-2"
    proc = mpi_embed(2, root / "tars", "--out", out, *TINY, "--shard-size", 10, "--workers", 1)
    assert proc.returncode == 0, proc.stderr
    ids, _ = coverage(out)
    assert np.array_equal(ids, np.arange(len(EmbDir(out).read_inputs())))
    assert outcomes(out) == outcomes(one_rank[0])
    ids1, emb1 = load_all(one_rank[0])
    ids2, emb2 = load_all(out)
    assert np.array_equal(ids1, ids2) and np.abs(emb1 - emb2).max() <= 2e-3


@pytest.mark.mpi
@pytest.mark.slow
def test_sigkill_then_resume_tars(tar_set, one_rank, tmp_path):
    root, _, _, _ = tar_set
    out = tmp_path / "emb"
    cmd = [
        str(BIN / "mpiexec"),
        "-n",
        "2",
        str(BIN / "clip-hpc"),
        "embed",
        str(root / "tars"),
        "--out",
        str(out),
        *TINY,
        "--shard-size",
        "4",
        "--batch-size",
        "1",
        "--workers",
        "0",
    ]
    kill_after_shards(cmd, out)
    survivors = {p.name: p.stat().st_mtime_ns for p in EmbDir(out).shard_files()}
    n_units = -(-len(EmbDir(out).read_inputs()) // 4)
    assert 3 <= len(survivors) < n_units, "the run must be killed part-way"
    resumed = run_cli("embed", root / "tars", "--out", out, *TINY, "--shard-size", 4, "--workers", 1)
    assert resumed.returncode == 0, resumed.stderr
    assert all(p.stat().st_mtime_ns == survivors[p.name] for p in EmbDir(out).shard_files() if p.name in survivors)
    ids, _ = coverage(out)
    assert np.array_equal(ids, np.arange(len(EmbDir(out).read_inputs())))
    assert outcomes(out) == outcomes(one_rank[0])


def test_a_tar_rewritten_after_listing_is_a_recorded_failure_never_another_members_pixels(tmp_path):
    """The listing's offsets were trusted blindly: a tar rewritten during the run (a re-download, shards refreshed)
    with its samples in another order handed each line the bytes of whichever member now sits at its offset, so
    `a.bmp`'s row held `b.bmp`'s embedding. The member's header, just before its data, is read with it and must
    still name it (the server's check, `read_indexed_member`)."""
    import io

    import torch
    from PIL import Image

    from clip_hpc.devdata.sample_images import write_tar
    from clip_hpc.ingest.image_dataset import ImageDataset
    from clip_hpc.ingest.sources import list_inputs

    def bmp(colour: str) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), colour).save(buf, "BMP")
        return buf.getvalue()

    samples = [("a", {"bmp": bmp("red"), "txt": b"red"}), ("b", {"bmp": bmp("blue"), "txt": b"blue"})]
    tar = write_tar(tmp_path / "x.tar", samples)
    listing = list_inputs([tar])
    data = ImageDataset(
        range(2), listing.lines, lambda im: torch.from_numpy(np.asarray(im).copy()), 32, 1 << 20, listing.tar_samples
    )
    assert [data[i][1][0, 0, 0].item() for i in range(2)] == [255, 0]  # red, then blue: read as listed
    write_tar(tar, samples[::-1])  # the same members, same sizes, swapped
    data = ImageDataset(range(2), listing.lines, data.preprocess, 32, 1 << 20, listing.tar_samples)
    for i in range(2):
        _, pixels, reason, extras = data[i]
        assert pixels is None and "changed after indexing" in reason and extras.caption == "", (i, reason)
