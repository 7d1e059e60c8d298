"""`clip-hpc index --max-ram` (index/memory.py): sizes parsed or refused in one line, the served RAM estimated from
the factory key, the re-rank tier's code chosen within the budget, and real builds whose RAM-resident files stay
within it at three budgets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clip_hpc.errors import UserError
from clip_hpc.formats.caption_view import emb_view
from clip_hpc.formats.index_dir import IndexDir
from clip_hpc.index.build import build_index
from clip_hpc.index.memory import (
    DEFAULT_MAX_RAM,
    choose_tier_code,
    estimate_ram,
    parse_size,
)
from clip_hpc.index.summary import RESIDENT_FILES, served_footprint
from conftest import run_cli
from index_fixtures import synthetic_emb_dir

N, DIM, KEY = 12_000, 32, "IVF64,PQ4x4fs"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("16G", 16 * 2**30),
        ("512M", 512 * 2**20),
        ("2GiB", 2 * 2**30),
        ("1.5k", 1536),
        ("1000", 1000),
        (" 3 tb", 3 * 2**40),
    ],
)
def test_sizes_parse_in_binary_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "16X", "-1G", "1e9", "16 GB extra", "0", "0.1"])
def test_a_bad_size_is_a_one_line_user_error(text):
    with pytest.raises(UserError, match="--max-ram") as err:
        parse_size(text)
    assert "\n" not in str(err.value)


def test_the_estimate_covers_codes_ids_and_tables_and_the_tier_per_row():
    base = estimate_ram("IVF1024,PQ64x4fs", 1_000_000, 512)
    assert base is not None
    assert base.codes >= 32 * 1_000_000 and base.ids == 8 * 1_000_000 and base.tables >= 4 * 512 * 1024
    sq4 = estimate_ram("IVF1024,PQ64x4fs", 1_000_000, 512, tier_code="SQ4", n_rows=1_100_000)
    sq8 = estimate_ram("IVF1024,PQ64x4fs", 1_000_000, 512, tier_code="SQ8", n_rows=1_100_000)
    pq = estimate_ram("IVF1024,PQ64x4fs", 1_000_000, 512, tier_code="PQ", n_rows=1_100_000)
    assert sq4 is not None and sq8 is not None and pq is not None
    assert 256 * 1_100_000 <= sq4.tier < sq8.tier and 512 * 1_100_000 <= sq8.tier and 64 * 1_100_000 <= pq.tier
    assert pq.tier < sq4.tier and sq4.base == base.base
    assert estimate_ram("IVF64,LSH", 1000, 32) is None  # a part it cannot price: no budget enforced, nothing made up


def test_the_tier_code_is_the_richest_that_fits():
    n, rows, dim, key = 1_000_000, 1_000_000, 512, "IVF1024,PQ64x4fs"
    base = estimate_ram(key, n, dim)
    assert base is not None
    sq4, pq = (estimate_ram(key, n, dim, tier_code=c, n_rows=rows) for c in ("SQ4", "PQ"))
    assert sq4 is not None and pq is not None

    def code(budget: int, wanted: str = "auto") -> str | None:
        return choose_tier_code(wanted, key, n, rows, dim, budget, may_tier=True).code

    assert code(DEFAULT_MAX_RAM) == "SQ4"
    assert code(sq4.total) == "SQ4" and code(sq4.total - 1) == "PQ" and code(pq.total - 1) is None
    assert code(DEFAULT_MAX_RAM, "SQ8") == "SQ8" and code(DEFAULT_MAX_RAM, "off") is None
    assert choose_tier_code("auto", key, n, rows, dim, DEFAULT_MAX_RAM, may_tier=False).code is None
    with pytest.raises(UserError, match=r"--rerank-tier on: .*SQ4 tier need .* over the --max-ram budget"):
        code(pq.total, "on")
    with pytest.raises(UserError, match=r"needs at least .* of RAM when served .* budget of 1\.0 MiB") as err:
        code(2**20)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def emb(tmp_path_factory):
    return synthetic_emb_dir(tmp_path_factory.mktemp("ram") / "emb", N, DIM, shard_size=4000, failed_every=53)[0]


def _budgets(emb) -> dict[str | None, int]:
    """Three budgets that each admit exactly one tier code (SQ4, 8-bit PQ, none) for the fixture's key and size."""
    summary = emb_view(emb, "images").check_set()
    n, rows = summary.n_embedded, summary.n_inputs  # failed ids hold tier rows too
    est = {code: estimate_ram(KEY, n, DIM, tier_code=code, n_rows=rows) for code in ("SQ4", "PQ", None)}
    assert all(e is not None for e in est.values())
    return {code: e.total for code, e in est.items() if e is not None}


@pytest.mark.parametrize("code", ["SQ4", "PQ", None])
def test_the_served_ram_stays_within_the_budget(emb, tmp_path, code):
    """Built under each budget (the tier considered from any size here): the files `serve` holds in RAM (index,
    tier) sum to no more than the budget, the tier code is the one that fits, and index.json says RAM and disk
    bytes per vector apart."""
    budget = _budgets(emb)[code]
    out = tmp_path / "index"
    info = build_index(emb, out, index_key=KEY, progress=False, max_ram=budget, tier_from=0, refine_factor=50)
    files = IndexDir(out)
    resident = sum((out / name).stat().st_size for name in RESIDENT_FILES if (out / name).exists())
    assert resident <= budget and info.max_ram == budget
    assert served_footprint(info.files).ram == resident
    assert info.ram_bytes_per_vector == round(resident / info.n, 2)
    assert info.disk_bytes_per_vector is not None and info.disk_bytes_per_vector > info.ram_bytes_per_vector
    planned = {"SQ4": DIM // 2, "PQ": DIM // 8, None: None}[code]
    assert info.recall.get("tier_code_bytes") == planned  # what the self-check was given to weigh
    if info.tier is not None:
        assert info.tier["code_bytes"] == planned and files.has_tier()
        assert np.load(files.tier_codes_path, mmap_mode="r").shape[1] == planned
    on_disk = json.loads(files.info_path.read_text())
    assert on_disk["ram_bytes_per_vector"] == info.ram_bytes_per_vector and on_disk["max_ram"] == budget


def test_an_index_over_the_budget_is_one_line_naming_both(emb, tmp_path):
    proc = run_cli("index", emb, "--out", tmp_path / "index", "--index-key", KEY, "--max-ram", "64K", "--quiet")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs at least" in lines[0] and "64.0 KiB" in lines[0], lines
    assert not (tmp_path / "index").exists()
    bad = run_cli("index", emb, "--out", tmp_path / "index", "--max-ram", "lots", "--quiet")
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "--max-ram" in bad.stderr


def test_no_budget_given_never_refuses_an_index_larger_than_the_default() -> None:
    """A billion-vector build that ran before --max-ram existed still runs: without a budget the default only
    chooses the tier (none beyond it); a budget given explicitly is enforced."""
    key, n, dim = "IVF65536_HNSW32,PQ64x4fs", 1_000_000_000, 512
    assert choose_tier_code("auto", key, n, n, dim, None, may_tier=True).code is None
    with pytest.raises(UserError, match="--max-ram"):
        choose_tier_code("auto", key, n, n, dim, DEFAULT_MAX_RAM, may_tier=True)
    small = choose_tier_code("auto", "IVF1024,PQ64x4fs", 100_000, 100_000, dim, None, may_tier=True)
    assert small.code == "SQ4"
