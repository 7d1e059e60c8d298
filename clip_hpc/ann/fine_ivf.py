"""Fine codes in the built index's lists: IVF over 8-bit scalar-quantised rows (SQ8, d bytes a vector) under the same
coarse quantizer, a candidate the self-check prices and times beside the PQ settings and exact search.

CLIP text queries sit far from every image; 4-bit PQ codes rank their neighbours so loosely that recall 0.95 took a
x500 re-rank (5,000 float16 rows re-read a query: 2.1 ms on 46k real photos, half an exact scan). SQ8 codes rank them
almost as exact search does, so a probe of the lists and a x2-5 re-rank suffice there (0.5-1 ms, raw FAISS). They
cost d bytes of RAM a vector, so they are a candidate only where `--max-ram` holds them and a tier may be used.
"""

from __future__ import annotations

import faiss
import numpy as np

from clip_hpc.ann.rows import add_embedded_rows

FINE_MAX = 250_000  # above this the sweep's wide probes of d-byte codes cost more build time than they save
FINE_REFINE = (0, 2, 5)  # candidates per result re-ranked from the float16 rows; 0 serves the SQ8 order itself
FINE_TRAIN_ROWS = 65_536  # rows the per-dimension SQ8 ranges are trained on
FINE_LABEL = "sq8"


def fine_bytes(n: int, dim: int, nlist: int) -> int:
    """RAM the fine index holds: a d-byte code and an 8-byte id a vector, and the float32 centroids."""
    return n * (dim + 8) + 4 * dim * nlist


def fine_key(nlist: int) -> str:
    """The factory key index.json records for a served fine index."""
    return f"IVF{nlist},SQ8"


def fine_ladder(nlist: int) -> list[int]:
    """nprobe values priced, cheapest first: powers of two and the halfway points between them (a doubling from
    64 to 128 lists is the difference between 0.15x and 0.3x an exact scan), up to every list."""
    steps = {min(nlist, 1 << i) for i in range(nlist.bit_length() + 1)}
    steps |= {3 << (i - 1) for i in range(1, nlist.bit_length()) if 3 << (i - 1) < nlist}
    return sorted(steps)


def build_fine_ivf(index: faiss.Index, vectors: np.ndarray, seed: int = 0) -> faiss.Index:
    """An IVF-SQ8 of vectors.npy's embedded rows under their global ids, in the lists of `index` (a copy of its
    trained coarse quantizer: no second k-means); the SQ8 ranges trained on a sample of the rows."""
    ivf = faiss.extract_index_ivf(index)
    dim = int(vectors.shape[1])
    quantizer = faiss.clone_index(ivf.quantizer)
    fine = faiss.IndexIVFScalarQuantizer(
        quantizer, dim, int(ivf.nlist), faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
    )
    fine.own_fields = True
    quantizer.this.disown()
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(vectors), size=min(FINE_TRAIN_ROWS, len(vectors)), replace=False))
    sample = np.asarray(vectors[picks], dtype=np.float32)
    fine.train(np.ascontiguousarray(sample[sample.any(axis=1)]))
    add_embedded_rows(fine, vectors)
    return fine


def fine_label(probe: int, factor: int) -> str:
    return f"{FINE_LABEL},nprobe{probe},refine{factor}"
