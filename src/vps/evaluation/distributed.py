"""Data-parallel evaluation: the launch's ranks from the environment, each rank's share of the items, and
the process group that tells rank 0 when every rank has finished.

``accelerate launch --num_processes N -m vps eval ...`` and ``torchrun --nproc_per_node N -m vps eval ...``
start N processes and give each ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``. Without ``WORLD_SIZE`` (or with 1) nothing here applies and a run is the single
process it always was.

The rule of a launch (`vps.evaluation.harness.run_evaluation` with a `Shard`):

- Rank R evaluates the items at positions R, R + N, R + 2N, ... of the run's item order (the order
  the harness batches them in: by token length by default), so every rank gets items of every length
  and the ranks finish at about the same time. Each configuration uses the same split, so the
  methods of one item (refine-self and refine-oracle sharing samples) run on one rank.
- Rank R appends its rows to ``rows.rank{R}.jsonl`` and holds ``.lock.rank{R}``; rank 0 also holds
  the directory's ``.lock`` and is the only one to write ``run.json``.
- Rank 0 first merges rank files left by an interrupted launch into ``results.jsonl``; then all ranks
  meet (the start barrier), read ``results.jsonl`` and skip the rows it holds, whichever launch and
  number of processes wrote them. After its last batch every rank waits at the finish barrier;
  rank 0 then appends the ranks' rows to ``results.jsonl`` in the order a single process would
  have written them and deletes the rank files. The report is rank 0's alone.

The process group is gloo's, on every device: the ranks exchange no tensors, only two barriers, and
gloo's ``monitored_barrier`` takes a timeout and names the ranks that did not arrive, where NCCL needs
each rank bound to its own GPU to do as much. A rank that dies is noticed at once by the others (its
connection closes); one that hangs is given up on after the timeout (``VPS_DIST_TIMEOUT`` for joining
and the start, ``VPS_DIST_FINISH_TIMEOUT`` for the finish, in seconds).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .._io import RunLockedError
from .rundir import RunDir

__all__ = ["DistributedError", "Shard", "World", "lone_launch_warning", "rank_device", "rank_session", "shard_items",
           "world_from_env"]

T = TypeVar("T")

TIMEOUT_ENV = "VPS_DIST_TIMEOUT"
FINISH_TIMEOUT_ENV = "VPS_DIST_FINISH_TIMEOUT"
# Joining waits for every rank's process to start; the start barrier for every rank to load the model
# (a first download can take many minutes), so the two share torch's own default of 30 minutes.
DEFAULT_TIMEOUT = 1800.0
# A healthy rank can wait at the finish for as long as a slower one still works; a dead one is noticed
# at once, so this only bounds a rank that hangs.
DEFAULT_FINISH_TIMEOUT = 24 * 3600.0


class DistributedError(RuntimeError):
    """The launch's environment is malformed, or the ranks could not meet (the message says which)."""


@dataclass(frozen=True)
class World:
    """This process's place in a launch: ``rank`` of ``size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def parallel(self) -> bool:
        """More than one process: the run is sharded."""
        return self.size > 1


def _int_env(environ: Mapping[str, str], name: str) -> int | None:
    text = environ.get(name)
    if text is None or not text.strip():
        return None
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"{name}={text!r} is not a whole number") from None


def world_from_env(environ: Mapping[str, str] | None = None) -> World:
    """The `World` that ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` describe (as torchrun and accelerate
    launch set them); a single process when ``WORLD_SIZE`` is unset or 1. `DistributedError` if they
    are inconsistent."""
    env = os.environ if environ is None else environ
    size = _int_env(env, "WORLD_SIZE")
    rank = _int_env(env, "RANK")
    local = _int_env(env, "LOCAL_RANK")
    if size is None or size == 1:
        if rank not in (None, 0):
            raise DistributedError(f"RANK={rank} but WORLD_SIZE is {'unset' if size is None else 1}: a single "
                                   f"process is rank 0")
        return World()
    if size < 1:
        raise DistributedError(f"WORLD_SIZE must be >= 1, got {size}")
    if rank is None:
        raise DistributedError(f"WORLD_SIZE={size} but RANK is not set; start the processes with torchrun or "
                               f"accelerate launch, which set both")
    if not 0 <= rank < size:
        raise DistributedError(f"RANK must be in [0, {size}) for WORLD_SIZE={size}, got {rank}")
    if local is not None and local < 0:
        raise DistributedError(f"LOCAL_RANK must be >= 0, got {local}")
    return World(rank=rank, size=size, local_rank=rank if local is None else local)


def lone_launch_warning(command: str, environ: Mapping[str, str] | None = None) -> str | None:
    """One line saying that a launcher was asked for several processes but started this one alone, with the
    launches that do start them; None when that is not the case.

    ``accelerate launch --cpu --num_processes N`` (and ``--num_processes N`` on a machine with fewer than
    two GPUs) uses accelerate's single-process launcher: it starts one process and sets no ``WORLD_SIZE``
    or ``RANK``, so `world_from_env` sees a single process and the run is not sharded. That launcher is
    the one that sets ``ACCELERATE_USE_CPU`` (accelerate's multi-process launcher does not), and it sets
    ``MASTER_ADDR`` only when more than one process was asked for: the two together, without
    ``WORLD_SIZE``, are that case. ``command`` is the vps subcommand the recipe names.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" in env or "ACCELERATE_USE_CPU" not in env or "MASTER_ADDR" not in env:
        return None
    return (f"accelerate launch was asked for several processes but started this one alone (its single-process "
            f"launcher, used with --cpu or without --multi_gpu, sets no WORLD_SIZE), so this run is not sharded; "
            f"for N processes run `accelerate launch --multi_gpu --num_processes N -m vps {command} ...` (without "
            f"--cpu: on a machine without GPUs each process runs on the CPU) or `torchrun --nproc_per_node N -m vps "
            f"{command} ...`")


def shard_items(items: Sequence[T], rank: int, size: int) -> list[T]:
    """Rank ``rank``'s share of ``items`` among ``size`` ranks: the positions ``rank``, ``rank + size``, ...

    Every item lands in exactly one share, the shares differ in length by at most one, and an item's
    rank depends only on its position (a rank can get none when there are fewer items than ranks).
    """
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank must be in [0, size) and size >= 1, got rank {rank}, size {size}")
    return list(items[rank::size])


def _no_sync(stage: str) -> None:
    return None


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``size`` in a data-parallel run, with ``sync(stage)``: wait until every rank has
    reached ``stage`` ("start", "finish"); it raises if one cannot (`rank_session` provides it; a
    test can pass its own)."""

    rank: int
    size: int
    sync: Callable[[str], None] = field(default=_no_sync, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"rank must be in [0, size) and size >= 1, got rank {self.rank}, size {self.size}")

    @property
    def primary(self) -> bool:
        """Rank 0: it writes run.json, merges the rows and the report."""
        return self.rank == 0

    def take(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items`` (`shard_items`)."""
        return shard_items(items, self.rank, self.size)


def rank_device(requested: str | None, local_rank: int) -> str | None:
    """The device of the process with ``local_rank`` on its machine: ``cuda:LOCAL_RANK`` when CUDA is
    visible and ``requested`` is None or ``"cuda"`` (made the current CUDA device too, for code that
    says "cuda" without an index), else ``requested`` as given (None: the CPU).

    ValueError when there are fewer visible GPUs than processes on the machine.
    """
    import torch

    if requested not in (None, "cuda") or not torch.cuda.is_available():
        return requested
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"LOCAL_RANK {local_rank}: only {count} CUDA device(s) visible on this machine; start at "
                         f"most {count} process(es) per machine, or pass --device cuda:0 to share one device")
    torch.cuda.set_device(local_rank)
    return f"cuda:{local_rank}"


def _timeout(environ: Mapping[str, str], name: str, default: float) -> float:
    text = environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise DistributedError(f"{name} must be a number of seconds > 0, got {text!r}")
    return value


_STAGE_HELP = {
    "start": "the ranks meet once each has loaded the model and rank 0 has prepared the run directory",
    "finish": "rank 0 merges the rows once every rank has done its items; a rank that failed or was stopped "
              "left its rows in its rows.rank*.jsonl, and rerunning the launch (with any number of processes) "
              "resumes",
}


class _Barrier:
    """``Shard.sync`` of a real launch: gloo's monitored barrier, with the stage's timeout."""

    def __init__(self, world: World, group: Any, start: float, finish: float) -> None:
        self.world, self.group, self.timeouts = world, group, {"start": start, "finish": finish}

    def __call__(self, stage: str) -> None:
        import torch.distributed as dist

        seconds = self.timeouts.get(stage, self.timeouts["start"])
        try:
            dist.monitored_barrier(self.group, timeout=datetime.timedelta(seconds=seconds), wait_all_ranks=True)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())[:300]
            env = FINISH_TIMEOUT_ENV if stage == "finish" else TIMEOUT_ENV
            raise DistributedError(
                f"rank {self.world.rank} of {self.world.size}: the ranks did not all reach the {stage} of the run "
                f"(a rank stopped, or did not arrive within {seconds:g} s, {env}): {detail}. "
                f"{_STAGE_HELP.get(stage, '')}") from None


@contextlib.contextmanager
def rank_session(run: RunDir, world: World | None = None,
                 environ: Mapping[str, str] | None = None) -> Iterator[Shard | None]:
    """Hold what this process needs to work in ``run`` for the block; yields its `Shard`, or None for a
    single process (which holds the directory's ``.lock``, as always).

    A rank takes its own lock, rank 0 also the directory's, before anything else (`RunLockedError` at
    once: a second process of the same rank, or a second run, is refused before it waits for anyone);
    then it joins the launch's gloo process group (`DistributedError` if the others do not come within
    ``VPS_DIST_TIMEOUT`` seconds). A process group set up earlier in this process (by accelerate, say)
    is used through a gloo group of its own and left as it was; one this call made is destroyed at the end.
    """
    env = os.environ if environ is None else environ
    world = world_from_env(env) if world is None else world
    if not world.parallel:
        with run.lock():
            yield None
        return
    start = _timeout(env, TIMEOUT_ENV, DEFAULT_TIMEOUT)
    finish = _timeout(env, FINISH_TIMEOUT_ENV, DEFAULT_FINISH_TIMEOUT)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(run.lock(rank=world.rank))
            if world.rank == 0:
                stack.enter_context(run.lock())
        except RunLockedError as exc:
            raise RunLockedError(f"rank {world.rank}: {exc}") from None
        group = _join(world, start, env, stack)
        yield Shard(world.rank, world.size, sync=_Barrier(world, group, start, finish))


def _join(world: World, seconds: float, env: Mapping[str, str], stack: contextlib.ExitStack) -> Any:
    """The gloo group of the launch (None: the default group), joined within ``seconds``."""
    import torch.distributed as dist

    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; a data-parallel run needs it")
    timeout = datetime.timedelta(seconds=seconds)
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (world.rank, world.size):
            raise DistributedError(f"the process group already set up is rank {dist.get_rank()} of "
                                   f"{dist.get_world_size()}, but RANK / WORLD_SIZE say {world.rank} of {world.size}")
        return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world.size} but {' and '.join(missing)} not set; start the processes "
                               f"with torchrun or accelerate launch, which set them")
    init_env = {name: env[name] for name in ("MASTER_ADDR", "MASTER_PORT")}
    try:
        with _environ(init_env):
            dist.init_process_group("gloo", rank=world.rank, world_size=world.size, timeout=timeout)
    except (RuntimeError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:400]
        raise DistributedError(
            f"rank {world.rank} of {world.size}: could not join the other ranks at {init_env['MASTER_ADDR']}:"
            f"{init_env['MASTER_PORT']} within {seconds:g} s ({TIMEOUT_ENV}): {detail}. Were all {world.size} "
            f"processes started, and did rank 0 start without an error?") from None
    stack.callback(_leave)
    print(f"rank {world.rank} of {world.size}: joined the launch", file=sys.stderr, flush=True)
    return None


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    # init_process_group reads the rendezvous address from os.environ; ``environ`` may be another mapping.
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _leave() -> None:
    import torch.distributed as dist

    with contextlib.suppress(Exception):  # the group of a failed launch may already be broken
        dist.destroy_process_group()
