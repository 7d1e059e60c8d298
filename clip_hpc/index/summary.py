"""The line `clip-hpc index` ends with: what was built and the recall it serves, as plain numbers.

The self-check's report (index.json `recall`) holds each query family's recall with and without re-ranking; a user
needs the served configuration's figure per family, not the nested dicts, so this picks those out.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from clip_hpc.formats.index_dir import INDEX_FILE, IVFDATA_FILE, TIER_CODES_FILE, TIER_FILE, IndexInfo

FAMILIES = (("in_distribution", "in-distribution"), ("off_distribution", "text-like"), ("captions", "captions"))


RESIDENT_FILES = (INDEX_FILE, IVFDATA_FILE, TIER_FILE, TIER_CODES_FILE)  # what `serve` loads (or maps and reads
# at every query: on-disk lists); vectors.npy is read a few rows a query, meta.sqlite a row a hit


class Footprint(NamedTuple):
    """Bytes of an INDEX_DIR: what serving holds in RAM, and everything on disk."""

    ram: int
    disk: int


def served_footprint(files: dict[str, dict[str, Any]]) -> Footprint:
    """From index.json's `files` records (name -> {"bytes": ...}): the RAM-resident files' bytes, and all of them."""
    sizes = {name: int(record.get("bytes", 0)) for name, record in files.items()}
    return Footprint(sum(sizes.get(name, 0) for name in RESIDENT_FILES), sum(sizes.values()))


def served_recall(recall: dict[str, Any], refine: bool) -> dict[str, float]:
    """Family label -> recall@10 of the configuration served (re-ranked or not), for the families measured."""
    label = "refine" if refine else "no_refine"
    out = {}
    for key, name in FAMILIES:
        value = recall.get(key)
        value = value.get(label) if isinstance(value, dict) else value
        if isinstance(value, (int, float)):
            out[name] = float(value)
    return out


def summary_line(info: IndexInfo, out: str, *, updated: bool = False) -> str:
    """`OUT: N vectors, KEY nprobe P, RAM R B/vector, disk D B/vector, built in S s on R rank(s); recall@10 X
    served (...)`: RAM is what serving holds (index, lists, tier), disk every file (vectors.npy too)."""
    timings = info.updates[-1].get("timings", {}) if updated and info.updates else info.timings
    took = timings.get("total_s")
    verb = "last update took" if updated else "built in"
    head = (
        f"{out}: {info.n} vectors, {info.index_key} nprobe {info.nprobe}, RAM {info.ram_bytes_per_vector} B/vector, "
        f"disk {info.disk_bytes_per_vector} B/vector, "
        f"{verb} {took if took is not None else '?'} s on {info.ranks} rank(s)"
    )
    served = info.recall.get("served")
    if served is None:
        return head + "; recall not measured"
    families = ", ".join(f"{name} {value:.4f}" for name, value in served_recall(info.recall, info.refine).items())
    target = info.recall.get("target")
    below = f", below the {target} target" if info.recall.get("target_met") is False and target else ""
    return f"{head}; recall@10 {served:.4f} served ({families}{below})"
