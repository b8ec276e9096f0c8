"""The paper's preprocessing (section 4.1) and the network grid.

Both images of a pair are resampled, in physical space, onto one *network
grid* that covers the fixed image (or the bounding box of its lung mask);
then each is windowed to [0, 255] (Eq. 1) and min-max normalised to [0, 1]
(Eq. 2). The grid is the inverse map too: a voxel flow predicted on it is
turned into a physical field on the fixed image's own grid by
:func:`flow_to_fixed_field`, or kept at its own resolution on a grid that
covers the fixed image by :func:`flow_to_native_field`.

Grid modes:

* ``"fit"`` — a patient-aligned grid (identity direction in LPS) spans the
  fixed image's (or its lung box's) LPS extent with the given shape (spacing
  scaled to fit): any input size, spacing or direction works, and the same
  scan stored with other axis orders or flips gives the same network input.
* ``"canonical"`` — a patient-aligned grid of the given shape at a fixed
  isotropic spacing (``grid_spacing_mm``, stored with the model), centred on
  the fixed lung box (or the fixed image): the anatomy is cropped or padded,
  never stretched, so it has the same size in voxels on every scan.
* ``"crop"`` — the grid keeps the fixed image's spacing and takes the centred
  block of the given shape: an exact crop (or pad), as the paper crops
  192x192x208 Learn2Reg volumes to 192^3.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, replace

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import covering_grid, direction_matrix, lps_bounds, resample_field, voxel_flow_to_field
from .io import ImageHeader, read_image

log = logging.getLogger(__name__)

CT_AIR_RANGE_HU = (-3100.0, -500.0)  # where a CT's minimum lies (air, padding)
CT_MAX_HU = 40000.0  # far above dense metal
GRID_MODES = ("fit", "canonical", "crop")
MASK_THRESHOLD = 0.5  # mask voxels above it are lung


@dataclass(frozen=True)
class PreprocessConfig:
    """How images reach the network. ``grid_shape`` is (D, H, W) = (z, y, x) voxels."""

    grid_shape: tuple[int, int, int] = (96, 96, 96)
    grid_mode: str = "fit"
    window_level: float = -600.0
    window_width: float = 1500.0
    roi_margin_mm: float = 10.0
    grid_spacing_mm: float = 0.0  # isotropic voxel size of grid mode "canonical"

    def __post_init__(self) -> None:
        if self.grid_mode not in GRID_MODES:
            raise ValueError(f"unknown grid mode {self.grid_mode!r} (use {', '.join(GRID_MODES)})")
        if self.grid_mode == "canonical" and not self.grid_spacing_mm > 0:
            raise ValueError(f"grid mode 'canonical' needs grid_spacing_mm > 0 (got {self.grid_spacing_mm})")
        if not self.window_width > 0:
            raise ValueError(f"window_width must be > 0 HU (got {self.window_width})")
        if len(self.grid_shape) != 3 or min(self.grid_shape) < 1:
            raise ValueError(f"grid_shape must be three positive sizes (got {self.grid_shape})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PreprocessConfig":
        data = dict(data)
        data["grid_shape"] = tuple(int(v) for v in data["grid_shape"])
        return cls(**data)


def window(hu: np.ndarray, level: float, width: float, out: np.ndarray | None = None) -> np.ndarray:
    """Eq. 1: clip HU to [level - width/2, level + width/2] and map linearly to [0, 255] (float32; written
    into ``out``, a float32 array of ``hu``'s shape that may be ``hu`` itself, when given)."""
    values = np.asarray(np.subtract(hu, level - width / 2.0, out=out, dtype=np.float32))
    values *= 255.0 / width
    return np.clip(values, 0.0, 255.0, out=values)


def min_max(values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Eq. 2: map to [0, 1] by the array's own minimum and maximum (a constant array gives 0); float32,
    written into ``out`` (as for :func:`window`) when given."""
    values = np.asarray(values, dtype=np.float32)
    low, high = float(values.min()), float(values.max())
    if not high > low:  # constant (or infinite) values
        if out is None:
            return np.zeros_like(values)
        out[...] = 0.0
        return out
    result = np.subtract(values, low, out=out)
    return np.divide(result, high - low, out=result)


def normalise_ct(hu: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Window then min-max normalise a HU array (a new float32 array); NaN voxels count as air (-1000 HU)."""
    values = np.array(hu, dtype=np.float32)  # the caller's array stays intact; the steps work in place on it
    if not np.issubdtype(np.asarray(hu).dtype, np.integer):  # integers are finite
        np.nan_to_num(values, copy=False, nan=-1000.0, posinf=3071.0, neginf=-1024.0)
    return min_max(window(values, config.window_level, config.window_width, out=values), out=values)


def replace_non_finite(image: sitk.Image, what: str) -> sitk.Image:
    """Return ``image`` with NaN/Inf voxels set to its finite minimum (a warning says how many)."""
    values = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(values.dtype, np.floating):
        return image
    bad = ~np.isfinite(values)
    if not bad.any():
        return image
    finite = values[~bad]
    log.warning("%s: %d NaN/Inf voxels replaced by the image minimum", what, int(bad.sum()))
    cleaned = np.where(bad, finite.min() if finite.size else -1000.0, values).astype(values.dtype)
    result = sitk.GetImageFromArray(cleaned)
    result.CopyInformation(image)
    return result


def warn_if_not_ct(image: sitk.Image, what: str) -> None:
    """Log a warning when ``image`` (finite values) is constant or clearly not CT in Hounsfield units.

    A chest CT has air near -1000 HU (padding down to about -3100 HU) and
    nothing far above the densest metal; other ranges (MR, [0, 1]- or
    [0, 255]-scaled images, unscaled DICOM values) are registered, but poorly.
    """
    values = sitk.GetArrayViewFromImage(image)
    low, high = float(values.min()), float(values.max())
    if low == high:
        log.warning("%s: is constant (every voxel %g); there is nothing to align, expect a near-zero displacement",
                    what, low)
    elif not (CT_AIR_RANGE_HU[0] <= low <= CT_AIR_RANGE_HU[1]) or high > CT_MAX_HU:
        log.warning("%s: intensities %g to %g do not look like CT in Hounsfield units (air near -1000 HU); "
                    "the network expects HU: convert the image (e.g. apply the DICOM rescale slope and "
                    "intercept) or expect a poor registration", what, low, high)


def same_geometry(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> bool:
    """Whether two images share size, origin, spacing and direction (to ``tolerance`` mm or cosine)."""
    return a.GetSize() == b.GetSize() and all(
        np.allclose(getter(a), getter(b), atol=tolerance, rtol=0)
        for getter in (sitk.Image.GetOrigin, sitk.Image.GetSpacing, sitk.Image.GetDirection))


def binary_mask(mask: sitk.Image) -> sitk.Image:
    """``mask`` as 0/1 UInt8: voxels above :data:`MASK_THRESHOLD` are lung (labels 1, 2, ... and
    probabilities above 0.5; 0.3 is not lung, 0.7 is)."""
    binary = sitk.GetImageFromArray((sitk.GetArrayViewFromImage(mask) > MASK_THRESHOLD).astype(np.uint8))
    binary.CopyInformation(mask)
    return binary


def mask_on_image_grid(mask: sitk.Image, image: sitk.Image, what: str) -> sitk.Image:
    """``mask`` as a 0/1 mask (:func:`binary_mask`) on ``image``'s grid: resampled (nearest neighbour) if
    their geometries differ.

    Raises :class:`InputError` naming ``what`` if the mask is empty or does not overlap the image.
    """
    mask = binary_mask(mask)
    if not np.any(sitk.GetArrayViewFromImage(mask)):
        raise InputError(f"{what}: is empty (no voxel above {MASK_THRESHOLD:g}, the lung threshold); pass a mask "
                         "that marks the lungs (e.g. with 1), or none")
    if same_geometry(mask, image):
        return mask
    log.info("%s: its grid differs from its image's; resampled onto the image's grid", what)
    mask = sitk.Resample(mask, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, mask.GetPixelID())
    if not np.any(sitk.GetArrayViewFromImage(mask)):
        raise InputError(f"{what}: does not overlap its image (no mask voxel inside it); check that the mask "
                         "belongs to this scan")
    return mask


def read_mask(path: str | os.PathLike, image: sitk.Image, what: str) -> sitk.Image:
    """The lung mask file ``path`` on ``image``'s grid (:func:`mask_on_image_grid`); messages name the file."""
    return mask_on_image_grid(read_image(path, what), image, f"{what} {path}")


def _bounding_box(mask: sitk.Image, reference: sitk.Image, margin_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Index-space box (start, size) of ``mask`` on ``reference``'s grid, widened by ``margin_mm``."""
    if not same_geometry(mask, reference):
        mask = sitk.Resample(mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    inside = sitk.GetArrayViewFromImage(mask) > 0
    # the occupied indices along each axis (i, j, k), from the mask projected onto that axis
    occupied = [np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis))) for axis in (2, 1, 0)]
    if not all(len(indices) for indices in occupied):
        raise ValueError("the mask has no voxel on the reference grid")
    margin = np.ceil(margin_mm / np.asarray(reference.GetSpacing())).astype(int)
    start = np.maximum([indices[0] for indices in occupied] - margin, 0)
    stop = np.minimum([indices[-1] for indices in occupied] + margin + 1, reference.GetSize())
    return start, stop - start


def _lps_box(fixed: sitk.Image, roi_mask: sitk.Image | None, margin_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest LPS corner (mm) of the fixed image's voxels, or of ``roi_mask``'s box plus
    ``margin_mm``, as voxel edges (not centres)."""
    if roi_mask is None:
        return lps_bounds(fixed)
    return lps_bounds(fixed, *_bounding_box(roi_mask, fixed, margin_mm))


def network_grid(fixed: sitk.Image, config: PreprocessConfig, roi_mask: sitk.Image | None = None) -> sitk.Image:
    """An empty float32 image whose geometry is the network grid for ``fixed``.

    ``"fit"`` and ``"canonical"`` are patient-aligned (identity direction in
    LPS) around the LPS box of the fixed image, or of ``roi_mask``'s box (e.g.
    the fixed lung mask) plus ``config.roi_margin_mm``: the network sees the
    anatomy the same way however the file stores its axes (order, flips,
    obliquity). ``"fit"`` spans the box (spacing scaled to fit);
    ``"canonical"`` is centred on it at ``grid_spacing_mm``.
    ``"crop"``: the fixed image's own axes and spacing, the centred block.
    """
    shape_xyz = np.asarray(config.grid_shape[::-1])
    grid = sitk.Image([int(v) for v in shape_xyz], sitk.sitkFloat32)
    if config.grid_mode in ("fit", "canonical"):
        low, high = _lps_box(fixed, roi_mask, config.roi_margin_mm)
        if config.grid_mode == "fit":
            new_spacing = (high - low) / shape_xyz
        else:
            new_spacing = np.full(3, float(config.grid_spacing_mm))
            cropped = (high - low) - shape_xyz * new_spacing
            if np.any(cropped > 2 * config.roi_margin_mm):
                log.warning("the %s box (%s mm) is larger than the network grid (%s mm): its edges are left "
                            "out", "lung" if roi_mask is not None else "image",
                            " x ".join(f"{v:.0f}" for v in high - low),
                            " x ".join(f"{v:.0f}" for v in shape_xyz * new_spacing))
        grid.SetSpacing(tuple(float(v) for v in new_spacing))
        grid.SetOrigin(tuple(float(v) for v in (low + high) / 2 - (shape_xyz - 1) * new_spacing / 2))
    else:
        spacing = np.asarray(fixed.GetSpacing())
        first_center = (np.asarray(fixed.GetSize()) - shape_xyz) // 2
        grid.SetSpacing(tuple(float(v) for v in spacing))
        grid.SetOrigin(tuple(float(v) for v in np.asarray(fixed.GetOrigin())
                             + direction_matrix(fixed) @ (spacing * first_center)))
        grid.SetDirection(fixed.GetDirection())
    return grid


def lung_box_grid(fixed: sitk.Image, config: PreprocessConfig, roi_mask: sitk.Image | None = None) -> sitk.Image:
    """An empty patient-aligned image over the LPS box of ``roi_mask`` (the fixed lungs) plus
    ``config.roi_margin_mm``, or of the whole fixed image: where instance optimisation works, whatever the
    network grid's mode (it is the ``"fit"`` network grid)."""
    return network_grid(fixed, replace(config, grid_mode="fit"), roi_mask)


def largest_lung_box_mm(fixed: ImageHeader, config: PreprocessConfig) -> np.ndarray:
    """The largest extent (mm along x, y, z) :func:`lung_box_grid` can have on a fixed image of this header:
    the whole image plus the margin, as without a lung mask."""
    return np.asarray(fixed.size) * np.asarray(fixed.spacing) + 2 * config.roi_margin_mm


def to_grid(image: sitk.Image, grid: sitk.Image, interpolator: int = sitk.sitkLinear,
            transform: sitk.Transform | None = None) -> np.ndarray:
    """Resample ``image`` onto ``grid`` in physical space; returns a (D, H, W) float32 array.

    ``transform`` (grid LPS mm -> image LPS mm; default identity) samples the
    image at T(p), e.g. the moving image pre-aligned by the affine stage.
    Outside ``image`` the value is its minimum (air for CT, 0 for masks).
    """
    outside = float(np.nanmin(sitk.GetArrayViewFromImage(image)))
    resampled = sitk.Resample(image, grid, transform or sitk.Transform(), interpolator,
                              outside if np.isfinite(outside) else -1000.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)


def prepare_pair(fixed: sitk.Image, moving: sitk.Image, config: PreprocessConfig,
                 roi_mask: sitk.Image | None = None,
                 moving_transform: sitk.Transform | None = None) -> tuple[sitk.Image, np.ndarray, np.ndarray]:
    """Network grid plus the fixed and moving images on it, normalised to [0, 1] (D, H, W).

    ``moving_transform`` (fixed LPS mm -> moving LPS mm, e.g. the affine
    pre-alignment) is applied to the moving image on its way to the grid.
    """
    grid = network_grid(fixed, config, roi_mask)
    moving_on_grid = to_grid(moving, grid, transform=moving_transform)
    return grid, normalise_ct(to_grid(fixed, grid), config), normalise_ct(moving_on_grid, config)


def flow_to_fixed_field(flow: np.ndarray, grid: sitk.Image, fixed: sitk.Image) -> sitk.Image:
    """Inverse of the grid mapping: voxel flow [3, D, H, W] on ``grid`` -> LPS mm field on ``fixed``'s grid.

    The native field (:func:`flow_to_native_field`) sampled linearly at every
    fixed voxel. The result is VectorFloat32 (12 bytes per fixed voxel): the
    fixed grid may be large.
    """
    return resample_field(flow_to_native_field(flow, grid, fixed), fixed, sitk.sitkVectorFloat32)


def native_field_grid(fixed: sitk.Image, grid: sitk.Image) -> sitk.Image:
    """The grid of the field at the resolution it really has: the network ``grid`` (or the displacement grid of
    instance optimisation), which has ``fixed``'s axes, extended by whole nodes until it covers ``fixed``.

    See :func:`.geometry.covering_grid`: the nodes are the network's voxel
    centres plus as many beyond each face as reach ``fixed``'s outermost voxel
    centres (one per face when ``grid`` fits the whole fixed image).
    """
    return covering_grid(grid, fixed)[0]


def flow_to_native_field(flow: np.ndarray, grid: sitk.Image, fixed: sitk.Image) -> sitk.Image:
    """Voxel flow [3, D, H, W] on ``grid`` -> LPS mm field (VectorFloat32) on :func:`native_field_grid`.

    The network's own values at its nodes, the nearest edge value repeated at
    the added ones: interpolated linearly it is the network's trilinear field,
    continued beyond ``grid`` as the nearest point of ``grid`` has it, and
    :func:`flow_to_fixed_field` is that field at the fixed voxels.
    """
    native, before = covering_grid(grid, fixed)
    after = np.asarray(native.GetSize()) - np.asarray(grid.GetSize()) - before
    padding = [(0, 0)] + [(int(b), int(a)) for b, a in zip(before[::-1], after[::-1])]  # channel, D, H, W
    return sitk.Cast(voxel_flow_to_field(np.pad(flow, padding, mode="edge"), native), sitk.sitkVectorFloat32)
