"""How much memory a registration needs, estimated from image headers before anything large is allocated.

The estimate (bytes, beyond the Python/torch runtime already loaded, ~0.35 GB)
is the input voxels as stored plus the largest of the stages that do not
overlap in time:

* the network: ``NETWORK_BASE_BYTES`` plus, per voxel of the network grid,
  ``NETWORK_BYTES_PER_CHANNEL`` times the channels alive at full resolution
  (first encoder level, last two decoder levels);
* the fixed-grid stage: per fixed voxel, the LPS field (float32, 12 B), the
  transform's float64 copy (24 B), the warped image (4 B) and the
  temporaries of resampling, plus a float32 copy of the moving image; with
  the report (``lungudrnet register``), also its similarity and Jacobian
  temporaries;
* with instance refinement, ``REFINE_BYTES`` per voxel of its finest grid
  (Adam state, autograd of the warp and the loss), added to the fixed-grid
  stage because the allocator keeps much of it after the refinement: a
  192x192x208 pair refined on a 128^3 grid peaked at 1.32 GB above the
  runtime, 0.29 GB more than without refinement (estimate: 1.7 GB).

The coefficients were calibrated on CPU with the peak resident memory
(``ru_maxrss``) of ``lungudrnet register`` in a fresh process, for fixed and
moving images from 0.1 to 8 million voxels and grids from 32^3 to 96^3, and
rounded up (see the figures in the constants' comments).
"""

from __future__ import annotations

import math
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
REFINE_BYTES = 300  # per voxel of the finest refinement grid: measured 222-367 (96^3 to 160^3 grids)
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
    """Peak bytes of one UDRNet forward pass (inference, float32) on a grid of ``grid_shape`` voxels."""
    voxels = grid_shape[0] * grid_shape[1] * grid_shape[2]
    channels = model.encoder_channels[0] + sum(model.decoder_channels[-2:])
    return NETWORK_BASE_BYTES + voxels * channels * NETWORK_BYTES_PER_CHANNEL


def registration_bytes(fixed: ImageHeader, moving: ImageHeader, grid_shape: tuple[int, int, int],
                       model: UDRNetConfig, masks: tuple[ImageHeader, ...] = (), report: bool = False,
                       refine_grid: tuple[int, int, int] | None = None) -> int:
    """Estimated peak bytes of registering ``moving`` onto ``fixed`` (and writing the report if ``report``;
    with instance refinement whose finest grid is ``refine_grid``, if given)."""
    inputs = fixed.nbytes + moving.nbytes + sum(mask.nbytes for mask in masks)
    per_fixed_voxel = FIXED_GRID_BYTES + (REPORT_BYTES if report else 0)
    fixed_grid = fixed.voxels * per_fixed_voxel + moving.voxels * MOVING_BYTES
    refinement = REFINE_BYTES * math.prod(refine_grid) if refine_grid else 0
    return inputs + max(network_bytes(grid_shape, model), fixed_grid + refinement)


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
