"""`clip-hpc` and its subcommands. Thin: each parses its arguments and calls one stage's public entry.

Any `UserError` becomes a one-line message and exit code 2; a traceback is a bug.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from clip_hpc.cli.dedup import add_dedup
from clip_hpc.cli.embedding import add_embed, add_export, add_fetch_model, add_info
from clip_hpc.cli.searching import add_index, add_search
from clip_hpc.cli.serving import add_check_ports, add_demo, add_serve
from clip_hpc.cli.subsets import add_filter
from clip_hpc.cluster.submit import add_submit
from clip_hpc.errors import UserError

SIGPIPE_EXIT = 141  # what a shell reports for a process ended by SIGPIPE: the reader closed the pipe


REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_embed,
    add_info,
    add_fetch_model,
    add_index,
    add_search,
    add_export,
    add_serve,
    add_check_ports,
    add_demo,
    add_submit,
    add_filter,
    add_dedup,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clip-hpc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`clip-hpc ...`; a reader that goes away (`clip-hpc info X | head -1`) ends the command quietly."""
    try:
        try:
            return run(argv)
        finally:
            sys.stdout.flush()  # also after --help: a closed pipe surfaces here, not as a warning at exit
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush cannot fail again
        return SIGPIPE_EXIT


def run(argv: Sequence[str] | None = None) -> int:
    """Parse, dispatch, and turn a `UserError` or an OSError (full disk, read-only mount) into one line on stderr
    and exit code 2. Under MPI an unexpected exception aborts the whole job rather than leave ranks waiting."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        return _fail(args.command, str(exc))
    except BrokenPipeError:
        raise
    except OSError as exc:
        from clip_hpc.errors import os_error_message

        return _fail(args.command, os_error_message(exc))
    except KeyboardInterrupt:
        print(f"clip-hpc {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:
        _abort_mpi_job()
        raise


def _fail(command: str, message: str) -> int:
    from clip_hpc.cluster.world import speaks_for_job, world

    if speaks_for_job(world()):  # under MPI every rank raises the same error; say it once
        print(f"clip-hpc {command}: error: {message}", file=sys.stderr)
    return 2


def _abort_mpi_job() -> None:
    """A bug on one rank of an MPI job: print it and abort every rank (exit 2), instead of a hang in a collective."""
    if "mpi4py" not in sys.modules:
        return
    from clip_hpc.cluster.world import world

    w = world()
    if w.comm is not None and w.size > 1:
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        w.comm.Abort(2)
