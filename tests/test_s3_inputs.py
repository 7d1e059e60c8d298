"""Inputs by URL against a real S3 endpoint (moto's standalone server behind a recording proxy, s3_fixtures.py):
`mpiexec -n 2 clip-hpc embed 's3://b/shards/{00000..00003}.tar' s3://b/loose/` with only AWS_ENDPOINT_URL and test
credentials in the environment, killed with SIGKILL part-way and re-run (every id exactly once), a throttled object
recorded with its reason, captions kept, no tar ever fetched whole; then index and serve, and the served bytes are
the objects' bytes, and a tar rewritten after indexing is a 404. About 75 s on 2 cores, most of it the mpiexec,
index and serve start-ups."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from clip_hpc.devdata.local_s3 import upload
from clip_hpc.formats.emb_dir import EmbDir
from clip_hpc.ingest.object_store import LISTING_BLOCK
from clip_hpc.ingest.sources import list_images
from conftest import BIN, kill_after_shards, make_images, run_cli
from s3_fixtures import BUCKET, S3Endpoint
from server_fixtures import start_server
from tar_fixtures import caption_of, write_wds_tars
from test_embed import TINY, coverage, mpi_embed

pytest.importorskip("webdataset")
pytest.importorskip("s3fs")
N_TARS, PER_TAR, N_LOOSE = 4, 8, 8
THROTTLED = f"{BUCKET}/loose/zz-throttled.jpg"
INPUTS = [f"s3://{BUCKET}/shards/{{00000..{N_TARS - 1:05d}}}.tar", f"s3://{BUCKET}/loose/"]


@pytest.fixture(scope="module")
def bucket(s3_endpoint: S3Endpoint, tmp_path_factory) -> dict[str, bytes]:
    """4 WebDataset tars of 8 captioned samples under shards/, 8 loose images plus one the proxy always throttles
    under loose/; returns object key -> bytes."""
    root = tmp_path_factory.mktemp("s3data")
    write_wds_tars(make_images(root / "tar-images", N_TARS * PER_TAR, seed=11), root / "tars", per_tar=PER_TAR)
    loose = make_images(root / "loose", N_LOOSE, seed=12)
    objects = {f"{BUCKET}/shards/{p.name}": p.read_bytes() for p in sorted((root / "tars").glob("*.tar"))}
    objects.update({f"{BUCKET}/loose/{Path(p).relative_to(loose)}": Path(p).read_bytes() for p in list_images([loose])})
    objects[THROTTLED] = next(v for k, v in objects.items() if k.endswith(".jpg"))
    upload(s3_endpoint.direct, objects)
    s3_endpoint.failing.add(THROTTLED)
    assert all(len(v) > 2 * LISTING_BLOCK for k, v in objects.items() if k.endswith(".tar"))
    return objects


def ranges(endpoint: S3Endpoint, objects: dict[str, bytes], start: int = 0) -> list[tuple[str, int, int]]:
    """Every GET of a tar since log entry `start` as (key, first byte, bytes asked); a GET without Range is -1."""
    out = []
    for r in endpoint.log[start:]:
        if r.method == "GET" and r.key.endswith(".tar"):
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", r.range or "")
            if m is None:
                out.append((r.key, -1, len(objects[r.key])))
            else:
                last = int(m.group(2)) if m.group(2) else len(objects[r.key]) - 1
                out.append((r.key, int(m.group(1)), last - int(m.group(1)) + 1))
    return out


def assert_ranged(endpoint: S3Endpoint, objects: dict[str, bytes], start: int = 0) -> int:
    found = ranges(endpoint, objects, start)
    assert found, "no tar was read"
    whole = [(k, s, n) for k, s, n in found if s < 0 or n >= len(objects[k])]
    assert not whole, f"full-object GETs of tars: {whole}"
    return len(found)


def member_bytes(objects: dict[str, bytes], line: str) -> bytes:
    tar, member = line.removeprefix("s3://").split("::")
    with tarfile.open(fileobj=io.BytesIO(objects[tar])) as tf:
        return tf.extractfile(member).read()


def object_bytes(objects: dict[str, bytes], line: str) -> bytes:
    return member_bytes(objects, line) if "::" in line else objects[line.removeprefix("s3://")]


@pytest.fixture(scope="module")
def embedded(s3_endpoint: S3Endpoint, bucket, tmp_path_factory) -> tuple[Path, set[str], int]:
    """Two ranks embed, are SIGKILLed after 3 shards, and the same command finishes the job; returns EMB_DIR, the
    names of the shards that survived the kill (with their mtimes), and where the proxy log stood before."""
    out = tmp_path_factory.mktemp("s3emb") / "emb"
    args = [*INPUTS, "--out", str(out), *TINY, "--shard-size", "4", "--workers", "1"]
    log_start = len(s3_endpoint.log)
    with pytest.MonkeyPatch.context() as mp:  # kill_after_shards's child inherits the environment
        for k, v in s3_endpoint.env.items():
            mp.setenv(k, v)
        kill_after_shards(
            [str(BIN / "mpiexec"), "-n", "2", str(BIN / "clip-hpc"), "embed", *args, "--batch-size", "1"], out
        )
        survivors = {p.name: p.stat().st_mtime_ns for p in EmbDir(out).shard_files()}
        n_units = -(-len(EmbDir(out).read_inputs()) // 4)
        assert 3 <= len(survivors) < n_units, "the run must be killed part-way"
        proc = mpi_embed(2, *args)
    assert proc.returncode == 0, proc.stderr
    assert all(p.stat().st_mtime_ns == survivors[p.name] for p in EmbDir(out).shard_files() if p.name in survivors)
    return out, set(survivors), log_start


@pytest.mark.mpi
def test_two_ranks_sigkill_resume_every_id_once_captions_and_the_throttled_object(s3_endpoint, bucket, embedded):
    out, _, log_start = embedded
    lines = EmbDir(out).read_inputs()
    assert len(lines) == N_TARS * PER_TAR + N_LOOSE + 1 and all(line.startswith(f"s3://{BUCKET}/") for line in lines)
    ids, _ = coverage(out)
    assert np.array_equal(ids, np.arange(len(lines)))  # embedded or failed, each exactly once across both runs
    failed, captions = {}, {}
    for shard in EmbDir(out).iter_shards(with_embeddings=False):
        failed.update(zip(shard.failed_paths, shard.failed_reasons))
        captions.update(zip(shard.paths, shard.captions))
    assert list(failed) == [f"s3://{THROTTLED}"], failed  # every other image embedded
    assert (
        failed[f"s3://{THROTTLED}"].startswith("read error")
        and "reduce your request rate" in failed[f"s3://{THROTTLED}"]
    )
    assert len([r for r in s3_endpoint.gets(THROTTLED) if r.status == 503]) >= 2  # retried before giving up
    for line, caption in captions.items():
        member = line.partition("::")[2]
        assert caption == (caption_of(int(member.split(".")[0])) if member else "")
    assert sum("::" in line for line in captions) == N_TARS * PER_TAR
    assert_ranged(s3_endpoint, bucket, log_start)  # listing and embedding: never a tar fetched whole


@pytest.mark.mpi
def test_index_and_serve_the_objects_bytes(s3_endpoint, bucket, embedded, tmp_path):
    out, _, _ = embedded
    run_cli("index", out, "--out", tmp_path / "index", "--quiet", check=True)
    with start_server(tmp_path / "index", tmp_path / "serve", env=s3_endpoint.env) as served, served.client() as client:
        hits = client.get("/api/search", params={"q": "a red kite", "k": 50}).json()["results"]
        assert len(hits) == N_TARS * PER_TAR + N_LOOSE
        start = len(s3_endpoint.log)
        chosen = [h for h in hits if "::" in h["path"]][:4] + [h for h in hits if "::" not in h["path"]][:2]
        for hit in chosen:
            got = client.get(hit["url"])
            assert got.status_code == 200 and got.content == object_bytes(bucket, hit["path"]), hit["path"]
            thumb = client.get(hit["thumb"], params={"size": 64})
            assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
        archive = client.post("/api/export", json={"ids": [h["id"] for h in chosen]})
        assert archive.status_code == 200
        with zipfile.ZipFile(io.BytesIO(archive.content)) as zf:
            for hit in chosen:
                name = f"images/{hit['id']}_{Path(hit['path'].rpartition('::')[2] or hit['path']).name}"
                assert zf.read(name) == object_bytes(bucket, hit["path"])
        assert_ranged(s3_endpoint, bucket, start)  # a member is served by one ranged GET, never its whole tar
        member = next(h for h in chosen if "::" in h["path"])
        tar_key = member["path"].removeprefix("s3://").split("::")[0]
        other = next(k for k in bucket if k.endswith(".tar") and k != tar_key)
        rewritten = bucket[other].ljust(len(bucket[tar_key]) + 1024, b"\0")  # long enough: only the header differs
        upload(s3_endpoint.direct, {tar_key: rewritten})  # the tar rewritten after indexing: a new ETag
        try:
            changed = client.get(member["url"])
            assert changed.status_code == 404 and "changed" in changed.json()["error"]
            stale = client.get(member["thumb"], params={"size": 64})  # the cache is keyed by the ETag: no stale hit
            assert stale.status_code == 404
        finally:
            upload(s3_endpoint.direct, {tar_key: bucket[tar_key]})


def test_listing_is_sorted_by_ranged_reads_and_out_must_be_posix(s3_endpoint, bucket, tmp_path, monkeypatch):
    from clip_hpc.ingest import object_store
    from clip_hpc.ingest.sources import list_inputs  # noqa: I001

    for k, v in s3_endpoint.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(object_store, "_filesystems", {})
    start = len(s3_endpoint.log)
    listing = list_inputs(INPUTS)
    assert listing.lines == sorted(listing.lines) and len(listing.lines) == N_TARS * PER_TAR + N_LOOSE + 1
    assert sum(1 for r in s3_endpoint.log[start:] if "list-type=2" in r.key) >= 1  # a prefix listing, no walk
    assert_ranged(s3_endpoint, bucket, start)
    member = listing.tar_samples[listing.lines[-1]]
    tar_key = member.tar.removeprefix("s3://")
    assert bucket[tar_key][member.image.offset : member.image.offset + member.image.size] == member_bytes(
        bucket, listing.lines[-1]
    )
    proc = run_cli("embed", INPUTS[1], "--out", "s3://b/emb", *TINY)
    assert proc.returncode != 0 and "POSIX" in proc.stderr and "Traceback" not in proc.stderr
    assert "POSIX" in run_cli("embed", "--help").stdout


def test_a_tar_that_fails_to_read_is_recorded_not_fatal(s3_endpoint, bucket, monkeypatch):
    from clip_hpc.ingest import object_store
    from clip_hpc.ingest.tars import index_tar

    for k, v in s3_endpoint.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(object_store, "_filesystems", {})
    key = f"{BUCKET}/shards/00001.tar"
    s3_endpoint.failing.add(key)
    start = len(s3_endpoint.log)
    try:
        samples = index_tar(f"s3://{key}")
    finally:
        s3_endpoint.failing.discard(key)
    assert len(samples) == 1 and samples[0].name == "<unreadable after byte 0>"
    assert samples[0].problem.startswith("read error") and "reduce your request rate" in samples[0].problem
    assert sum(r.status == 503 for r in s3_endpoint.log[start:]) >= 3  # retried with backoff before giving up


def test_append_adds_new_objects_at_the_end(s3_endpoint, bucket, embedded, tmp_path):
    """Runs last: it uploads under a prefix the other tests do not list."""
    out = tmp_path / "emb"
    shutil.copytree(embedded[0], out)
    before = EmbDir(out).read_inputs()
    upload(s3_endpoint.direct, {f"{BUCKET}/extra/new.jpg": bucket[THROTTLED]})
    proc = run_cli(
        "embed",
        *INPUTS,
        f"s3://{BUCKET}/extra/",
        "--out",
        out,
        *TINY,
        "--shard-size",
        4,
        "--workers",
        0,
        "--append",
        env=s3_endpoint.env,
    )
    assert proc.returncode == 0, proc.stderr
    after = EmbDir(out).read_inputs()
    assert after == before + [f"s3://{BUCKET}/extra/new.jpg"]
    ids, paths = coverage(out)
    assert np.array_equal(ids, np.arange(len(after))) and after[-1] in paths


def test_retries_only_what_may_pass_and_urls_are_never_paths(monkeypatch):
    from clip_hpc.errors import UserError
    from clip_hpc.ingest import object_store

    monkeypatch.setattr(object_store, "BACKOFF_S", 0.001)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset")
        return "ok"

    assert object_store.with_retries(flaky, 4) == "ok" and len(calls) == 3

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("gone")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        object_store.with_retries(missing, 4)
    assert len(calls) == 1  # a missing object fails at once
    assert object_store.is_url("s3://b/k") and object_store.is_url("gcs://b/k") and not object_store.is_url("/a/s3:")
    with pytest.raises(UserError, match="POSIX"):
        object_store.require_posix("s3://b/out")
    with pytest.raises(UserError, match="(?i)protocol"):
        object_store.filesystem("nosuchproto://b/k")


def test_local_paths_never_import_fsspec(tmp_path):
    """fsspec, s3fs and botocore load only when a URL is given: listing local tars and images and the server's file
    rules stay as light as before."""
    write_wds_tars(make_images(tmp_path / "images", 3, seed=1), tmp_path / "tars", per_tar=2)
    code = (
        "import sys; from clip_hpc.ingest.sources import list_inputs; import clip_hpc.server.image_source, "
        "clip_hpc.server.files, clip_hpc.cli; list_inputs([sys.argv[1], sys.argv[2]]); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fsspec', 's3fs', 'botocore', 'aiobotocore')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "tars"), str(tmp_path / "images")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "[]"


def test_a_prefix_of_many_objects_is_listed_page_by_page(s3_endpoint, monkeypatch):
    """1,100 keys (over S3's 1,000 per page): every one listed, sorted, by list requests alone (no object read)."""
    from clip_hpc.devdata.local_s3 import client
    from clip_hpc.ingest import object_store

    keys = [f"{BUCKET}/many/{i % 7}/img{i:05d}.jpg" for i in range(1100)] + [f"{BUCKET}/many/notes.txt"]
    upload(s3_endpoint.direct, {keys[0]: b"x"})  # the bucket
    client(s3_endpoint.direct).pipe({k: b"x" for k in keys[1:]})  # side by side
    for k, v in s3_endpoint.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(object_store, "_filesystems", {})
    start = len(s3_endpoint.log)
    found = list_images([f"s3://{BUCKET}/many/"])
    assert found == sorted(f"s3://{k}" for k in keys if k.endswith(".jpg"))
    lists = [r for r in s3_endpoint.log[start:] if "list-type=2" in r.key]
    assert len(lists) >= 2 and any("continuation-token" in r.key for r in lists)
    assert not [r for r in s3_endpoint.log[start:] if r.method == "GET" and "list-type=2" not in r.key]
