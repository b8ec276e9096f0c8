"""How much memory a registration needs, estimated from image headers before anything large is allocated.

The estimate (bytes, beyond the Python/torch runtime already loaded, ~0.35 GB)
is the input voxels as stored plus the largest of the stages that do not
overlap in time:

* the network: ``NETWORK_BASE_BYTES`` plus, per voxel of the network grid,
  ``NETWORK_BYTES_PER_CHANNEL`` times the channels alive at full resolution
  (first encoder level, last two decoder levels);
* the fixed-grid stage: per fixed voxel, the LPS field (float32, 12 B), the
  transform's float64 copy (24 B), the warped image (4 B) and the
  temporaries of resampling, plus a float32 copy of the moving image (since
  2026-12-06 ``register`` makes the field on the fixed grid only when asked
  for, e.g. ``--displacement-grid fixed``; the estimate still counts it); with
  the report (``lungudrnet register``), also its similarity and Jacobian
  temporaries;
* with instance optimisation, ``OPTIMISATION_BYTES`` per voxel of its
  largest feature grid (the MIND-SSC channels and their temporaries, then
  the Gauss-Newton normal equations on the coarser displacement grid; the
  coarser level's features are small beside them), added to the fixed-grid
  stage because the allocator keeps much of it afterwards.

The coefficients were calibrated on CPU with the peak resident memory
(``ru_maxrss``) of ``lungudrnet register`` in a fresh process, for fixed and
moving images from 0.1 to 8 million voxels and grids from 32^3 to 96^3, and
rounded up (see the figures in the constants' comments).
"""

from __future__ import annotations

import re

import psutil

from .errors import InputError, ResourceError
from .io import ImageHeader
from .model import UDRNetConfig

NETWORK_BASE_BYTES = 80 * 2 ** 20  # measured 47-70 MB (weights, workspaces)
NETWORK_BYTES_PER_CHANNEL = 11  # measured 10.2 (default widths) and 9.2 (doubled widths) per grid voxel
FIXED_GRID_BYTES = 96  # per fixed voxel, register() only
REPORT_BYTES = 40  # per fixed voxel, extra for the report of ``lungudrnet register``
MOVING_BYTES = 8  # per moving voxel beyond its stored size
# per voxel of the instance optimisation's feature grid: measured at most 47 (the bench's udrnet-pipeline child
# against udrnet-fast's, peak RSS, 192x192x208 and 512x512x61 pairs, 2026-12-05); the estimate takes the
# whole fixed image's box, not the lungs', so it is larger still
OPTIMISATION_BYTES = 64
UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def parse_size(text: str | int) -> int:
    """Bytes of a size such as ``"8G"``, ``"512M"``, ``"1.5GiB"`` or ``"1000000"`` (binary units)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise InputError(f"memory size {text!r}: not understood; use e.g. 8G, 512M or a number of bytes")
    return int(float(match[1]) * UNITS[match[2].upper()])


def format_size(size: int) -> str:
    """``size`` bytes as GiB (or MiB below 1 GiB), one decimal."""
    return f"{size / 2 ** 30:.1f} GiB" if size >= 2 ** 30 else f"{size / 2 ** 20:.0f} MiB"


def network_bytes(grid_shape: tuple[int, int, int], model: UDRNetConfig) -> int:
    """Peak bytes of one UDRNet forward pass (inference, float32) on a grid of ``grid_shape`` voxels; the
    comparison networks' configs have the same channel fields and are estimated the same way."""
    voxels = grid_shape[0] * grid_shape[1] * grid_shape[2]
    channels = model.encoder_channels[0] + sum(model.decoder_channels[-2:])
    return NETWORK_BASE_BYTES + voxels * channels * NETWORK_BYTES_PER_CHANNEL


def registration_bytes(fixed: ImageHeader, moving: ImageHeader, grid_shape: tuple[int, int, int],
                       model: UDRNetConfig, masks: tuple[ImageHeader, ...] = (), report: bool = False,
                       feature_voxels: int | None = None) -> int:
    """Estimated peak bytes of registering ``moving`` onto ``fixed`` (and writing the report if ``report``;
    with instance optimisation on a feature grid of ``feature_voxels`` voxels, if given)."""
    inputs = fixed.nbytes + moving.nbytes + sum(mask.nbytes for mask in masks)
    per_fixed_voxel = FIXED_GRID_BYTES + (REPORT_BYTES if report else 0)
    fixed_grid = fixed.voxels * per_fixed_voxel + moving.voxels * MOVING_BYTES
    optimisation = OPTIMISATION_BYTES * feature_voxels if feature_voxels else 0
    return inputs + max(network_bytes(grid_shape, model), fixed_grid + optimisation)


def memory_limit(max_memory: str | int | None = None) -> tuple[int, str]:
    """The memory a registration may use (bytes) and where that limit comes from.

    ``max_memory`` (bytes or a size such as "8G") if given, else the memory
    the system has available now.
    """
    if max_memory is not None:
        return parse_size(max_memory), "allowed by --max-memory"
    return int(psutil.virtual_memory().available), "available on this machine"


def check_memory(needed: int, max_memory: str | int | None, what: str) -> None:
    """Raise :class:`ResourceError` if ``needed`` bytes exceed the limit of :func:`memory_limit`."""
    limit, source = memory_limit(max_memory)
    if needed > limit:
        raise ResourceError(f"{what}: needs about {format_size(needed)} of memory but {format_size(limit)} is "
                            f"{source}; close other programs, raise --max-memory if more is free, or crop or "
                            "downsample the images (the fixed image's grid sets the output size)")
