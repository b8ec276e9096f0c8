"""The ``voxelmorph`` package's network behind UDRNet's interface, for training and benchmarking.

:class:`VoxelMorphNet` wraps ``voxelmorph.nn.models.VxmPairwise`` (neurite
``BasicUNet`` backbone, no integration) so that the trainer and the bench use it
exactly like :class:`LungUDRNetLib.model.UDRNet`: ``forward(moving, fixed)``
returns the voxel flow [B, 3, D, H, W] (channel c along axis c) that
:func:`LungUDRNetLib.warp.warp` applies. Trained this way, the package's network
learns our field convention; its own spatial transformer is never used.
Checkpoints are ordinary LungUDRNet checkpoints whose ``model_config`` holds
``architecture: voxelmorph-package``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import ModelError

ARCHITECTURE = "voxelmorph-package"


@dataclass(frozen=True)
class VoxelMorphNetConfig:
    """Features per U-Net level (encoder and, mirrored, decoder) of the package's ``BasicUNet``."""

    features: tuple[int, ...] = (16, 16, 16, 16, 16)
    architecture: str = ARCHITECTURE

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "VoxelMorphNetConfig":
        data = dict(data)
        if data.get("architecture") != ARCHITECTURE:
            raise ValueError(f"architecture {data.get('architecture')!r} is not {ARCHITECTURE!r}")
        return cls(features=tuple(int(v) for v in data["features"]))


def is_voxelmorph_config(model_config: dict) -> bool:
    """Whether a checkpoint's ``model_config`` describes this wrapper rather than UDRNet."""
    return isinstance(model_config, dict) and model_config.get("architecture") == ARCHITECTURE


class VoxelMorphNet(nn.Module):
    """``VxmPairwise(ndim=3, integration_steps=0)``; input order (moving, fixed) as UDRNet."""

    def __init__(self, config: VoxelMorphNetConfig | None = None) -> None:
        try:
            import voxelmorph as vxm  # optional: only the bench and this baseline need it
        except ImportError:
            raise ModelError("model voxelmorph-package: the voxelmorph package is not installed; "
                             "pip install voxelmorph==0.3.4 (or the project's bench extra)") from None
        super().__init__()
        self.config = config or VoxelMorphNetConfig()
        self.network = vxm.nn.models.VxmPairwise(ndim=3, source_channels=1, target_channels=1,
                                                 nb_features=list(self.config.features), integration_steps=0)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return self.network(moving, fixed, return_field_type="displacement")
