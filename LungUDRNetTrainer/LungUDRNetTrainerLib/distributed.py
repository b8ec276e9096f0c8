"""PyTorch's distributed engine for ``torchrun``: process group, device per rank, collectives.

Under ``torchrun --nproc_per_node=N`` (environment ``WORLD_SIZE`` > 1) every
process joins one process group: NCCL with one GPU per process
(``LOCAL_RANK``), gloo on CPU-only machines. A plain ``python`` run is a group
of one and every helper here is then a no-op.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from LungUDRNetLib.ranks import Ranks

RELEASE_WAIT_S = 10.0  # the longest all_sum waits for gloo's worker thread to let go of its tensor


@dataclass(frozen=True)
class Context:
    """This process's place in the run: rank, number of processes and compute device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes logs and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> Context:
    """Join the ``torchrun`` process group if there is one; pick this process's device."""
    ranks = Ranks.from_env()
    target = ranks.device(device)
    if not ranks.distributed:
        return Context(0, 1, target)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    return Context(dist.get_rank(), dist.get_world_size(), target)


def teardown(context: Context) -> None:
    """Leave the process group (after the last collective)."""
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, context: Context) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when there are several processes."""
    if not context.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[context.device.index] if context.device.type == "cuda" else None)


def all_sum(values: list[float], context: Context) -> list[float]:
    """Element-wise sum of ``values`` over all processes.

    Under gloo this returns only once the backend's worker thread has let go of the tensor. Letting go takes
    the GIL, and when the interpreter is already shutting down by then (a rank exits right after its last
    sum) the thread is killed inside a C++ destructor and the process aborts ("terminate called without an
    active exception"): ``destroy_process_group`` does not stop gloo's threads once DistributedDataParallel
    has used the group.
    """
    if not context.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=context.device)
    dist.all_reduce(tensor)
    if dist.get_backend() == "gloo":
        deadline = time.monotonic() + RELEASE_WAIT_S
        while tensor._use_count() > 1 and time.monotonic() < deadline:  # the finished collective still holds it
            time.sleep(0.001)
    return tensor.tolist()


def any_process(flag: bool, context: Context) -> bool:
    """True on every process if ``flag`` is true on at least one (e.g. a Ctrl-C seen by one rank)."""
    return all_sum([float(flag)], context)[0] > 0


def barrier(context: Context) -> None:
    if context.distributed:
        dist.barrier()
