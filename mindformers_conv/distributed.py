"""Under `torchrun`: the ranks share the output files, and commit them only when every rank succeeded.

Each rank plans the whole conversion (headers only), writes the whole output files assigned to it (the same
assignment on every rank: largest first, to the least loaded rank), and the ranks agree after each step:
when any rank failed, every rank removes what it wrote and stops with that rank's error. Rank 0 writes the
index / marker files last. torch.distributed (gloo, CPU) is imported only when torchrun's variables are set.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator

from .errors import ConvError

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return all(k in os.environ for k in TORCHRUN_VARIABLES) and int(os.environ["WORLD_SIZE"]) > 1


class RankFailed(ConvError):
    """Another rank failed; this one stops with its exit code and message."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def assign(sizes: list[int], ranks: int) -> list[int]:
    """The rank of each file: largest first to the least loaded rank (ties: the lower rank, file order)."""
    load = [0] * ranks
    owner = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        rank = min(range(ranks), key=lambda r: load[r])
        owner[index] = rank
        load[rank] += sizes[index]
    return owner


@dataclass
class Team:
    """The processes writing one output together (one process when not under torchrun)."""

    rank: int = 0
    size: int = 1
    failed: bool = False  # a step failed on some rank: every rank knows, and settles before it exits

    @property
    def lead(self) -> bool:
        """Rank 0: writes the index / marker files, verifies, carries config files."""
        return self.rank == 0

    def share(self, sizes: list[int]) -> list[int]:
        """Indices of the files this rank writes."""
        return [i for i, rank in enumerate(assign(sizes, self.size)) if rank == self.rank]

    def step(self, work: Callable[[], None]) -> None:
        """Run this rank's part of a step, then hear from every rank: all raise when any failed."""
        if self.size == 1:
            work()
            return
        try:
            work()
        except BaseException as e:
            self.failed = True
            self._gather((getattr(e, "exit_code", 1 if isinstance(e, Exception) else 130), _describe(e)))
            raise
        failed = [(rank, report) for rank, report in enumerate(self._gather(None)) if report is not None]
        if failed:
            self.failed = True
            rank, (code, message) = failed[0]
            raise RankFailed(f"rank {rank} of {self.size} failed ({message}); nothing was written", code)

    def settle(self) -> None:
        """After a failed step and this rank's clean-up: wait for every rank's (torchrun stops the other
        ranks as soon as one exits)."""
        if self.failed:
            import torch.distributed as dist

            dist.barrier()

    def _gather(self, report: tuple[int, str] | None) -> list:
        import torch.distributed as dist

        reports: list = [None] * self.size
        dist.all_gather_object(reports, report)
        return reports


def _describe(e: BaseException) -> str:
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return str(e) or type(e).__name__


@contextlib.contextmanager
def joined() -> Iterator[Team]:
    """The team of this process: torchrun's process group (gloo, joined here and left after), or one process."""
    if not launched():
        yield Team()
        return
    import torch.distributed as dist

    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo")
    try:
        yield Team(dist.get_rank(), dist.get_world_size())
    finally:
        if own:
            dist.destroy_process_group()
