"""Which network a checkpoint's ``model_config`` describes: its model name, its method name and a fresh instance.

Model names are what ``lungudrnet train --model`` takes: ``udrnet`` and
``voxelmorph`` (UDRNet without scHAF, the paper's ablation baseline) are
:class:`~LungUDRNetLib.model.UDRNet` with ``attention`` on or off; ``attunet``,
``resunet`` and ``transunet`` are :class:`~LungUDRNetLib.comparison_nets.ComparisonNet`;
``voxelmorph-package`` is the voxelmorph package's network, a bench peer that
``register`` does not load.
"""

from __future__ import annotations

from torch import nn

from .comparison_nets import ARCHITECTURES, ComparisonNet, ComparisonNetConfig
from .model import RegistrationUNet, UDRNet, UDRNetConfig
from .voxelmorph_net import ARCHITECTURE as PACKAGE_ARCHITECTURE

# model name -> the paper's method name
METHOD_NAMES = {"udrnet": "UDRNet (3D VoxelMorph + scHAF)", "voxelmorph": "3D VoxelMorph", "attunet": "3D AttUNet",
                "resunet": "3D ResUNet", "transunet": "3D TransUNet",
                PACKAGE_ARCHITECTURE: "VoxelMorph (voxelmorph package)"}
MODEL_NAMES = tuple(METHOD_NAMES)
PAPER_ORDER = ("attunet", "resunet", "voxelmorph", "transunet", "udrnet")  # the rows of its Tables 1 and 2


def model_name(model_config: dict) -> str:
    """The model name of a checkpoint's ``model_config`` (UDRNet's carries no ``architecture`` key)."""
    architecture = model_config.get("architecture")
    if architecture is None:
        return "udrnet" if model_config.get("attention", True) else "voxelmorph"
    return architecture


def config_for(name: str, encoder_channels: tuple[int, ...], bottleneck_channels: int,
               decoder_channels: tuple[int, ...], integration_steps: int = 0,
               reduction: int = 4) -> UDRNetConfig | ComparisonNetConfig:
    """The architecture config of model ``name`` at the given widths (``reduction``: UDRNet's scHAF only)."""
    widths = dict(encoder_channels=tuple(encoder_channels), bottleneck_channels=bottleneck_channels,
                  decoder_channels=tuple(decoder_channels), integration_steps=integration_steps)
    if name in ARCHITECTURES:
        return ComparisonNetConfig(architecture=name, **widths)
    if name in ("udrnet", "voxelmorph"):
        return UDRNetConfig(attention=name == "udrnet", reduction=reduction, **widths)
    raise ValueError(f"model {name!r} is not one of {', '.join(n for n in MODEL_NAMES if n != PACKAGE_ARCHITECTURE)}")


def network_from_config(model_config: dict) -> RegistrationUNet:
    """A freshly initialised network for a checkpoint's ``model_config`` (any model but the package's)."""
    name = model_name(model_config)
    if name in ARCHITECTURES:
        return ComparisonNet(ComparisonNetConfig.from_dict(model_config))
    if name in ("udrnet", "voxelmorph"):
        return UDRNet(UDRNetConfig.from_dict(model_config))
    raise ValueError(f"architecture {name!r} is not one that register loads")


def parameter_count(network: nn.Module) -> int:
    """Trainable parameters of ``network``."""
    return sum(p.numel() for p in network.parameters() if p.requires_grad)
