"""The paper's comparison networks as displacement predictors on UDRNet's skeleton (its Tables 1 and 2).

Each is a :class:`LungUDRNetLib.model.RegistrationUNet`: the same input pair,
depth, channel widths, upsampling, output convolution and voxel-flow convention
as UDRNet, so that they train, load and register exactly like it. Only the
part each paper is known for differs:

* ``attunet`` (3D Attention U-Net, Oktay et al. 2018): an additive attention
  gate on every skip connection, alpha = sigmoid(psi(ReLU(W_x x + W_g g))),
  where g is the decoder's upsampled feature at that level; the skip is x * alpha;
* ``resunet`` (3D residual U-Net): every encoder and decoder block is residual,
  ReLU(conv3(ReLU(conv3(x))) + shortcut(x)), the shortcut a 1x1x1 convolution
  where the channel count changes;
* ``transunet`` (3D TransUNet, Chen et al. 2021): the CNN encoder's deepest
  pooled map is read as one token per voxel, given a learnt position embedding
  (trilinearly resized to the grid, so any input size works) and passed
  through pre-norm transformer encoder layers before the decoder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .model import RegistrationUNet, with_channel_tuples

ARCHITECTURES = ("attunet", "resunet", "transunet")
POSITION_GRID = 8  # voxels per axis of the learnt position embedding before resizing


@dataclass(frozen=True)
class ComparisonNetConfig:
    """Architecture hyper-parameters of a comparison network; stored in every checkpoint."""

    architecture: str = "attunet"
    encoder_channels: tuple[int, ...] = (16, 32, 32, 32)
    bottleneck_channels: int = 32
    decoder_channels: tuple[int, ...] = (32, 32, 32, 16)
    integration_steps: int = 0
    transformer_layers: int = 2
    transformer_heads: int = 4

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture {self.architecture!r} is not one of {', '.join(ARCHITECTURES)}")
        if len(self.encoder_channels) != len(self.decoder_channels):
            raise ValueError("encoder_channels and decoder_channels need the same number of levels")
        if self.transformer_layers < 1 or self.transformer_heads < 1:
            raise ValueError("transformer_layers and transformer_heads must be at least 1")
        if self.architecture == "transunet" and self.encoder_channels[-1] % self.transformer_heads:
            raise ValueError(f"transunet: the deepest encoder level's {self.encoder_channels[-1]} channels do not "
                             f"split into {self.transformer_heads} transformer heads")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ComparisonNetConfig":
        return cls(**with_channel_tuples(data))


class AttentionGate(nn.Module):
    """Additive attention gate (Oktay et al. 2018): one weight in (0, 1) per voxel of the skip feature."""

    def __init__(self, channels: int, signal_channels: int) -> None:
        super().__init__()
        inner = max(channels // 2, 1)
        self.skip_projection = nn.Conv3d(channels, inner, kernel_size=1)
        self.signal_projection = nn.Conv3d(signal_channels, inner, kernel_size=1, bias=False)
        self.weight = nn.Conv3d(inner, 1, kernel_size=1)

    def forward(self, skip: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        joint = F.relu(self.skip_projection(skip) + self.signal_projection(signal))
        return skip * torch.sigmoid(self.weight(joint))


class ResidualBlock(nn.Module):
    """Two 3x3x3 convolutions with a shortcut around them: ReLU(conv(ReLU(conv(x))) + shortcut(x))."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv3d(out_channels, out_channels, 3, padding=1),
        )
        self.shortcut = (nn.Identity() if in_channels == out_channels else
                         nn.Conv3d(in_channels, out_channels, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class BottleneckTransformer(nn.Module):
    """Transformer encoder layers over the voxels of a feature map [B, C, d, h, w] (one token per voxel)."""

    def __init__(self, channels: int, layers: int, heads: int) -> None:
        super().__init__()
        self.position = nn.Parameter(torch.zeros(1, channels, POSITION_GRID, POSITION_GRID, POSITION_GRID))
        nn.init.trunc_normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(channels, heads, dim_feedforward=4 * channels, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, *size = x.shape
        position = F.interpolate(self.position, size=size, mode="trilinear", align_corners=False)
        tokens = (x + position).flatten(2).transpose(1, 2)  # [B, d*h*w, C]
        return self.layers(tokens).transpose(1, 2).reshape(batch, channels, *size)


class ComparisonNet(RegistrationUNet):
    """One of :data:`ARCHITECTURES`, chosen by ``config.architecture``."""

    def __init__(self, config: ComparisonNetConfig | None = None) -> None:
        super().__init__(config or ComparisonNetConfig())

    def block(self, in_channels: int, out_channels: int) -> nn.Module:
        if self.config.architecture == "resunet":
            return ResidualBlock(in_channels, out_channels)
        return super().block(in_channels, out_channels)

    def skip_gate(self, channels: int, signal_channels: int) -> nn.Module:
        if self.config.architecture == "attunet":
            return AttentionGate(channels, signal_channels)
        return nn.Identity()

    def bottleneck_module(self, channels: int) -> nn.Module:
        if self.config.architecture == "transunet":
            return BottleneckTransformer(channels, self.config.transformer_layers, self.config.transformer_heads)
        return nn.Identity()

    def gate(self, level: int, skip: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        if self.config.architecture == "attunet":
            return self.skips[level](skip, signal)
        return super().gate(level, skip, signal)
