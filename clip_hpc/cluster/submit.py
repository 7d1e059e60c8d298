"""`clip-hpc submit STAGE`: one job of the pipeline with the cluster profile's resources on its sbatch command line.

The profile's SBATCH_CONSTRAINT / SBATCH_QOS / SBATCH_ACCOUNT reach sbatch only from the environment of the shell
that sources it; slurm/common.sh sources it inside the job, after placement, which is too late. Here they become
options (--constraint=gpu --qos=regular ...), with the stage's defaults (CLIP_HPC_EMBED_SBATCH, ...) and a log
file outside the checkout; options the user gives win over both. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from clip_hpc.cluster.profile import HOME_ENV, PROFILE_ENV, ClusterProfile, read_profile
from clip_hpc.errors import UserError

STAGES = ("embed", "index", "serve")


class ProfileOption(NamedTuple):
    """An sbatch option a profile sets through sbatch's input variable, and the spellings that override it."""

    variable: str
    option: str
    spellings: tuple[str, ...]


PROFILE_OPTIONS = (
    ProfileOption("SBATCH_CONSTRAINT", "--constraint", ("-C", "--constraint")),
    ProfileOption("SBATCH_QOS", "--qos", ("-q", "--qos")),
    ProfileOption("SBATCH_ACCOUNT", "--account", ("-A", "--account")),
    ProfileOption("SBATCH_PARTITION", "--partition", ("-p", "--partition")),
)
OUTPUT_SPELLINGS = ("-o", "--output")


def split_at_dashes(rest: Sequence[str]) -> tuple[list[str], list[str]]:
    """`SBATCH_OPTIONS... -- STAGE_ARGS...` into its two parts; without `--` everything is the stage's."""
    if "--" not in rest:
        return [], list(rest)
    cut = list(rest).index("--")
    return list(rest[:cut]), list(rest[cut + 1 :])


def option_names(words: Sequence[str]) -> set[str]:
    """The options named in sbatch words: `--qos=x` and `--qos x` give --qos, `-q x` and `-qx` give -q."""
    return {w.split("=", 1)[0] if w.startswith("--") else w[:2] for w in words if w.startswith("-") and w != "-"}


def profile_options(profile: ClusterProfile, overridden: set[str]) -> list[str]:
    """--constraint=... etc. from the profile's SBATCH_* variables, except where the stage or user sets them."""
    return [
        f"{opt.option}={profile.get(opt.variable)}"
        for opt in PROFILE_OPTIONS
        if profile.get(opt.variable) and not overridden.intersection(opt.spellings)
    ]


def log_dir_for(profile: ClusterProfile, given: str | None) -> Path:
    """--log-dir, else CLIP_HPC_DATA/logs (where pipeline.sh puts them), never the checkout by accident."""
    base = Path(given) if given else Path(profile.get("CLIP_HPC_DATA") or os.getcwd()) / "logs"
    return base.expanduser().resolve()


def sbatch_command(
    stage: str, profile: ClusterProfile, sbatch_args: Sequence[str], stage_args: Sequence[str], log_dir: Path
) -> list[str]:
    """The full sbatch command line: name, log, the profile's options, the stage's defaults, the user's options
    (last, so that sbatch takes theirs), the script, and the stage's own arguments."""
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}: choose one of {', '.join(STAGES)}")
    defaults = profile.stage_options(stage)
    given = option_names(sbatch_args)
    output = [] if given.intersection(OUTPUT_SPELLINGS) else [f"--output={log_dir / f'clip-{stage}-%j.out'}"]
    return [
        "sbatch",
        f"--job-name=clip-{stage}",
        *output,
        *profile_options(profile, option_names(defaults) | given),
        *defaults,
        *sbatch_args,
        str(profile.home / "slurm" / f"{stage}.sbatch"),
        *stage_args,
    ]


def job_environment(profile: ClusterProfile) -> dict[str, str]:
    """This shell's environment plus where the job finds the checkout and the profile (it sources it again)."""
    choice = str(profile.path) if "/" in profile.choice else profile.choice
    return {**os.environ, HOME_ENV: str(profile.home), PROFILE_ENV: choice}


def cmd_submit(args: argparse.Namespace) -> int:
    profile = read_profile(args.profile)
    sbatch_args, stage_args = split_at_dashes(args.rest)
    log_dir = log_dir_for(profile, args.log_dir)
    command = sbatch_command(args.stage, profile, sbatch_args, stage_args, log_dir)
    if args.dry_run:
        print(shlex.join(command))
        return 0
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found: run clip-hpc submit on the cluster's login node (or see --dry-run)")
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"$ {shlex.join(command)}", file=sys.stderr, flush=True)
    return subprocess.run(command, env=job_environment(profile)).returncode


def add_submit(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit",
        help="submit one stage's sbatch job with the cluster profile's constraint, QOS, account, GPUs and log dir",
        description="clip-hpc submit [--profile P] STAGE [SBATCH_OPTION... --] STAGE_ARGS...  Options before a "
        "'--' go to sbatch (and win over the profile's); without '--' all arguments are the stage's. "
        "Prints the sbatch command, then runs it.",
    )
    p.add_argument("--profile", default=None, help="hpc/NAME.sh or a path (default: $CLIP_HPC_PROFILE, else generic)")
    p.add_argument("--log-dir", default=None, help="where the job log goes (default: the profile's CLIP_HPC_DATA/logs)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch command, submit nothing")
    p.add_argument("stage", choices=STAGES)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="[SBATCH_OPTION... --] STAGE_ARGS...")
    p.set_defaults(func=cmd_submit)
