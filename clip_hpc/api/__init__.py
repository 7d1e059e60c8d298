"""The Python API's implementation; its public names are re-exported (lazily) by `clip_hpc` itself.

`results` and `remote` stay light (standard library, httpx, PIL): a laptop notebook that only `connect`s never
loads torch, FAISS, h5py or numpy. `local` and `stages` load them, and only when first used.
"""
