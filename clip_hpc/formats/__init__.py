"""The on-disk formats of clip-hpc, each with one owner: EMB_DIR (HDF5 shards), INDEX_DIR, and the atomic
writes both rely on. Importing this package loads nothing heavy: h5py and FAISS load with the module that needs them."""
