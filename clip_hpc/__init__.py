"""clip-hpc: CLIP image search at cluster scale (embed on MPI ranks, FAISS IVF-PQ index, tunnelled server)."""

__version__ = "0.1.0"
