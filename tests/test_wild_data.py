"""The standing wild-data test: a corpus made fresh from a new seed each run (tests/wild_corpus.py: thin strips,
broken and odd images, names with every separator, captions with NUL and lone surrogates, megabyte and
bottomless JSON, duplicate keys, special and sparse tar members, a cut tar) through `mpiexec -n 2 clip-hpc embed`,
`clip-hpc index` and `clip-hpc serve`. Set WILD_SEED to replay a failing run. About 60 s on 2 cores."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from clip_hpc.formats.emb_dir import EmbDir
from clip_hpc.formats.tar_member import split_member_line
from clip_hpc.search.engine import SearchEngine
from conftest import BIN, run_cli
from server_fixtures import start_server
from wild_corpus import make_corpus

TINY = ["--model", "clip-hpc-tiny", "--pretrained", "none"]
PEAK_RSS_BOUND = 2 * 2**30  # per process: the tiny model and two decodes at a time need ~0.6 GiB; thin strips
# used to take 4 GiB and more each


def member_or_file(line: str) -> str:
    """A tar member's name (which may itself hold `::`), or the loose file's path."""
    split = split_member_line(line)
    return line if split is None else split[1]


def embed_with_peak_rss(out: Path, inputs: list[Path]) -> tuple[subprocess.CompletedProcess, int]:
    """`mpiexec -n 2 clip-hpc embed` from a fresh interpreter, so RUSAGE_CHILDREN's peak is this run's alone."""
    cmd = [
        str(BIN / "mpiexec"),
        "-n",
        "2",
        str(BIN / "clip-hpc"),
        "embed",
        *map(str, inputs),
        "--out",
        str(out),
        *TINY,
        "--shard-size",
        "16",
        "--workers",
        "1",
        "--batch-size",
        "8",
    ]
    probe = (
        "import resource, subprocess, sys\n"
        f"p = subprocess.run({cmd!r}, capture_output=True, text=True, timeout=600)\n"
        "sys.stderr.write(p.stderr)\n"
        "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=700)
    code, peak = proc.stdout.split()[-2:]
    return subprocess.CompletedProcess(cmd, int(code), proc.stdout, proc.stderr), int(peak)


def outcomes(emb_dir: Path) -> tuple[dict[int, str], dict[int, str]]:
    """id -> path of every embedded row, and id -> reason of every recorded failure."""
    embedded, failed = {}, {}
    for shard in EmbDir(emb_dir).iter_shards(with_embeddings=False):
        embedded.update(zip(map(int, shard.ids), shard.paths))
        failed.update(zip(map(int, shard.failed_ids), shard.failed_reasons))
    return embedded, failed


def shard_state(emb_dir: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in EmbDir(emb_dir).shard_files()}


def source_bytes(line: str) -> list[bytes]:
    """What an input line names: a file's bytes, or every tar member of that name (a name may repeat)."""
    split = split_member_line(line)
    if split is not None:
        tar_path, member = split
        found = []
        with tarfile.open(tar_path) as tf:
            try:  # a cut tar ends early: the members before the cut are what can be served
                for m in tf:
                    if m.name == member and m.isreg():
                        found.append(tf.extractfile(m).read())
            except tarfile.ReadError:
                pass
        return found
    return [Path(line).read_bytes()]


@pytest.fixture(scope="module")
def wild_run(tmp_path_factory):
    seed = int(os.environ.get("WILD_SEED", random.randrange(2**31)))
    root = tmp_path_factory.mktemp("wild")
    corpus = make_corpus(root / "data", seed)
    proc, peak = embed_with_peak_rss(root / "emb", corpus.inputs)
    return seed, corpus, root, proc, peak


@pytest.mark.mpi
def test_wild_data_embeds_indexes_and_serves(wild_run, tmp_path):
    seed, corpus, root, proc, peak = wild_run
    replay = f"(replay with WILD_SEED={seed})"
    assert proc.returncode == 0, f"{replay}\n{proc.stderr[-3000:]}"
    assert peak < PEAK_RSS_BOUND, f"{replay} peak RSS {peak >> 20} MiB"

    lines = EmbDir(root / "emb").read_inputs()
    embedded, failed = outcomes(root / "emb")
    assert not set(embedded) & set(failed), replay
    assert sorted([*embedded, *failed]) == list(range(len(lines))), replay
    assert all(reason.strip() for reason in failed.values()), replay
    assert all(embedded[i] == lines[i] for i in embedded), replay  # the shard names what inputs.txt names
    embedded_names = {Path(member_or_file(p)).name for p in embedded.values()}
    assert corpus.must_embed <= embedded_names, f"{replay} missing {sorted(corpus.must_embed - embedded_names)}"

    before = shard_state(root / "emb")  # a re-run changes nothing
    again, _ = embed_with_peak_rss(root / "emb", corpus.inputs)
    assert again.returncode == 0, f"{replay}\n{again.stderr[-3000:]}"
    assert shard_state(root / "emb") == before, replay

    run_cli("index", root / "emb", "--out", root / "index", "--quiet", check=True)
    engine = SearchEngine(root / "index", encoder=None, model_name="clip-hpc-tiny", pretrained="none")
    try:
        indexed = {i: engine.path_of(i) for i in engine.meta.all_ids()}
    finally:
        engine.close()
    assert set(indexed) == set(embedded), replay

    with start_server(root / "index", tmp_path / "srv") as srv, srv.client() as c:
        for image_id in [-1, len(lines) + 5, *sorted(failed)[:20], *sorted(indexed)]:
            for url in (f"/api/images/{image_id}", f"/api/images/{image_id}/thumb"):
                resp = c.get(url)
                assert resp.status_code < 500, (replay, url, resp.text[:200])
                if resp.status_code >= 400:
                    assert "error" in resp.json(), (replay, url, resp.text[:200])
            resp = c.get(f"/api/images/{image_id}")
            if image_id in indexed:
                assert resp.status_code == 200, (replay, indexed[image_id], resp.text[:200])
                assert resp.content in source_bytes(indexed[image_id]), (replay, indexed[image_id])
        resp = c.get("/api/search", params={"q": "a photo", "k": 50})
        assert resp.status_code == 200 and resp.json()["results"], replay
