"""One process, or one of several under ``torchrun``: the rank, the world, the device.

``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK; without them (or with WORLD_SIZE 1) training
runs in this process alone and nothing here talks to other processes. The backend is NCCL when
there is a GPU, gloo on CPUs.

The process group, once started, stays up until the process ends, and the ``edgecap`` command
(``python -m edgecap`` too) ends a rank's process without the interpreter's teardown
(``edgecap.cli.run_command``), whether the command succeeded or not: PyTorch's gloo
group cannot be taken down safely while its threads still release the last collectives'
tensors. Destroyed when ``train`` returned, a rank deadlocked (the group's destructor, holding
the GIL, waits for a thread that needs the GIL); left to the interpreter's exit, a rank now and
then aborted after a finished run ('terminate called without an active exception').
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(t)
        return t.tolist()

    def from_main(self, value):
        """Rank 0's ``value``, on every rank."""
        if not self.active:
            return value
        box = [value]
        torch_dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]


def world_size(env=os.environ) -> int:
    """How many processes torchrun started (1 without torchrun)."""
    return int(env.get("WORLD_SIZE", "1"))


def setup(env=os.environ) -> Dist:
    """The Dist of this process, starting the process group when torchrun launched several."""
    world = world_size(env)
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device)


def rank_share(n_items: int, rank: int, world: int) -> list[int]:
    """The positions of a global batch of ``n_items`` that ``rank`` trains on: every
    ``world``-th, so the ranks' shares are disjoint and together the whole batch."""
    return list(range(rank, n_items, world))
