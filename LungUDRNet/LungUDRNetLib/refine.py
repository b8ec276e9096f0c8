"""Instance refinement: a few Adam steps on one pair, starting from the network's prediction.

The voxel flow itself is the optimised variable (the network's weights stay
untouched); the objective is the training loss of :mod:`.losses`, so a
refined field is what the network would predict if it fitted this pair
perfectly. Tensors follow :mod:`.warp`: fields [B, 3, D, H, W] in voxels,
images [B, 1, D, H, W] normalised to [0, 1].
"""

from __future__ import annotations

import torch

from .losses import registration_loss
from .warp import warp


def refine(flow: torch.Tensor, fixed01: torch.Tensor, moving01: torch.Tensor, steps: int = 30,
           lr: float = 0.1, similarity: str = "mse", smoothness_weight: float = 1.0,
           folding_weight: float = 0.0) -> torch.Tensor:
    """Minimise ``registration_loss(fixed, moving o (id + flow), flow)`` over the flow by Adam.

    ``lr`` is the Adam step in voxels (Adam's steps are about ``lr`` per
    voxel and iteration). The default similarity is MSE: on a CPU the windowed
    ``"lncc"`` costs seconds per step at 96^3 (its 9^3 box filter is a dense
    convolution). Returns the refined flow (detached, same shape,
    device and dtype as ``flow``); ``steps=0`` returns a copy of ``flow``.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    variable = flow.detach().clone().requires_grad_(True)
    fixed, moving = fixed01.detach().to(flow), moving01.detach().to(flow)
    optimiser = torch.optim.Adam([variable], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimiser.zero_grad(set_to_none=True)
            loss = registration_loss(fixed, warp(moving, variable), variable, similarity,
                                     smoothness_weight, folding_weight)["total"]
            loss.backward()
            optimiser.step()
    return variable.detach()
