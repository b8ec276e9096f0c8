"""Training losses on torch tensors [B, C, D, H, W]; every one runs on any device.

Similarity losses are to be minimised (lower = more similar). Fields are
voxel displacements [B, 3, D, H, W].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mse(fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
    """Mean squared intensity difference."""
    return torch.mean((fixed - warped) ** 2)


def global_ncc(fixed: torch.Tensor, warped: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Negative normalised cross-correlation over each whole volume, averaged over the batch."""
    f = fixed.flatten(1) - fixed.flatten(1).mean(dim=1, keepdim=True)
    w = warped.flatten(1) - warped.flatten(1).mean(dim=1, keepdim=True)
    ncc = (f * w).sum(dim=1) / torch.sqrt((f * f).sum(dim=1) * (w * w).sum(dim=1) + eps)
    return -ncc.mean()


def box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over a cubic ``window`` around each voxel (zero padding), as three separable 1D passes."""
    pad = window // 2
    for kernel in ((window, 1, 1), (1, window, 1), (1, 1, window)):
        padding = tuple(pad if k > 1 else 0 for k in kernel)
        x = F.avg_pool3d(x, kernel, stride=1, padding=padding, count_include_pad=True)
    return x


def local_ncc(fixed: torch.Tensor, warped: torch.Tensor, window: int = 9, eps: float = 1e-5) -> torch.Tensor:
    """Negative squared local NCC in cubic windows of ``window`` voxels (VoxelMorph's NCC loss).

    cc = cov(f, w)^2 / (var(f) var(w)) per window, averaged over voxels.
    """
    mean_f, mean_w = box_mean(fixed, window), box_mean(warped, window)
    cross = box_mean(fixed * warped, window) - mean_f * mean_w
    var_f = box_mean(fixed * fixed, window) - mean_f * mean_f
    var_w = box_mean(warped * warped, window) - mean_w * mean_w
    return -torch.mean(cross * cross / (var_f * var_w + eps))


def gradient_smoothness(flow: torch.Tensor) -> torch.Tensor:
    """Diffusion regulariser: mean squared forward difference of the field along each axis."""
    dz = flow[:, :, 1:, :, :] - flow[:, :, :-1, :, :]
    dy = flow[:, :, :, 1:, :] - flow[:, :, :, :-1, :]
    dx = flow[:, :, :, :, 1:] - flow[:, :, :, :, :-1]
    return (dz.pow(2).mean() + dy.pow(2).mean() + dx.pow(2).mean()) / 3.0


def jacobian_determinant(flow: torch.Tensor) -> torch.Tensor:
    """det(I + grad u) [B, D-1, H-1, W-1] of x -> x + u(x) by forward differences (voxel units)."""
    dz = flow[:, :, 1:, :-1, :-1] - flow[:, :, :-1, :-1, :-1]
    dy = flow[:, :, :-1, 1:, :-1] - flow[:, :, :-1, :-1, :-1]
    dx = flow[:, :, :-1, :-1, 1:] - flow[:, :, :-1, :-1, :-1]
    # Column c of the Jacobian is the derivative along axis c; row r is component r.
    jac = torch.stack([dz, dy, dx], dim=2)  # [B, 3 (component), 3 (axis), ...]
    jac = jac + torch.eye(3, device=flow.device, dtype=flow.dtype).view(1, 3, 3, 1, 1, 1)
    jac = jac.permute(0, 3, 4, 5, 1, 2)
    return torch.linalg.det(jac)


def folding_penalty(flow: torch.Tensor) -> torch.Tensor:
    """Mean of relu(-det J): zero for a field without folding."""
    return torch.relu(-jacobian_determinant(flow)).mean()


def supervised_flow_error(flow: torch.Tensor, true_flow: torch.Tensor, has_truth: torch.Tensor) -> torch.Tensor:
    """Mean squared difference (voxels^2) of predicted and known flows [B, 3, D, H, W], over the
    pairs whose ``has_truth`` [B] is set (0 when none is)."""
    weights = has_truth.to(flow.dtype).view(-1, 1, 1, 1, 1)
    per_voxel = (flow - true_flow).pow(2) * weights
    return per_voxel.sum() / (weights.sum() * flow[0].numel()).clamp(min=1.0)


SIMILARITY_LOSSES = {"mse": mse, "ncc": global_ncc, "lncc": local_ncc}


def registration_loss(fixed: torch.Tensor, warped: torch.Tensor, flow: torch.Tensor, similarity: str = "lncc",
                      smoothness_weight: float = 1.0, folding_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """The unsupervised objective: similarity + weighted smoothness (+ weighted folding).

    Returns the terms and their weighted sum under ``"total"``.
    """
    terms = {"similarity": SIMILARITY_LOSSES[similarity](fixed, warped),
             "smoothness": gradient_smoothness(flow)}
    total = terms["similarity"] + smoothness_weight * terms["smoothness"]
    if folding_weight:
        terms["folding"] = folding_penalty(flow)
        total = total + folding_weight * terms["folding"]
    terms["total"] = total
    return terms
