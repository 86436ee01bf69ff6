"""Running ``segment`` and ``eval`` across processes with torch.distributed (``torchrun``).

Under ``torchrun`` (environment ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``) each
process takes ``items[rank::world_size]`` of the dataset, so every image is processed exactly once
(no padding with duplicates, unlike DistributedSampler), runs on ``cuda:LOCAL_RANK`` when CUDA exists
(NCCL) or on the CPU (gloo), and the results are summed with ``all_reduce`` / gathered to rank 0.
Outside ``torchrun`` the same code runs as a single process and every collective is the identity.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class LaunchError(RuntimeError):
    """The torchrun environment is incomplete or does not fit this machine."""


class RankFailed(RuntimeError):
    """Another rank stopped with an error; the message names the rank and its error."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job; world_size 1 means a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence) -> list:
        """This rank's items: every ``world_size``-th from ``rank`` on; the shards partition ``items``."""
        return list(items[self.rank::self.world_size])


def _env_int(env, name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise LaunchError(f"environment variable {name}={env[name]!r} is not an integer") from None


def ranks_from_env(env=None) -> Ranks:
    """The torchrun ranks from the environment; a single process when none of them is set."""
    env = os.environ if env is None else env
    present = [v for v in ENV_VARS if v in env]
    if not present:
        return Ranks()
    if len(present) != len(ENV_VARS):
        missing = ", ".join(v for v in ENV_VARS if v not in env)
        raise LaunchError(f"incomplete torchrun environment: {missing} not set (launch with torchrun)")
    ranks = Ranks(_env_int(env, "RANK"), _env_int(env, "WORLD_SIZE"), _env_int(env, "LOCAL_RANK"))
    if ranks.world_size < 1 or not 0 <= ranks.rank < ranks.world_size or ranks.local_rank < 0:
        raise LaunchError(f"inconsistent torchrun environment: RANK={ranks.rank}, "
                          f"WORLD_SIZE={ranks.world_size}, LOCAL_RANK={ranks.local_rank}")
    return ranks


def rank_device(ranks: Ranks, requested: Optional[torch.device]) -> torch.device:
    """The device a rank runs on: the CPU when asked for or without CUDA, else cuda:LOCAL_RANK (an
    explicit ``cuda:N`` is only accepted when N is LOCAL_RANK)."""
    if requested is not None and requested.type == "cpu":
        return requested
    if not torch.cuda.is_available():
        if requested is not None:
            raise LaunchError(f"--device {requested} was asked for but no CUDA GPU is available")
        return torch.device("cpu")
    if not ranks.distributed:
        return requested or torch.device("cuda")
    if requested is not None and requested.index is not None and requested.index != ranks.local_rank:
        raise LaunchError(f"under torchrun each rank runs on cuda:LOCAL_RANK; --device {requested} does "
                          f"not match LOCAL_RANK={ranks.local_rank} (pass --device cuda)")
    if ranks.local_rank >= torch.cuda.device_count():
        raise LaunchError(f"LOCAL_RANK={ranks.local_rank} but this node has only "
                          f"{torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", ranks.local_rank)


class Group:
    """The process group of one command: ``with Group(ranks, device) as g`` starts torch.distributed
    when ``ranks`` is distributed (NCCL for a CUDA device, else gloo) and ends it on exit."""

    def __init__(self, ranks: Ranks, device: torch.device):
        self.ranks = ranks
        self.device = device
        self._started = False

    def __enter__(self) -> "Group":
        if self.ranks.distributed and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    rank=self.ranks.rank, world_size=self.ranks.world_size)
            self._started = True
        return self

    def __exit__(self, *exc) -> bool:
        if self._started:
            dist.destroy_process_group()
            self._started = False
        return False

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks (in place); integers stay exact."""
        if self.ranks.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def check_all(self, error: Optional[BaseException]) -> None:
        """Every rank calls this after its share of the work with the exception it hit, or None.
        A rank's own exception is raised again; a rank without one raises ``RankFailed`` when another
        rank failed. Holding errors until this point keeps a failed rank from leaving the others
        waiting forever in a collective."""
        if not self.ranks.distributed:
            if error is not None:
                raise error
            return
        messages = self.gather(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        for rank, message in enumerate(messages):
            if message:
                raise RankFailed(f"rank {rank} of {self.ranks.world_size} failed: {message}")

    def run_all(self, work: Callable[[], None]) -> None:
        """``work()`` on this rank, then :meth:`check_all` with the exception it raised (held until
        every rank is done; raised at once when not distributed)."""
        error = None
        try:
            work()
        except Exception as e:
            if not self.ranks.distributed:
                raise
            error = e
        self.check_all(error)

    def gather(self, obj: Any) -> List[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.ranks.distributed:
            return [obj]
        out: List[Any] = [None] * self.ranks.world_size
        dist.all_gather_object(out, obj)
        return out


def single_process(device: torch.device) -> Group:
    return Group(Ranks(), device)
