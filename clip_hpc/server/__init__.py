"""The node side: the FastAPI app over a `SearchEngine` (`create_app`) and `serve`, which loads, binds, writes the
connection file and runs uvicorn. Auth, metrics, the upload limit, export and socket binding each have a module."""
from clip_hpc.server.app import create_app
from clip_hpc.server.serve import load_engine, serve

__all__ = ["create_app", "load_engine", "serve"]
