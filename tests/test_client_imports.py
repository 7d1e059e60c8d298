"""The laptop commands stay light: `check-ports` and `search --url` (client mode), run for real against a closed
port, load neither torch, FAISS, h5py nor numpy, and still fail with their one-line diagnosis."""

from __future__ import annotations

import subprocess
import sys

import pytest

from clip_hpc.server.sockets import free_port

HEAVY = ("torch", "faiss", "h5py", "numpy")


def imported_modules(stderr: str) -> set[str]:
    """Module names from `python -X importtime` lines: `import time: self | cumulative | name` (indented)."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":  # the header line
                names.add(name)
    return names


def run_importtime(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "clip_hpc", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},
    )
    return proc, imported_modules(proc.stderr)


def diagnosis(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]


@pytest.mark.parametrize("command", ["check-ports", "search"])
def test_laptop_commands_load_nothing_heavy(command):
    port = free_port()  # nothing listens there once the probe socket is closed
    if command == "check-ports":
        proc, modules = run_importtime("check-ports", "--port", str(port), "--token", "t")
        assert proc.returncode == 1 and proc.stdout.startswith(f"FAIL  1 something listens on localhost:{port}")
        assert diagnosis(proc) == []
    else:
        proc, modules = run_importtime("search", "--url", f"http://127.0.0.1:{port}", "a photo")
        lines = diagnosis(proc)
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert lines[0].startswith(f"clip-hpc search: error: cannot reach http://127.0.0.1:{port}")
    assert "clip_hpc.cli" in modules and "httpx" in modules  # the parse saw the real imports
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert heavy == [], f"clip-hpc {command} imported {heavy[:10]}"


def test_import_clip_hpc_connect_loads_nothing_heavy():
    """A laptop notebook's first lines: the package root and its `connect` (the other names load lazily)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import clip_hpc; clip_hpc.connect; clip_hpc.Results"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    modules = imported_modules(proc.stderr)
    assert proc.returncode == 0 and "httpx" in modules and "clip_hpc.api.results" in modules, proc.stderr[-2000:]
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert heavy == [], f"import clip_hpc; clip_hpc.connect imported {heavy[:10]}"
