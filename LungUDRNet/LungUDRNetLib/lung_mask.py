"""Automatic lung mask of a chest CT in HU, for users who bring none; and the CT's body mask.

:func:`lung_mask` first resamples the CT (linearly) onto a working grid:
axis-aligned in LPS (array axis 0 runs inferior to superior), inside the CT's
voxel centres, with at least WORKING_SPACING_MM between voxels (the CT's own
spacing where that is coarser). Any storage order or flip of the CT's axes
therefore gives the same mask in physical space (a tilted CT is handled alike). On that grid:

1. air is below AIR_HU; the body is the largest 6-connected component of the rest;
2. candidate lung air is air within the body's extent in its axial slice (between
   the body's first and last voxel along a row or a column): outside air around
   the body is not, a lung cut by a tight field of view still is;
3. a 3D component of it is lung when at least MIN_ENCLOSED_FRACTION of it is
   enclosed by the body in its axial slice (air in skin folds or between arm
   and chest is not), its median is above AIRWAY_HU (parenchyma, not bowel,
   stomach or other pure gas) and it is at least LARGE_FRACTION of the largest one;
4. the airways (trachea and main bronchi; larynx and pharynx when in view): pure
   air outside the lungs' bulk that rises above the bulk's top, removed with a
   margin of AIRWAY_MARGIN_MM; then the pieces smaller than LARGE_FRACTION of the largest;
5. closing with a box of +-VESSEL_RADIUS_MM (vessels), enclosed holes filled (nodules);
6. linear interpolation back onto the CT's grid, cut at 0.5.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import InputError
from .geometry import direction_matrix, index_to_points

AIR_HU = -400.0  # below this a voxel counts as air (lung, airway, gas or outside air)
AIRWAY_HU = -970.0  # airway lumen and gas: nearly pure air, darker than lung parenchyma
WORKING_SPACING_MM = 2.0  # the lungs are found on a grid at least this coarse
VESSEL_RADIUS_MM = 4.0  # the lungs are closed with a box of this half-width to take in vessels
BULK_RADIUS_MM = 10.0  # the lungs' bulk: where a box of this half-width fits (not in the trachea)
AIRWAY_MARGIN_MM = 2.0  # the airways are removed with this margin (their wall's partial volume)
MIN_ENCLOSED_FRACTION = 0.1  # of a lung component, enclosed by the body in its axial slice
LARGE_FRACTION = 0.25  # a lung is at least this fraction of the largest one (drops gas pockets)
MIN_LUNG_ML = 30.0  # fewer millilitres of lung than this: no lungs found (an adult chest holds litres)


def lung_mask(ct: sitk.Image, what: str = "CT") -> sitk.Image:
    """Lung mask (uint8 0/1, the CT's geometry) of a chest CT in HU, as the module docstring describes.

    Raises :class:`InputError` naming ``what`` when no lungs are found.
    """
    grid = working_grid(ct)
    hu = sitk.GetArrayFromImage(sitk.Resample(ct, grid, sitk.Transform(), sitk.sitkLinear, np.nan,
                                              sitk.sitkFloat32))
    in_view = ~np.isnan(hu)
    air = in_view & (hu < AIR_HU)
    body = largest_component(in_view & ~air)
    lungs = _lung_components(air & _slice_extent(body), _slice_holes(body, 0, in_view), hu)
    lungs = _large_components(lungs & ~_airways(lungs, hu, grid))
    lungs = _close_and_fill(lungs, grid)
    millilitres = np.count_nonzero(lungs) * np.prod(grid.GetSpacing()) / 1000.0
    if millilitres < MIN_LUNG_ML:
        raise InputError(f"{what}: no lungs found ({millilitres:.0f} mL of lung-like air; is it a chest CT in HU?)")
    fraction = sitk.Resample(_mask_image(lungs, grid, sitk.sitkFloat32), ct, sitk.Transform(), sitk.sitkLinear, 0.0)
    return _mask_image(sitk.GetArrayViewFromImage(fraction) > 0.5, ct)


def body_mask(ct: sitk.Image) -> sitk.Image:
    """Body mask (uint8 0/1, the CT's geometry) of a CT in HU: the largest 6-connected component at or
    above AIR_HU, with what it encloses in each axial slice (lungs, airways, gas)."""
    body = largest_component(sitk.GetArrayViewFromImage(ct) >= AIR_HU)
    return _mask_image(body | _slice_holes(body, _slice_axis(ct)), ct)


def mask_volume_ml(mask: sitk.Image) -> float:
    """Volume of a mask's non-zero voxels, millilitres."""
    return float(np.count_nonzero(sitk.GetArrayViewFromImage(mask)) * np.prod(mask.GetSpacing()) / 1000.0)


def working_grid(ct: sitk.Image) -> sitk.Image:
    """An empty axis-aligned grid (identity direction) centred inside the CT's voxel centres; along each
    LPS axis the spacing of the CT's nearest axis, at least WORKING_SPACING_MM."""
    size = np.asarray(ct.GetSize())
    corners = index_to_points(np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * (size - 1), ct)
    low, high = corners.min(axis=0), corners.max(axis=0)
    nearest_axis = np.argmax(np.abs(direction_matrix(ct)), axis=1)
    step = np.maximum(WORKING_SPACING_MM, np.asarray(ct.GetSpacing())[nearest_axis])
    count = np.floor((high - low) / step + 1e-6).astype(int) + 1
    grid = sitk.Image([int(n) for n in count], sitk.sitkUInt8)
    grid.SetSpacing(tuple(float(s) for s in step))
    grid.SetOrigin(tuple(float(v) for v in (low + high - (count - 1) * step) / 2.0))
    return grid


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of a boolean array."""
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros_like(mask, dtype=bool)
    return labels == 1 + np.argmax(np.bincount(labels.ravel())[1:])


def box_size(radius_mm: float, image: sitk.Image) -> tuple[int, int, int]:
    """Size (z, y, x) in voxels of a box reaching ``radius_mm`` (at least one voxel) from its centre."""
    return tuple(2 * max(1, round(radius_mm / s)) + 1 for s in image.GetSpacing()[::-1])


def _mask_image(mask: np.ndarray, reference: sitk.Image, pixel_type: int = sitk.sitkUInt8) -> sitk.Image:
    """A (z, y, x) boolean array as a 0/1 image with ``reference``'s geometry."""
    image = sitk.Cast(sitk.GetImageFromArray(mask.astype(np.uint8)), pixel_type)
    image.CopyInformation(reference)
    return image


def _slice_axis(image: sitk.Image) -> int:
    """The numpy axis whose index direction is closest to LPS z (the axial slice axis)."""
    return 2 - int(np.argmax(np.abs(direction_matrix(image)[2])))


def _slice_extent(mask: np.ndarray) -> np.ndarray:
    """Voxels between ``mask``'s first and last voxel along their row or their column (axes 2 and 1)."""
    def between(axis: int) -> np.ndarray:
        after_first = np.logical_or.accumulate(mask, axis=axis)
        return after_first & np.flip(np.logical_or.accumulate(np.flip(mask, axis), axis=axis), axis)

    return between(1) | between(2)


def _slice_holes(mask: np.ndarray, axis: int, in_view: np.ndarray | None = None) -> np.ndarray:
    """Voxels outside ``mask`` that it encloses within their slice along ``axis``: in-slice components
    of the rest that touch neither the slice's border nor the voxels outside ``in_view``."""
    structure = ndimage.generate_binary_structure(3, 1)
    for end in (0, 2):
        np.moveaxis(structure, axis, 0)[end] = False
    return _enclosed(mask, structure, tuple(a for a in range(3) if a != axis), in_view)


def _enclosed(mask: np.ndarray, structure: np.ndarray | None = None, axes: tuple[int, ...] = (0, 1, 2),
              in_view: np.ndarray | None = None) -> np.ndarray:
    """The components (connected by ``structure``; default 6-connected) outside ``mask`` that touch
    neither the array's first or last slice along any of ``axes`` nor the voxels outside ``in_view``. With the
    defaults, what ``ndimage.binary_fill_holes`` adds, from one labelling instead of its repeated
    dilations (0.12 -> 0.03 s on a lung CT's working grid)."""
    labels, count = ndimage.label(~mask, structure)
    hole = np.ones(count + 1, dtype=bool)
    hole[0] = False
    for axis in axes:
        hole[np.take(labels, 0, axis=axis)] = False
        hole[np.take(labels, -1, axis=axis)] = False
    if in_view is not None:
        hole[labels[~in_view]] = False
    return hole[labels]


def _lung_components(candidates: np.ndarray, enclosed: np.ndarray, hu: np.ndarray) -> np.ndarray:
    """The 3D components of ``candidates`` that are lung: enough of them ``enclosed``, median above
    AIRWAY_HU, and at least LARGE_FRACTION of the largest such component."""
    labels, count = ndimage.label(candidates)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    enclosed_fraction = np.bincount(labels[enclosed], minlength=count + 1) / np.maximum(sizes, 1)
    dark_fraction = np.bincount(labels[hu < AIRWAY_HU], minlength=count + 1) / np.maximum(sizes, 1)
    lung_like = (enclosed_fraction >= MIN_ENCLOSED_FRACTION) & (dark_fraction < 0.5)
    lung_like[0] = False
    return (lung_like & (sizes >= LARGE_FRACTION * np.max(sizes * lung_like)))[labels]


def _large_components(mask: np.ndarray) -> np.ndarray:
    """The 6-connected components of ``mask`` of at least LARGE_FRACTION of the largest one."""
    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    return (sizes >= max(LARGE_FRACTION * sizes.max(), 1))[labels]


def _airways(lungs: np.ndarray, hu: np.ndarray, grid: sitk.Image) -> np.ndarray:
    """Trachea and main bronchi (and larynx and pharynx when in view) of the lung air on the working
    grid, with a margin of AIRWAY_MARGIN_MM: the components of pure air (< AIRWAY_HU) outside the
    lungs' bulk that rise above the bulk's top slice (the airways leave the chest; gas in the lung does not)."""
    box = box_size(BULK_RADIUS_MM, grid)
    bulk = ndimage.maximum_filter(ndimage.minimum_filter(lungs, box, mode="constant"), box, mode="constant")
    labels, count = ndimage.label(lungs & ~bulk & (hu < AIRWAY_HU))
    if count == 0 or not bulk.any():
        return np.zeros_like(lungs)
    bulk_top = np.nonzero(bulk.any(axis=(1, 2)))[0][-1]
    airway = np.zeros(count + 1, dtype=bool)
    airway[1:] = [extent[0].stop - 1 > bulk_top for extent in ndimage.find_objects(labels)]
    return ndimage.maximum_filter(airway[labels], box_size(AIRWAY_MARGIN_MM, grid))


def _close_and_fill(mask: np.ndarray, grid: sitk.Image) -> np.ndarray:
    """``mask`` closed with a box of half-width VESSEL_RADIUS_MM, then with its enclosed 3D holes filled."""
    box = box_size(VESSEL_RADIUS_MM, grid)
    closed = ndimage.minimum_filter(ndimage.maximum_filter(mask, box, mode="constant"), box, mode="constant", cval=1)
    return closed | _enclosed(closed)
