"""Red-team findings on `clip-hpc index` options (R2, R11 and the --update/--vectors mismatch): a choice costs what
the index holds, and a choice that cannot be honoured is one line, never a traceback or silence."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from index_fixtures import synthetic_emb_dir

PEAK_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    from clip_hpc.index.build import build_index
    build_index(sys.argv[1], sys.argv[2], refine_factor=int(sys.argv[3]), progress=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
    """
)


def build_peak_mib(emb: Path, out: Path, refine_factor: int) -> int:
    """Peak resident MiB of one `build_index` in a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(emb), str(out), str(refine_factor)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=True,
    )
    return int(proc.stdout.split()[-1])


@pytest.fixture(scope="module")
def small_emb(tmp_path_factory) -> Path:
    return synthetic_emb_dir(tmp_path_factory.mktemp("r2") / "emb", 3000, 64)[0]


def test_r2_refine_factor_costs_memory_in_the_index_size_not_the_factor(small_emb, tmp_path):
    """3,000 vectors: 10 x 5,000 candidates per report query were 50,000 (400 queries: +460 MiB); capped at 3,000."""
    low = build_peak_mib(small_emb, tmp_path / "low", 10)
    high = build_peak_mib(small_emb, tmp_path / "high", 5000)
    assert high - low < 150, (low, high)


@pytest.mark.parametrize("factor", ["0", "10001", "1000000000000", "100000000000000000000000"])
def test_r2_a_refine_factor_out_of_range_is_one_line(small_emb, tmp_path, factor):
    proc = run_cli("index", small_emb, "--out", tmp_path / "index", "--refine-factor", factor, "--quiet")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"clip-hpc index: error: --refine-factor must be between 1 and 10,000, not {factor}"
    ]
    assert not (tmp_path / "index").exists()


@pytest.mark.parametrize(
    ("options", "why"),
    [
        (("--index-key", "Flat"), "Flat has no inverted lists"),
        (("--index-key", "IVF16,PQ8", "--no-refine"), "--no-refine turns off"),
        (("--index-key", "IVF16,PQ8", "--refine-factor", "2"), "needs --refine-factor 3 or more"),
    ],
)
def test_r11_rerank_tier_on_that_cannot_be_honoured_is_one_line(small_emb, tmp_path, options, why):
    proc = run_cli("index", small_emb, "--out", tmp_path / "index", "--rerank-tier", "on", *options, "--quiet")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--rerank-tier on cannot be honoured" in lines[0] and why in lines[0], lines
    assert not (tmp_path / "index").exists()


def test_seen_update_of_an_image_index_with_vectors_captions_is_refused(small_emb, tmp_path):
    run_cli("index", small_emb, "--out", tmp_path / "index", "--index-key", "Flat", "--quiet", check=True)
    before = (tmp_path / "index" / "index.json").read_bytes()
    proc = run_cli("index", small_emb, "--out", tmp_path / "index", "--update", "--vectors", "captions", "--quiet")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "indexes the images embeddings" in lines[0] and "--vectors captions" in lines[0], lines
    assert (tmp_path / "index" / "index.json").read_bytes() == before
    assert run_cli("index", small_emb, "--out", tmp_path / "index", "--update", "--quiet").returncode == 0
