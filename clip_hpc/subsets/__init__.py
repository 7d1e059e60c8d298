"""Subsets: `clip-hpc filter` pulls every image matching text/image queries out of an EMB_DIR (exact, all ranks)
or an INDEX_DIR (a fast approximate preview), as a table, a file list, WebDataset tars or a URL list.

The public entry is `filter_subset(FilterOptions(...)) -> FilterResult` (imported lazily: the CLI parser imports
this package, and pyarrow and h5py are not needed to print --help)."""

from __future__ import annotations

from typing import Any

from clip_hpc.subsets.options import FilterOptions, FilterResult

__all__ = ["FilterOptions", "FilterResult", "filter_subset"]


def __getattr__(name: str) -> Any:
    if name == "filter_subset":
        from clip_hpc.subsets.run import filter_subset

        return filter_subset
    raise AttributeError(name)
