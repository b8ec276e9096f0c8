"""This process's place under ``torchrun`` and its compute device (shared by ``register --pairs`` and the trainer).

``torchrun`` sets ``RANK`` (this process among all), ``WORLD_SIZE`` (how many)
and ``LOCAL_RANK`` (this process on its machine, i.e. its GPU index). A plain
run is rank 0 of 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .errors import InputError
from .registration import resolve_device


@dataclass(frozen=True)
class Ranks:
    """Rank, number of processes and GPU index on this machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Ranks":
        """Read from ``torchrun``'s environment; one-line :class:`.InputError` for values it would not set."""
        try:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
            rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        except ValueError:
            raise InputError("environment: RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers (as torchrun "
                             "sets them)") from None
        if not 0 <= rank < world_size:
            raise InputError(f"environment: RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world_size})")
        return cls(rank, world_size, local_rank)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self, device: str = "auto") -> torch.device:
        """``device`` resolved (:func:`.registration.resolve_device`); a CUDA device under ``torchrun`` is
        this process's own GPU, ``cuda:LOCAL_RANK``."""
        target = resolve_device(device)
        if self.distributed and target.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return target
