"""UDRNet: a VoxelMorph-style 3D encoder-decoder with scHAF skip connections.

Encoder level (paper Eq. 1):  E(x) = MaxPool(ReLU(conv3(ReLU(conv3(x)))))
Decoder level (paper Eq. 2):  D(x) = ConvTranspose3(ReLU(conv3(ReLU(conv3(x)))))
Each skip connection passes the encoder feature F through :class:`SCHAF`
(paper Eq. 4) before it is concatenated with the upsampled decoder feature.
A final 3x3x3 convolution, initialised near zero, gives the displacement in
voxels of the input grid, channels ordered like the spatial axes (D, H, W).
``attention=False`` gives the plain 3D VoxelMorph baseline (identity skips).
:class:`RegistrationUNet` is the skeleton that UDRNet shares with the
paper's comparison networks (:mod:`LungUDRNetLib.comparison_nets`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .warp import integrate_velocity


@dataclass(frozen=True)
class UDRNetConfig:
    """Architecture hyper-parameters; stored in every checkpoint."""

    encoder_channels: tuple[int, ...] = (16, 32, 32, 32)
    bottleneck_channels: int = 32
    decoder_channels: tuple[int, ...] = (32, 32, 32, 16)
    attention: bool = True
    reduction: int = 4
    integration_steps: int = 0

    def __post_init__(self) -> None:
        if len(self.encoder_channels) != len(self.decoder_channels):
            raise ValueError("encoder_channels and decoder_channels need the same number of levels")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "UDRNetConfig":
        return cls(**with_channel_tuples(data))


def with_channel_tuples(data: dict) -> dict:
    """A copy of a stored architecture config with its channel lists as tuples of int (as in the dataclasses)."""
    data = dict(data)
    for key in ("encoder_channels", "decoder_channels"):
        data[key] = tuple(int(v) for v in data[key])
    return data


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3x3 convolutions, each followed by ReLU."""
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv3d(out_channels, out_channels, 3, padding=1), nn.ReLU(inplace=True),
    )


class SCHAF(nn.Module):
    """Spatial and channel hybrid attention fusion of a skip feature F [B, C, D, H, W].

    F_a = F * sigmoid(conv1x1(F))                      one weight per voxel
    F_b = F * sigmoid(MLP([maxpool(F), avgpool(F)]))   one weight per channel
    out = conv3x3(concat[F_a * F_b, F_a + F_b, max(F_a, F_b)])
    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.voxel_gate = nn.Conv3d(channels, 1, kernel_size=1)
        hidden = max(2 * channels // reduction, 1)
        self.channel_mlp = nn.Sequential(
            nn.Linear(2 * channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels),
        )
        self.fuse = nn.Conv3d(3 * channels, channels, kernel_size=3, padding=1)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        spatial = feature * torch.sigmoid(self.voxel_gate(feature))
        pooled = torch.cat([feature.amax(dim=(2, 3, 4)), feature.mean(dim=(2, 3, 4))], dim=1)
        weights = torch.sigmoid(self.channel_mlp(pooled))[:, :, None, None, None]
        channel = feature * weights
        hybrid = torch.cat([spatial * channel, spatial + channel, torch.maximum(spatial, channel)], dim=1)
        return self.fuse(hybrid)


def _match_size(upsampled: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Crop, then replicate-pad, ``upsampled`` to the spatial size of ``reference`` (odd sizes)."""
    depth, height, width = reference.shape[2:]
    upsampled = upsampled[..., :depth, :height, :width]
    pad = [0, width - upsampled.shape[4], 0, height - upsampled.shape[3], 0, depth - upsampled.shape[2]]
    return F.pad(upsampled, pad, mode="replicate") if any(pad) else upsampled


class RegistrationUNet(nn.Module):
    """The shared skeleton: a [moving, fixed] pair [B, 2, D, H, W] in, the voxel displacement [B, 3, D, H, W] out.

    Encoder levels of :meth:`block` then max pooling; :meth:`bottleneck_module` on the
    deepest pooled map; decoder levels of :meth:`block` then a transposed
    convolution, each joined with its encoder level's feature passed through
    :meth:`skip_gate`; a last block and a 3x3x3 convolution initialised near
    zero. Subclasses choose the block, the gate and the bottleneck. ``config``
    needs ``encoder_channels``, ``bottleneck_channels``, ``decoder_channels``
    and ``integration_steps``.
    """

    def __init__(self, config) -> None:
        super().__init__()
        self.config = cfg = config
        self.encoders = nn.ModuleList()
        channels = 2
        for width in cfg.encoder_channels:
            self.encoders.append(self.block(channels, width))
            channels = width
        self.pool = nn.MaxPool3d(2, ceil_mode=False)
        self.bottleneck = self.bottleneck_module(channels)
        level_outputs = [cfg.bottleneck_channels, *cfg.decoder_channels[:-1]]
        self.skips = nn.ModuleList(self.skip_gate(width, signal) for width, signal in
                                   zip(cfg.encoder_channels, reversed(level_outputs)))
        self.decoders = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for out_channels, skip_channels in zip(level_outputs, reversed(cfg.encoder_channels)):
            self.decoders.append(self.block(channels, out_channels))
            self.upsamplers.append(
                nn.ConvTranspose3d(out_channels, out_channels, 3, stride=2, padding=1, output_padding=1))
            channels = out_channels + skip_channels
        self.head = self.block(channels, cfg.decoder_channels[-1])
        self.flow = nn.Conv3d(cfg.decoder_channels[-1], 3, kernel_size=3, padding=1)
        nn.init.normal_(self.flow.weight, std=1e-5)
        nn.init.zeros_(self.flow.bias)

    def block(self, in_channels: int, out_channels: int) -> nn.Module:
        """The convolution block of every encoder and decoder level (default: :func:`double_conv`)."""
        return double_conv(in_channels, out_channels)

    def skip_gate(self, channels: int, signal_channels: int) -> nn.Module:
        """The module on a skip connection of ``channels``; ``signal_channels``: the decoder's upsampled
        feature at that level (default: none, the plain skip)."""
        return nn.Identity()

    def bottleneck_module(self, channels: int) -> nn.Module:
        """The module between the deepest pooled map and the decoder (default: none)."""
        return nn.Identity()

    def gate(self, level: int, skip: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        """The skip feature of encoder ``level`` as the decoder joins it; ``signal``: the upsampled decoder
        feature of the same size."""
        return self.skips[level](skip)

    @property
    def minimum_size(self) -> int:
        """Smallest spatial size the network accepts along each axis (voxels)."""
        return 2 ** len(self.config.encoder_channels)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        x = torch.cat([moving, fixed], dim=1)
        features = []
        for encoder in self.encoders:
            x = encoder(x)
            features.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        # The deepest map feeds the first decoder level; each level's output
        # is upsampled and joined with the next shallower (gated) skip.
        for level, decoder, upsample in zip(reversed(range(len(features))), self.decoders, self.upsamplers):
            x = _match_size(upsample(decoder(x)), features[level])
            x = torch.cat([x, self.gate(level, features[level], x)], dim=1)
        flow = self.flow(self.head(x))
        if self.config.integration_steps:
            flow = integrate_velocity(flow, self.config.integration_steps)
        return flow


class UDRNet(RegistrationUNet):
    """UDRNet: double-convolution levels with :class:`SCHAF` on every skip (``attention=False``: 3D VoxelMorph)."""

    def __init__(self, config: UDRNetConfig | None = None, **overrides) -> None:
        base = config or UDRNetConfig()
        super().__init__(UDRNetConfig(**{**base.to_dict(), **overrides}) if overrides else base)

    def skip_gate(self, channels: int, signal_channels: int) -> nn.Module:
        return SCHAF(channels, self.config.reduction) if self.config.attention else nn.Identity()
