"""Training configuration: the paper's preset, a fast CPU preset, file and command-line overrides.

Resolution order (later wins): :class:`TrainConfig` defaults (= the paper's
settings) <- ``--preset`` <- ``--config`` file (YAML or TOML, flat keys) <- command-line
flags. The resolved configuration is written into the run folder as
``config.yaml`` and into every checkpoint's metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from LungUDRNetLib.errors import InputError
from LungUDRNetLib.io import atomic_path
from LungUDRNetLib.comparison_nets import ComparisonNetConfig
from LungUDRNetLib.model import UDRNetConfig
from LungUDRNetLib.networks import MODEL_NAMES, config_for
from LungUDRNetLib.preprocess import GRID_MODES, PreprocessConfig
from LungUDRNetLib.voxelmorph_net import ARCHITECTURE as PACKAGE_ARCHITECTURE, VoxelMorphNetConfig

_MODEL = UDRNetConfig()
_PREPROCESS = PreprocessConfig()


def _option(default, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    """Every training hyper-parameter. Defaults reproduce the paper (sections 4.1 and 4.2)."""

    # data
    data: str | None = _option(None, "Learn2Reg dataset folder (dataset JSON, imagesTr/, masksTr/, ...)")
    pairs: str | None = _option(None, "pairs CSV: fixed,moving[,fixed_mask,moving_mask,...][,split]")
    val_fraction: float = _option(0.2, "share of training pairs held out when the data has no validation pairs")
    augment_pairs: int = _option(0, "synthetic pairs per real pair and epoch (fixed image warped by a "
                                    "random smooth field); 0 = off")
    augment_amplitude: float = _option(4.0, "std of the random field's control-point displacements "
                                            "(network-grid voxels)")
    num_workers: int = _option(4, "data-loading worker processes per GPU/process")
    # preprocessing: windowing, min-max and the 192x192x208 -> 192^3 crop
    grid_shape: tuple[int, int, int] = _option((192, 192, 192), "network grid (D, H, W) = (z, y, x) voxels")
    grid_mode: str = _option("crop", "crop: centred block at the image spacing; fit: whole image (or "
                                     "lung box) resampled onto the grid; canonical: patient-aligned grid at "
                                     "grid_spacing_mm centred on the lung box", GRID_MODES)
    grid_spacing_mm: float = _option(_PREPROCESS.grid_spacing_mm, "isotropic voxel size of grid_mode "
                                                                  "canonical (mm)")
    spacing_jitter: float = _option(0.0, "grid_mode canonical: each training pair and epoch is resampled at "
                                         "grid_spacing_mm times a factor drawn log-uniformly in [1/(1+j), 1+j], "
                                         "so that the lungs appear at many sizes (validation at grid_spacing_mm); "
                                         "0 = off")
    window_level: float = _option(_PREPROCESS.window_level, "CT window level (HU)")
    window_width: float = _option(_PREPROCESS.window_width, "CT window width (HU)")
    roi_margin_mm: float = _option(_PREPROCESS.roi_margin_mm, "margin around the fixed lung mask for "
                                                              "grid_mode fit and canonical (mm)")
    # model
    model: str = _option("udrnet", "udrnet (with scHAF), voxelmorph (the ablation baseline: UDRNet without "
                                   "scHAF), the paper's comparison networks attunet, resunet and transunet (same "
                                   "widths and depth), or voxelmorph-package (the voxelmorph package's VxmPairwise "
                                   "with features = encoder channels + bottleneck; a bench peer)", MODEL_NAMES)
    encoder_channels: tuple[int, ...] = _option(_MODEL.encoder_channels, "channels per encoder level")
    bottleneck_channels: int = _option(_MODEL.bottleneck_channels, "channels of the deepest decoder level")
    decoder_channels: tuple[int, ...] = _option(_MODEL.decoder_channels, "channels per decoder level")
    reduction: int = _option(_MODEL.reduction, "scHAF channel-MLP reduction")
    integration_steps: int = _option(_MODEL.integration_steps, "scaling-and-squaring steps (0 = plain "
                                                               "displacement, as in the paper)")
    # loss: image similarity + smoothness regulariser (+ optional folding penalty)
    similarity: str = _option("lncc", "image similarity loss", ("lncc", "ncc", "mse"))
    smoothness_weight: float = _option(1.0, "weight of the diffusion (gradient) regulariser")
    folding_weight: float = _option(0.0, "weight of the negative-Jacobian penalty")
    supervised_weight: float = _option(0.0, "weight of the mean squared error (network-grid voxels^2) between "
                                            "the predicted flow and a pair's known displacement (pairs CSV "
                                            "column true_displacement); 0 = unsupervised, as in the paper")
    # optimisation
    init_weights: str | None = _option(None, "checkpoint whose weights start the run (fine-tuning); same "
                                             "architecture; its optimizer state is not used")
    learning_rate: float = _option(1e-5, "Adam learning rate")
    epochs: int = _option(150, "maximum number of epochs")
    batch_size: int = _option(16, "pairs per optimizer step, over all processes")
    micro_batch_size: int = _option(0, "pairs per forward pass and process; smaller than the batch share "
                                       "means gradient accumulation (0 = no accumulation)")
    patience: int = _option(5, "stop when the validation loss has not improved for this many epochs "
                               "(0 = never)")
    seed: int = _option(666, "random seed")
    # hardware
    device: str = _option("auto", "auto, cpu, cuda or mps")
    amp: str = _option("none", "mixed precision autocast", ("none", "bf16", "fp16"))
    compile: bool = _option(False, "torch.compile the network (CUDA)")
    deterministic: bool = _option(False, "deterministic algorithms (slower on CUDA)")

    def model_config(self) -> UDRNetConfig | ComparisonNetConfig | VoxelMorphNetConfig:
        """The network architecture: UDRNet with or without scHAF, a comparison network, or the voxelmorph
        package's network."""
        if self.model == PACKAGE_ARCHITECTURE:
            return VoxelMorphNetConfig(features=(*self.encoder_channels, self.bottleneck_channels))
        return config_for(self.model, self.encoder_channels, self.bottleneck_channels, self.decoder_channels,
                          self.integration_steps, self.reduction)

    def preprocess_config(self) -> PreprocessConfig:
        """How images reach the network (stored in the checkpoint, reused by ``register``)."""
        return PreprocessConfig(grid_shape=self.grid_shape, grid_mode=self.grid_mode,
                                window_level=self.window_level, window_width=self.window_width,
                                roi_margin_mm=self.roi_margin_mm, grid_spacing_mm=self.grid_spacing_mm)

    def to_dict(self) -> dict:
        """Plain YAML/JSON types (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


PRESETS: dict[str, dict] = {
    # The paper: Adam 1e-5, 150 epochs, batch 16, seed 666, patience 5, 192^3 crop, UDRNet with scHAF.
    "paper": {},
    # Minutes on a CPU: a 64^3 grid fitted to the lungs, small batches, a larger step.
    "fast": {"grid_shape": (64, 64, 64), "grid_mode": "fit", "epochs": 20, "batch_size": 2,
             "learning_rate": 1e-4, "num_workers": 2},
    # Seconds on a CPU: checks the whole pipeline with a tiny network; not for real weights.
    "smoke": {"grid_shape": (32, 32, 32), "grid_mode": "fit", "encoder_channels": (4, 8, 8),
              "bottleneck_channels": 8, "decoder_channels": (8, 8, 4), "epochs": 5, "batch_size": 2,
              "learning_rate": 3e-3, "similarity": "mse", "smoothness_weight": 0.01, "num_workers": 0},
}

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


def _coerce(name: str, value):
    """Convert a file or command-line value to the type of field ``name``; raise InputError if impossible."""
    kind = _TYPES[name]
    base = typing.get_origin(kind)
    try:
        if value is None:
            if type(None) not in typing.get_args(kind):
                raise ValueError("a value is required")
            return None
        if base is tuple:
            text = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            items = [int(v) for v in text.replace(",", " ").split()]
            length = None if Ellipsis in typing.get_args(kind) else len(typing.get_args(kind))
            if length and len(items) == 1:
                items *= length  # --grid-shape 64 means 64 64 64
            if not items or (length and len(items) != length):
                raise ValueError(f"{length or 'one or more'} integers are needed")
            return tuple(items)
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                    raise ValueError("true or false is needed")
                return value.lower() in ("true", "yes", "1", "on")
            return bool(value)
        target = next(t for t in (typing.get_args(kind) or (kind,)) if t is not type(None))
        converted = target(value)
    except (TypeError, ValueError) as error:
        raise InputError(f"config {name}: {value!r} is not valid ({error})") from None
    choices = FIELDS[name].metadata["choices"]
    if choices and converted not in choices:
        raise InputError(f"config {name}: {converted!r} is not one of {', '.join(choices)}")
    return converted


def normalise_overrides(values: dict, source: str) -> dict:
    """Validate and convert override keys (dashes or underscores) and values; raise InputError on
    unknown keys."""
    result = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise InputError(f"{source}: unknown setting {key!r} (known: {', '.join(FIELDS)})")
        result[name] = _coerce(name, value)
    return result


def read_config_file(path: str | os.PathLike) -> dict:
    """Flat settings from a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file; may name a ``preset``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config {path}: file not found")
    try:
        if path.suffix.lower() == ".toml":
            data = _toml().loads(path.read_text())
        else:
            data = yaml.safe_load(path.read_text()) or {}
    except Exception as error:  # yaml.YAMLError, tomllib.TOMLDecodeError
        raise InputError(f"config {path}: cannot be parsed ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"config {path}: expected key: value settings at the top level")
    return data


def _toml():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise InputError("TOML config files need Python 3.11 or newer; use a YAML file") from None
    return tomllib


def resolve_config(preset: str | None = None, config_file: str | os.PathLike | None = None,
                   overrides: dict | None = None, base: TrainConfig | None = None) -> TrainConfig:
    """The configuration from ``base`` (default: the paper's) + preset + file + explicit overrides."""
    file_values = read_config_file(config_file) if config_file else {}
    preset = file_values.pop("preset", None) if preset is None else preset
    file_values.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise InputError(f"preset {preset!r}: unknown (use {', '.join(PRESETS)})")
    values = {**(PRESETS[preset] if preset else {}),
              **normalise_overrides(file_values, f"config {config_file}"),
              **normalise_overrides(overrides or {}, "command line")}
    config = dataclasses.replace(base or TrainConfig(), **values)
    for key in ("data", "pairs", "init_weights"):  # absolute, so that --resume works from any folder
        if getattr(config, key):
            config = dataclasses.replace(config, **{key: os.path.abspath(getattr(config, key))})
    return validated(config)


def validated(config: TrainConfig) -> TrainConfig:
    """``config`` if its values fit together, else InputError naming the problem."""
    try:
        config.model_config()
        config.preprocess_config()
    except ValueError as error:
        raise InputError(f"config: {error}") from None
    smallest = 2 ** len(config.encoder_channels)
    if min(config.grid_shape) < smallest:
        raise InputError(f"config grid_shape: {config.grid_shape} is smaller than the network's minimum "
                         f"{smallest} voxels per axis ({len(config.encoder_channels)} levels)")
    for name in ("epochs", "batch_size", "learning_rate"):
        if getattr(config, name) <= 0:
            raise InputError(f"config {name}: must be positive, not {getattr(config, name)}")
    for name in ("micro_batch_size", "patience", "num_workers", "augment_pairs", "supervised_weight",
                 "spacing_jitter"):
        if getattr(config, name) < 0:
            raise InputError(f"config {name}: must not be negative, not {getattr(config, name)}")
    if not math.isfinite(config.spacing_jitter):
        raise InputError(f"config spacing_jitter: must be a finite number, not {config.spacing_jitter}")
    if config.spacing_jitter and config.grid_mode != "canonical":
        raise InputError(f"config spacing_jitter: needs grid_mode canonical, not {config.grid_mode!r}")
    return config


def write_config(config: TrainConfig, path: str | os.PathLike) -> Path:
    """Write the resolved configuration as YAML, atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return Path(path)


def read_run_config(path: str | os.PathLike) -> TrainConfig:
    """Read a resolved ``config.yaml`` written by :func:`write_config`."""
    return dataclasses.replace(TrainConfig(), **normalise_overrides(read_config_file(path), f"config {path}"))


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per :class:`TrainConfig` field (default: not given, so lower layers apply)."""
    group = parser.add_argument_group("hyper-parameters (override the preset and the config file)")
    for name, spec in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        help_text = spec.metadata["help"] + (f" (paper: {_describe(spec.default)})" if spec.default is not None else "")
        if _TYPES[name] is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(_TYPES[name]) is tuple:
            group.add_argument(flag, nargs="+", default=None, metavar="N", help=help_text)
        else:
            group.add_argument(flag, default=None, choices=spec.metadata["choices"], help=help_text)


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The hyper-parameters given explicitly on the command line."""
    return {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}


def _describe(value) -> str:
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    return str(value)
