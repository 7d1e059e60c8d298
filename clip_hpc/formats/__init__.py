"""The on-disk formats of clip-hpc, each with one owner: EMB_DIR (HDF5 shards, the inputs list, the `TARPATH::MEMBER`
line), INDEX_DIR (with meta.sqlite), clip-retrieval's embedding folder, the server's connection file, and the
atomic writes they rely on. Importing this package loads nothing heavy: h5py and FAISS load with the module that
needs them."""
