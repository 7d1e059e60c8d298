"""The node side: the FastAPI app over a `SearchEngine` (`app.create_app`) and `serve.serve`, which loads, binds,
writes the connection file and runs uvicorn. Kept import-free so `clip-hpc` can read the batch defaults cheaply."""
