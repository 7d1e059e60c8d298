"""The one cross-rank failure protocol: a step that fails on any rank fails on every rank, so no rank is left waiting
in a collective for one that died (a read-only --out, a full disk, a bad input, a bug).

Every rank calls the same function at the same point. Each runs its part, then all wait (sleeping, not spinning)
and learn every rank's outcome. A rank whose step failed raises its own error: a `UserError` or `OSError` as it
was, a bug as a one-line `UserError` after printing its traceback there (once, where it happened); a lone process
just re-raises the bug. The other ranks raise `RankFailed`, naming the rank and the cause.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import TypeVar, cast

from clip_hpc.cluster.world import World, speaks_for_job
from clip_hpc.errors import UserError, os_error_message

T = TypeVar("T")
IDLE_POLL_S = 0.05  # how often a waiting rank looks whether the others have arrived


class RankFailed(UserError):
    """Another rank failed; this one stops too (its message names the rank and the cause)."""


def all_or_none(world: World, step: Callable[[], T]) -> T:
    """Every rank runs `step` and gets its own result, or, if it failed on any rank, every rank raises."""
    value, error = _attempt(world, step)
    _settle(world, error)
    return cast(T, value)  # no error anywhere: `step` returned it


def on_every_rank(world: World, step: Callable[[], T]) -> list[T]:
    """Every rank runs `step`; every rank gets all ranks' results in rank order, or every rank raises."""
    return world.allgather(all_or_none(world, step))


def from_root(world: World, step: Callable[[], T]) -> T:
    """Rank 0 runs `step` and every rank gets its result, or every rank raises. Ranks that cannot talk (no MPI)
    each run it, since each speaks for itself."""
    value, error = _attempt(world, step) if speaks_for_job(world) else (None, None)
    _settle(world, error)
    return world.bcast(value)


def wait_for_all(world: World) -> None:
    """A barrier that sleeps while it waits: MPI's blocking collectives spin a core, so ranks idle while another
    trains or embeds (on every core it was given) would slow it down."""
    if world.comm is None or world.size == 1:
        return
    request = world.comm.Ibarrier()
    while not request.Test():
        time.sleep(IDLE_POLL_S)


def _attempt(world: World, step: Callable[[], T]) -> tuple[T | None, BaseException | None]:
    """Run `step`; on failure, the error this rank will raise once the ranks have settled. A one-line error drops
    the step's frames, so a failed step's data loader or model is not kept alive while the others catch up."""
    try:
        return step(), None
    except (UserError, OSError) as exc:
        return None, exc.with_traceback(None)
    except Exception as exc:
        if world.size == 1:
            return None, exc  # a lone process waits for nobody: the bug as it is
        traceback.print_exc()  # once, by the rank where it happened
        return None, UserError(f"{type(exc).__name__}: {exc}")
    except BaseException as exc:  # noqa: BLE001 - an interrupt: re-raised after the other ranks were told
        return None, exc


def _settle(world: World, error: BaseException | None) -> None:
    """Wait for every rank, exchange what failed, and raise on every rank if anything did."""
    wait_for_all(world)
    failures = [
        message for message in world.allgather(None if error is None else _describe(error, world.rank)) if message
    ]
    if error is not None:
        raise error
    if failures:
        raise RankFailed(failures[0])


def _describe(error: BaseException, rank: int) -> str:
    """One line naming the rank and the cause."""
    if isinstance(error, UserError):
        cause = str(error)
    elif isinstance(error, OSError):
        cause = os_error_message(error)
    else:
        cause = f"{type(error).__name__}: {error}"
    return f"rank {rank} failed: {cause}"
