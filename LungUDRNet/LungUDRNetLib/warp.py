"""Differentiable warping of volumes by voxel displacement fields (torch).

Fields are ``[B, 3, D, H, W]`` in voxels of the tensor's own grid, channel c
displacing along spatial axis c (D, H, W). ``warped(x) = moving(x + u(x))``.
Works on any device and any spatial size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def identity_grid(shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Voxel coordinates ``[1, 3, D, H, W]`` of every voxel (channel c = index along axis c)."""
    axes = [torch.arange(n, device=device, dtype=dtype) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij")).unsqueeze(0)


def warp(moving: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear",
         padding_mode: str = "border") -> torch.Tensor:
    """Sample ``moving`` [B, C, D, H, W] at x + flow(x).

    ``mode="bilinear"`` is trilinear interpolation for images; use ``"nearest"``
    for label maps. Outside the volume the border value is repeated.
    """
    shape = flow.shape[2:]
    coords = identity_grid(tuple(shape), flow.device, flow.dtype) + flow
    scale = torch.tensor([2.0 / max(n - 1, 1) for n in shape], device=flow.device, dtype=flow.dtype)
    normalised = coords * scale.view(1, 3, 1, 1, 1) - 1.0
    # grid_sample wants the last dimension ordered (x, y, z) = (W, H, D).
    grid = normalised.permute(0, 2, 3, 4, 1).flip(-1)
    return F.grid_sample(moving.to(flow.dtype), grid, mode=mode, padding_mode=padding_mode, align_corners=True)


class SpatialTransformer(nn.Module):
    """Module form of :func:`warp`."""

    def __init__(self, mode: str = "bilinear", padding_mode: str = "border") -> None:
        super().__init__()
        self.mode = mode
        self.padding_mode = padding_mode

    def forward(self, moving: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        return warp(moving, flow, self.mode, self.padding_mode)


def integrate_velocity(velocity: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring: displacement of exp(v) for a stationary velocity field (voxels).

    The field is scaled by 2^-steps, then composed with itself ``steps`` times:
    u <- u + u o (id + u).
    """
    flow = velocity / (2 ** steps)
    for _ in range(steps):
        flow = flow + warp(flow, flow, padding_mode="border")
    return flow
