"""clip-hpc: CLIP image search at cluster scale (embed on MPI ranks, FAISS IVF-PQ index, tunnelled server).

The public Python API (everything else is internal and may change):

- `open_index(INDEX_DIR)` -> `Index`: search an index in this process.
- `connect(URL_OR_CONNECTION_FILE, token=None)` -> `RemoteIndex`: search a served one over HTTP (the tunnel).
- `Index.search` / `RemoteIndex.search` -> `Results`: a sequence of `Hit` (id, score, path, caption, url).
- `embed(inputs, out, ...)` and `build_index(emb_dir, out, ...)`: the pipeline's stages, as the CLI runs them.

Names load on first use, so `import clip_hpc; clip_hpc.connect(...)` never imports torch, FAISS, h5py or numpy.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from clip_hpc.api.local import Index, open_index
    from clip_hpc.api.remote import RemoteIndex, connect
    from clip_hpc.api.results import Hit, Results, SearchFilters
    from clip_hpc.api.stages import embed
    from clip_hpc.index.build import build_index

# public name -> the module that defines it, imported when the name is first used
_PUBLIC = {
    "open_index": "clip_hpc.api.local",
    "Index": "clip_hpc.api.local",
    "connect": "clip_hpc.api.remote",
    "RemoteIndex": "clip_hpc.api.remote",
    "Hit": "clip_hpc.api.results",
    "Results": "clip_hpc.api.results",
    "SearchFilters": "clip_hpc.api.results",
    "embed": "clip_hpc.api.stages",
    "build_index": "clip_hpc.index.build",
}

__all__ = [
    "Hit",
    "Index",
    "RemoteIndex",
    "Results",
    "SearchFilters",
    "__version__",
    "build_index",
    "connect",
    "embed",
    "open_index",
]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'clip_hpc' has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name]), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
