"""An HNSW graph over the float32 rows: a candidate the self-check times beside the IVF settings and exact search
when `clip-hpc index --graph-candidate` asks for it.

Text queries sit far from every image (CLIP's modality gap), so an IVF index must probe a quarter of its lists and
re-rank thousands of candidates to hold recall 0.95 for them; a graph walks to them instead. On 46k real CLIP
photos (MUGE, Chinese-CLIP ViT-B-16), held-out text-like queries reached 0.958 at efSearch 256 in 0.41 ms a query
where the best IVF setting at 0.968 took 1.9 ms and exact search 6.2 (docs/benchmarks.md). It is opt-in, not a
default: on the 100k synthetic hard mixture the self-check's bound accepted efSearch 64, and held-out text-like
queries whose gap direction leans into the data (bench/heldout.py) got 0.934; its random gap directions do not
cover that, and IVF with the exact re-rank is not as sensitive to it. It holds every row in float32 plus its
links (~2.3 KB at 512 dims), so it is only a candidate where that fits the RAM budget and the build stays short.
"""

from __future__ import annotations

import faiss
import numpy as np

from clip_hpc.ann.rows import add_embedded_rows

GRAPH_M = 32  # links per node (64 on the bottom layer): FAISS's recommended 32 for 512-d CLIP vectors
GRAPH_EF_CONSTRUCTION = 80  # build-time search width; 40 (FAISS's default) lost recall on text-like queries
GRAPH_MAX = 250_000  # above this the graph's build (~35 s at 200k on 2 cores) and 2.3 KB/vector outweigh IVF's
EF_LADDER = (16, 32, 64, 128, 192, 256, 384, 512, 768, 1024)  # efSearch values the self-check prices, cheapest first
GRAPH_LABEL = "graph"


def graph_bytes(n: int, dim: int) -> int:
    """RAM the graph holds: the float32 rows, ~2M links of 4 bytes on the bottom layer and ~1/M of that above, ids."""
    return n * (4 * dim + int(4 * 2 * GRAPH_M * (1 + 1 / GRAPH_M)) + 8)


def graph_key() -> str:
    """The factory key index.json records for a served graph."""
    return f"HNSW{GRAPH_M},Flat"


def build_graph(vectors: np.ndarray, chunk: int = 65_536) -> faiss.Index:
    """An IDMap'd HNSW graph (inner product) of vectors.npy's rows under their global ids; all-zero rows (never
    embedded, or removed) are left out, as every index leaves them."""
    graph = faiss.IndexHNSWFlat(int(vectors.shape[1]), GRAPH_M, faiss.METRIC_INNER_PRODUCT)
    graph.hnsw.efConstruction = GRAPH_EF_CONSTRUCTION
    index = faiss.IndexIDMap(graph)
    add_embedded_rows(index, vectors, chunk=chunk)
    return index


def graph_of(index: faiss.Index) -> faiss.IndexHNSW | None:
    """The HNSW index inside `index` (under an IDMap), or None for any other kind."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexIDMap):
        inner = faiss.downcast_index(inner.index)
    return inner if isinstance(inner, faiss.IndexHNSW) else None


def graph_label(ef_search: int) -> str:
    return f"{GRAPH_LABEL},efSearch{ef_search}"
