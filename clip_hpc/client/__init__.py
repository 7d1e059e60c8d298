"""The laptop side: where a server is (one `resolve_endpoint`, from the connection file formats/connection.py owns),
the HTTP client, process control for scripts that start a server, and the check-ports diagnosis.

Only the standard library, httpx and clip_hpc's light modules: a laptop command must never load torch, FAISS,
h5py or numpy (tests/test_client_imports.py checks this).
"""
