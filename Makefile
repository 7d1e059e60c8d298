# The two quick-start commands:  `make demo`  and  `make test`  (CI runs `make test` via .ci/run).
# Everything is installed by these targets; nothing relies on something installed by hand.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.clip-hpc-installed

.PHONY: setup demo lint test test-fast docs clean

# torch==2.14.1 / torchvision==0.29.1 are pinned in pyproject.toml: the one pair whose torchvision imports here.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,mpi-wheel]'   # mpi-wheel: the pip MPICH (mpiexec) of the demo and tests
	# The LAION tool chain our export is tested against pins numpy<2 but runs on numpy 2: no deps, ours are in dev.
	$(BIN)/python -m pip install -q --no-deps 'embedding-reader>=1.8' 'autofaiss>=2.18'
	touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/clip-hpc demo --out demo-out

# Types and lint (configured in pyproject.toml): any error fails `make test`, and so CI.
lint: setup
	$(BIN)/ruff check clip_hpc tests scripts
	$(BIN)/ruff format --check clip_hpc tests scripts
	$(BIN)/mypy

# System services for the integration tests (slurm, munge, sshd, chromium) are installed here, then every
# test group runs: unit, mpi, slurm, ssh, browser. Two pytest workers (most tests wait on a child process or a
# socket and use one core); each test file runs whole on one worker, so module fixtures and the one SLURM
# cluster (tests/test_slurm.py) and sshd (tests/test_ssh_tunnel.py) are never started twice at once.
test: lint
	bash scripts/install_test_services.sh
	$(BIN)/python -m pytest -v -rs --timeout=900 --durations=40 -n 2 --dist loadfile

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slurm and not ssh and not browser and not slow"

# The documentation site (docs/, mkdocs.yml) into site/; tests/test_docs.py builds it the same way.
docs: setup
	$(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) demo-out test-artifacts .pytest_cache site
