"""The RAM budget of a served index (`clip-hpc index --max-ram`): what stays resident when `serve` loads it (the
inverted lists' codes and ids, centroids and codebooks, the re-rank tier's codes) estimated from the factory key
before anything is built, and the tier code chosen to fit. vectors.npy is not counted: the exact re-rank reads its
rows from disk (through the page cache, which the kernel gives back under pressure). Pure: no faiss import, so
the CLI's help and the build's plan both call it.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from clip_hpc.errors import UserError

DEFAULT_MAX_RAM = 16 * 2**30  # autofaiss's max_index_memory_usage default ("16G")
DEFAULT_MAX_RAM_TEXT = "16G"
TIER_CODES = ("SQ8", "SQ4", "PQ")  # the re-rank tier's codes, richest first; "PQ" is 8-bit PQ with d/8 sub-quantizers
AUTO_TIER_CODES = ("SQ4", "PQ")  # what auto tries, in order: SQ4 (measured on real and synthetic data), then PQ
FIXED_OVERHEAD = 64 * 2**10  # headers, FAISS's own fields, the .npy header: a little over what was measured
FAST_SCAN_BLOCK = 32  # fast-scan lists are packed in blocks of 32 codes: each list may waste up to one block
HNSW_LINKS_BYTES = 4 * 2 * 32 + 16  # an HNSW32 node: 64 level-0 links of 4 B, levels and offsets (upper levels ~3%)
_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """'16G', '512M', '2GiB', '1.5T', '1000000' -> bytes (binary units: 1K = 1024). One-line UserError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise UserError(f"--max-ram {text!r} is not a size: give a number with an optional unit, e.g. 16G, 512M, 2GiB")
    value = float(match.group(1)) * _UNITS[match.group(2).upper()]
    if value < 1:
        raise UserError(f"--max-ram {text!r} must be at least one byte")
    return int(value)


def format_size(n: float) -> str:
    """Bytes as a short binary-unit string: 1536 -> '1.5 KiB'."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


class RamEstimate(NamedTuple):
    """Resident bytes of a served index, by part (None where the factory key has a part this cannot price)."""

    codes: int  # the inverted lists' (or a flat index's) codes, with fast-scan block padding
    ids: int  # 8 B per vector (inverted lists, or the IDMap of a flat index)
    tables: int  # centroids, PQ codebooks, rotations, an HNSW quantizer's links
    tier: int  # the re-rank tier's codes, a row per global id, and its trained tables

    @property
    def base(self) -> int:
        return self.codes + self.ids + self.tables + FIXED_OVERHEAD

    @property
    def total(self) -> int:
        return self.base + self.tier


def _code_bytes(part: str, dim: int) -> tuple[float, float] | None:
    """(bytes per vector, bytes of trained tables) of one encoding of a factory key (Flat, SQ8, PQ32x4fs...)."""
    if part == "Flat":
        return 4.0 * dim, 0.0
    if sq := re.fullmatch(r"SQ(4|6|8|fp16|bf16)", part):
        bits = {"4": 4, "6": 6, "8": 8, "fp16": 16, "bf16": 16}[sq.group(1)]
        return bits * dim / 8, 2 * 4.0 * dim
    if pq := re.fullmatch(r"PQ(\d+)(?:x(\d+))?(fs|np)?", part):
        m, bits = int(pq.group(1)), int(pq.group(2) or 8)
        return m * bits / 8, 4.0 * dim * 2**bits
    return None


def tier_key(code: str, dim: int) -> str:
    """The factory key of a tier code: SQ8, SQ4, or PQ{d/8} (8-bit, d/8 bytes)."""
    return f"PQ{max(1, dim // 8)}" if code == "PQ" else code


def tier_bytes(code: str, n_rows: int, dim: int) -> int:
    """The tier's resident bytes: one code row per global id (failed ones too) and its trained tables."""
    per, tables = _code_bytes(tier_key(code, dim), dim) or (0.0, 0.0)
    return int(per * n_rows + tables)


def estimate_ram(
    key: str, n: int, dim: int, *, tier_code: str | None = None, n_rows: int | None = None
) -> RamEstimate | None:
    """What `serve` holds in RAM for factory `key` over `n` vectors of `dim` (and a tier over `n_rows` ids); None
    for a key with a part this does not know (then no budget is enforced, and the measured bytes are recorded)."""
    parts = [p.strip() for p in key.split(",") if p.strip()]
    tables, codes, ids, nlist = 0.0, 0.0, 8.0 * n, 0
    for part in parts[:-1]:
        if ivf := re.fullmatch(r"IVF(\d+)(_HNSW(\d+))?", part):
            nlist = int(ivf.group(1))
            tables += 4.0 * dim * nlist + (HNSW_LINKS_BYTES * nlist if ivf.group(2) else 0)
        elif re.fullmatch(r"(OPQ|PCAR?)\d+(_\d+)?", part):
            tables += 4.0 * dim * dim + 4.0 * dim
        elif hnsw := re.fullmatch(r"HNSW(\d+)", part):
            tables += (4 * 2 * int(hnsw.group(1)) + 16) * n
        else:
            return None
    encoding = _code_bytes(parts[-1], dim) if parts else None
    if encoding is None:
        return None
    per, trained = encoding
    codes = per * n + (FAST_SCAN_BLOCK * per * max(nlist, 1) if parts[-1].endswith("fs") else 0)
    tier = tier_bytes(tier_code, n_rows if n_rows is not None else n, dim) if tier_code else 0
    return RamEstimate(int(codes), int(ids), int(tables + trained), tier)


class TierChoice(NamedTuple):
    """The re-rank tier a build makes under its RAM budget: its code (None: no tier) and the estimate it fits in."""

    code: str | None
    estimate: RamEstimate | None


def choose_tier_code(
    wanted: str, key: str, n: int, n_rows: int, dim: int, max_ram: int | None, *, may_tier: bool
) -> TierChoice:
    """The richest tier code that fits `max_ram` with the index (auto: SQ4, then PQ; a named code or `on`: that
    one or SQ4, or a one-line error). `may_tier`: the index can take a tier at all (IVF, re-ranked, enough
    vectors for auto). An index that does not fit even without a tier is a one-line error naming the least it
    needs. No budget given (None): the default one chooses the tier, and an index beyond it is built without one
    (a billion vectors need ~40G with no tier: a default must not refuse what ran before it existed)."""
    base = estimate_ram(key, n, dim)
    if max_ram is None:
        if base is not None and base.total > DEFAULT_MAX_RAM:
            return TierChoice(None, base)
        max_ram = DEFAULT_MAX_RAM
    if base is not None and base.total > max_ram:
        raise UserError(
            f"{key} over {n:,} vectors needs at least {format_size(base.total)} of RAM when served "
            f"(codes, ids, centroids), over the --max-ram budget of {format_size(max_ram)}; raise --max-ram or "
            "choose a key with smaller codes (--index-key)"
        )
    if wanted == "off" or not may_tier:
        return TierChoice(None, base)
    codes = AUTO_TIER_CODES if wanted == "auto" else ("SQ4",) if wanted == "on" else (wanted,)
    for code in codes:
        with_tier = estimate_ram(key, n, dim, tier_code=code, n_rows=n_rows)
        if with_tier is None or with_tier.total <= max_ram:
            return TierChoice(code, with_tier)
    if wanted == "auto":
        return TierChoice(None, base)
    least = estimate_ram(key, n, dim, tier_code=codes[0], n_rows=n_rows)
    raise UserError(
        f"--rerank-tier {wanted}: the index and its {tier_key(codes[0], dim)} tier need "
        f"{format_size(least.total if least else 0)} of RAM, over the --max-ram budget of {format_size(max_ram)}; "
        "raise --max-ram, or leave --rerank-tier at auto (a leaner tier, or none)"
    )
