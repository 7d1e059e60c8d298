"""A cluster profile (hpc/NAME.sh, or a path) read from Python the way slurm/common.sh reads it: sourced by bash.

The profile is the one place that says how jobs run on a cluster (constraint, QOS, account, GPUs, where the weights
are cached); `clip-hpc submit` renders it into the sbatch command line and `clip-hpc fetch-model` takes its weights
directory from it, so a login shell and a job agree. Standard library only.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from clip_hpc.errors import UserError

PROFILE_ENV = "CLIP_HPC_PROFILE"
HOME_ENV = "CLIP_HPC_HOME"
DEFAULT_PROFILE = "generic"
SOURCE_TIMEOUT_S = 120  # `module load` on a busy login node can take a while


def checkout_home(environ: Mapping[str, str] = os.environ) -> Path:
    """The clip-hpc checkout (its hpc/ and slurm/): $CLIP_HPC_HOME, else the one this package is installed from."""
    if environ.get(HOME_ENV):
        return Path(environ[HOME_ENV]).expanduser().resolve()
    here = Path(__file__).resolve().parents[2]
    if (here / "slurm" / "common.sh").is_file():
        return here
    raise UserError(f"cannot find the clip-hpc checkout (its hpc/ and slurm/): set {HOME_ENV}")


def profile_path(choice: str, home: Path) -> Path:
    """As slurm/common.sh: a name is hpc/NAME.sh of the checkout, anything with a / is a path."""
    return Path(choice).expanduser().resolve() if "/" in choice else home / "hpc" / f"{choice}.sh"


@dataclass(frozen=True)
class ClusterProfile:
    """The environment a profile leaves behind once sourced, and what clip-hpc reads from it."""

    choice: str  # as given (name or path): what the jobs get as CLIP_HPC_PROFILE
    path: Path
    home: Path
    env: Mapping[str, str]

    def get(self, name: str) -> str:
        return self.env.get(name, "")

    def stage_options(self, stage: str) -> list[str]:
        """The profile's default sbatch options for a stage (CLIP_HPC_EMBED_SBATCH, ...), as words."""
        return shlex.split(self.get(f"CLIP_HPC_{stage.upper()}_SBATCH"))

    @property
    def gpus_per_node(self) -> int:
        value = self.get("CLIP_HPC_GPUS_PER_NODE")
        return int(value) if value.isdigit() else 0


def read_profile(choice: str | None = None, environ: Mapping[str, str] = os.environ) -> ClusterProfile:
    """Source the profile (--profile, else $CLIP_HPC_PROFILE, else generic) in bash and read the environment back;
    a missing profile or one that fails is a one-line UserError."""
    home = checkout_home(environ)
    choice = choice or environ.get(PROFILE_ENV) or DEFAULT_PROFILE
    path = profile_path(choice, home)
    if not path.is_file():
        known = " ".join(sorted(p.stem for p in (home / "hpc").glob("*.sh")))
        raise UserError(f"no profile {choice!r} ({path}); choose one of: {known}, or give a path")
    # A profile's own output (module load) is not the environment; its unexported settings (`: "${X:=...}"`) are.
    script = (  # bash builtins only
        'set +u; source "$0" >&2 || exit 3; '
        'for name in $(compgen -v); do case $name in CLIP_HPC_*|SBATCH_*) export "$name" ;; esac; done; '
        'for name in $(compgen -e); do printf \'%s=%s\\0\' "$name" "${!name}"; done'
    )
    try:
        proc = subprocess.run(
            ["bash", "-c", script, str(path)],
            capture_output=True,
            env={**environ, HOME_ENV: str(home), PROFILE_ENV: choice},
            timeout=SOURCE_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"cannot source profile {path}: {exc}") from None
    if proc.returncode != 0:
        last = (proc.stderr.decode(errors="replace").strip().splitlines() or ["(no message)"])[-1]
        raise UserError(f"profile {path} failed (exit {proc.returncode}): {last}")
    pairs = (entry.split("=", 1) for entry in proc.stdout.decode(errors="replace").split("\0") if "=" in entry)
    return ClusterProfile(choice, path, home, {name: value for name, value in pairs})


def profile_weights_dir(choice: str | None = None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The profile's CLIP_HPC_WEIGHTS when a profile is named (--profile or $CLIP_HPC_PROFILE), else None: what
    `fetch-model` on a login shell must fill for the profile's jobs to find the weights."""
    if not (choice or environ.get(PROFILE_ENV)):
        return None
    return read_profile(choice, environ).get("CLIP_HPC_WEIGHTS") or None
