"""IVF coarse-quantizer k-means on a torch device, for clusters whose FAISS is faiss-cpu but whose nodes have GPUs.

FAISS's own Python k-means (`faiss.contrib.clustering.kmeans`, the C++ one's twin) runs over a dataset object; the
torch one in `faiss.contrib.torch.clustering` searches through `faiss.knn`, which faiss-cpu refuses for CUDA
tensors, so `TorchAssign` does the nearest-centroid search with a matrix product on the tensor's device. The
centroids go into the empty IVF quantizer; FAISS then sees `ntotal == nlist`, skips its own k-means and trains
only what follows (the PQ codebooks on the residuals) on the CPU.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from typing import Any

import faiss
import numpy as np

DEVICE_ENV = "CLIP_HPC_KMEANS_DEVICE"  # cuda (default when torch sees a GPU), cpu (the same code on the CPU), faiss
DISTANCES_PER_CHUNK = 1 << 28  # float32 distances per matrix product (1 GiB): rows = this / centroids


class TorchAssign:
    """`faiss.contrib.clustering.DatasetAssign`'s interface over a torch tensor, nearest centroid by L2 on its
    device (||c||^2 - 2 x.c; ||x||^2 is added only to the distances k-means reports)."""

    def __init__(self, x: Any) -> None:
        self.x = x
        self.sq_norms = (x * x).sum(1)

    def count(self) -> int:
        return int(self.x.shape[0])

    def dim(self) -> int:
        return int(self.x.shape[1])

    def get_subset(self, indices: np.ndarray) -> Any:
        import torch

        return self.x[torch.as_tensor(indices, device=self.x.device)].clone()

    def assign_to(self, centroids: Any, weights: Any = None) -> tuple[np.ndarray, Any, Any]:
        import torch

        c_norms = (centroids * centroids).sum(1)
        rows = max(1024, DISTANCES_PER_CHUNK // len(centroids))
        dist, nearest = [], []
        for lo in range(0, self.count(), rows):
            d, i = torch.min(c_norms[None, :] - 2.0 * self.x[lo : lo + rows] @ centroids.T, dim=1)
            dist.append(d + self.sq_norms[lo : lo + rows])
            nearest.append(i)
        assign, distances = torch.cat(nearest), torch.cat(dist)
        sums = torch.zeros_like(centroids).index_add_(
            0, assign, self.x if weights is None else self.x * weights[:, None]
        )
        return assign.cpu().numpy().astype(np.int64), distances, sums


def kmeans_device(local_rank: int = 0) -> str | None:
    """Where the coarse k-means runs when FAISS itself has no GPU: this rank's CUDA device when torch sees one,
    `cpu` when CLIP_HPC_KMEANS_DEVICE=cpu asks for this code on the CPU (tests, dry runs), else None (FAISS)."""
    choice = os.environ.get(DEVICE_ENV, "cuda")
    if choice == "faiss":
        return None
    if choice == "cpu":
        return "cpu"
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return f"cuda:{local_rank % torch.cuda.device_count()}"


def train_ivf_centroids(
    sample: np.ndarray, nlist: int, device: str, *, niter: int = 25, seed: int = 1234, spherical: bool = False
) -> np.ndarray:
    """(nlist, d) float32 k-means centroids of `sample` computed on `device` by FAISS's Python k-means."""
    import torch
    from faiss.contrib.clustering import kmeans

    x = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32)).to(device)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "preproc..." whatever `verbose` says
        centroids = kmeans(nlist, TorchAssign(x), niter=niter, seed=seed, verbose=False)
    if spherical:
        centroids = torch.nn.functional.normalize(centroids, dim=1)
    return centroids.float().cpu().numpy()


def _untrained_transforms_applied(index: faiss.Index, sample: np.ndarray) -> np.ndarray:
    """Train an OPQ/PCA chain in front of the IVF (as IndexPreTransform.train would: on the CPU) and return the
    sample as the IVF sees it; FAISS then skips the trained transforms."""
    if not isinstance(index, faiss.IndexPreTransform):
        return sample
    x = sample
    for i in range(index.chain.size()):
        transform = faiss.downcast_VectorTransform(index.chain.at(i))
        if not transform.is_trained:
            transform.train(x)
        x = transform.apply(x)
    return x


def pretrain_coarse_quantizer(index: faiss.Index, sample: np.ndarray, local_rank: int = 0) -> float | None:
    """Fill an untrained IVF's empty quantizer with centroids trained on a torch device; returns the seconds that
    took, or None when nothing was done (no IVF, a quantizer already filled, or no device for it)."""
    ivf = faiss.try_extract_index_ivf(index)
    device = kmeans_device(local_rank)
    if ivf is None or device is None or ivf.is_trained or ivf.quantizer.ntotal > 0:
        return None
    start = time.perf_counter()
    x = _untrained_transforms_applied(index, np.ascontiguousarray(sample, dtype=np.float32))
    centroids = train_ivf_centroids(
        x,
        ivf.nlist,
        device,
        niter=ivf.cp.niter,
        seed=ivf.cp.seed,
        spherical=ivf.cp.spherical or ivf.metric_type == faiss.METRIC_INNER_PRODUCT,
    )
    ivf.quantizer.add(centroids)
    return round(time.perf_counter() - start, 3)
