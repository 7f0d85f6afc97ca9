"""DDP plumbing: torchrun's env:// rendezvous, and reductions that are no-ops in one process.

`torchrun --nproc_per_node N -m imattrain run ...` sets RANK, WORLD_SIZE and LOCAL_RANK (and
MASTER_ADDR/PORT, also across nodes); without them the single-process path is unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from imatdata.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> World:
    """The process's place in the job, from torchrun's environment (1 process when unset)."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError("RANK/WORLD_SIZE/LOCAL_RANK must be integers (launch with torchrun)") from None
    return World(rank=rank, world_size=world_size, local_rank=local_rank)


def init(world: World, device: torch.device) -> None:
    """Join the process group (nccl on CUDA, gloo on CPU) when launched by torchrun."""
    if not world.distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, init_method="env://", rank=world.rank,
                            world_size=world.world_size,
                            device_id=device if device.type == "cuda" else None)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sum over ranks (identity in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_sum_tensor(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_true(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any (e.g. a non-finite loss on one rank)."""
    return all_sum([1.0 if flag else 0.0], device)[0] > 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
