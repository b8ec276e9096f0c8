"""Synthetic inhale/exhale pairs with a known dense displacement field, made from one real CT.

The real CT is taken as the **inhale** phase and becomes the moving image; the
fixed image is a synthetic **exhale** phase computed from it:
``fixed(p) = moving(p + u(p))``, with ``u`` the pull field on the fixed grid
(see :mod:`geometry`). ``u`` is therefore exact ground truth for registration.

Signs of the motion model (LPS millimetres: x to the patient's left, y
posterior, z superior):

* superior-inferior: at exhale the lung base lies higher than at inhale, so
  the inhale position of an exhale point is lower: ``u_z <= 0`` in the lungs,
  about ``-amplitude_mm`` at the base and ``-0.15 * amplitude_mm`` at the apex.
  The diaphragm and the organs under it follow the lung base, fading out
  within a few centimetres below it.
* anterior-posterior and left-right: the exhale chest is smaller, so ``u``
  points away from the lungs' centre, up to about ``expansion_fraction *
  amplitude_mm`` (default 0.3); optionally the front of the chest rises at
  inhale: ``u_y`` down to ``-anterior_fraction * amplitude_mm`` at the
  anterior lung edge, zero at the posterior one.
* a smooth random perturbation (seeded) of up to ``0.2 * amplitude_mm``.

All three act fully inside the lungs and at 20 % in the rest of the body
(a smooth blend that stands in for sliding at the pleura); ``u`` is zero
outside the body (which is taken to continue above and below the CT's field
of view). The field is computed on a 4 mm axis-aligned grid, smoothed, damped
until ``det(I + grad u) >= 0.3`` there (no folding) and linearly interpolated
onto the CT's grid. Because the lungs are larger at inhale,
``det(I + grad u) > 1`` in them; mass conservation then makes the exhale lung
denser: ``HU_exhale = -1000 + (HU_inhale + 1000) * det(I + grad u)``.

Where ``p + u(p)`` leaves the CT, ``fixed`` repeats the CT's edge (ITK's
nearest-neighbour extrapolation), e.g. a few slices at the bottom when the
lung base is cut by the field of view.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from . import metrics
from .geometry import field_to_voxel_flow, index_to_points
from .lung_mask import AIR_HU, body_mask, box_size, largest_component, lung_mask

LANDMARK_HU = -500.0  # landmarks sit on vessel-like structures brighter than this

MOTION_SPACING_MM = 4.0  # the motion model is computed on an axis-aligned grid this coarse
LUNG_BLEND_MM = 8.0  # sigma of the lung weight's blend into the chest wall
BODY_BLEND_MM = 6.0  # sigma of the fade-out of motion at the skin
BODY_WEIGHT = 0.2  # motion of the chest wall and abdomen relative to the lungs
APEX_FRACTION = 0.15  # SI motion at the apex relative to the base
BELOW_BASE_MM = 50.0  # SI motion fades out over this distance below the lung base
EXPANSION_FRACTION = 0.3  # AP/LR motion at the lung edge relative to the amplitude
PERTURBATION_FRACTION = 0.2  # peak random motion relative to the amplitude
PERTURBATION_SIGMA_MM = 20.0  # correlation length of the random motion
MIN_JACOBIAN = 0.3  # the field is scaled down until det(I + grad u) stays above this

LEARN2REG_SIZE = (192, 192, 208)  # voxels, x y z
LEARN2REG_SPACING = (1.75, 1.25, 1.75)  # mm


@dataclass
class BreathingPair:
    """A synthetic exhale (fixed) / inhale (moving) pair with its exact correspondence.

    ``displacement`` is the pull field on the fixed grid (LPS mm, VectorFloat32):
    fixed point p corresponds to moving point ``p + u(p)``. Points are (N, 3) LPS mm.
    """

    fixed: sitk.Image
    moving: sitk.Image
    displacement: sitk.Image
    fixed_mask: sitk.Image
    moving_mask: sitk.Image
    fixed_points: np.ndarray
    moving_points: np.ndarray


def make_breathing_pair(ct: sitk.Image, seed: int = 0, amplitude_mm: float = 12.0, n_landmarks: int = 100,
                        noise_hu: float = 20.0, reference: sitk.Image | None = None,
                        density_change: bool = True, expansion_fraction: float = EXPANSION_FRACTION,
                        anterior_fraction: float = 0.0) -> BreathingPair:
    """Turn one CT (HU, taken as inhale) into an exhale/inhale pair with a known displacement.

    ``reference``: optional grid to resample the CT onto first (e.g. :func:`learn2reg_like_grid`);
    air fills the reference beyond the CT.
    ``noise_hu``: std of the Gaussian noise added independently to each image (0: none).
    ``density_change``: make the exhale lung denser by the local volume change.
    With ``noise_hu=0`` and ``density_change=False``, ``fixed`` equals ``moving``
    resampled through ``DisplacementFieldTransform(displacement)`` (linear
    interpolation, nearest-neighbour extrapolation outside the CT).
    ``moving`` is the (resampled) CT as float32 plus noise; ``moving_mask`` is
    :func:`lung_mask` of it before noise and ``fixed_mask`` that mask pulled
    through ``u`` (nearest neighbour). Landmarks lie on vessel-like maxima in
    the fixed lung, with ``p + u(p)`` inside the CT. The same arguments give
    bit-identical results.
    """
    rng = np.random.default_rng(seed)
    moving = sitk.Cast(ct if reference is None else resample_like(ct, reference), sitk.sitkFloat32)
    moving_mask = lung_mask(moving, "make_breathing_pair CT")
    body = body_mask(moving)
    coarse_field, coarse_jacobian = _motion_model(body, moving_mask, amplitude_mm, rng, expansion_fraction,
                                                  anterior_fraction)
    displacement = sitk.Cast(_resample(coarse_field, moving, sitk.sitkLinear), sitk.sitkVectorFloat32)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64))
    fixed = _resample(moving, moving, sitk.sitkLinear, transform)
    fixed_mask = _resample(moving_mask, moving, sitk.sitkNearestNeighbor, transform)
    if density_change:
        fixed = _compress_lung(fixed, fixed_mask, _resample(coarse_jacobian, moving, sitk.sitkLinear))
    fixed_points = _sample_landmarks(fixed, fixed_mask & _in_view(moving, transform), n_landmarks, rng)
    moving_points = np.array([transform.TransformPoint(tuple(p)) for p in fixed_points]).reshape(-1, 3)
    return BreathingPair(
        fixed=_add_noise(fixed, noise_hu, rng), moving=_add_noise(moving, noise_hu, rng),
        displacement=displacement, fixed_mask=fixed_mask, moving_mask=moving_mask,
        fixed_points=fixed_points, moving_points=moving_points,
    )


# ----------------------------------------------------------------------------- grids


def grid_image(size: tuple[int, int, int], spacing: tuple[float, float, float],
               centre_lps: np.ndarray) -> sitk.Image:
    """An empty float32 image, axis-aligned in LPS (identity direction), centred on ``centre_lps`` (mm)."""
    image = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    image.SetSpacing(tuple(float(s) for s in spacing))
    half_extent = (np.asarray(size) - 1) * np.asarray(spacing) / 2.0
    image.SetOrigin(tuple(float(v) for v in np.asarray(centre_lps) - half_extent))
    return image


def body_centre(ct: sitk.Image) -> np.ndarray:
    """Centroid of the body (largest non-air component) of a CT, LPS mm."""
    body = largest_component(sitk.GetArrayFromImage(ct) >= AIR_HU)
    k, j, i = (np.mean(axis) for axis in np.nonzero(body))
    return index_to_points(np.array([i, j, k]), ct)[0]


def learn2reg_like_grid(ct: sitk.Image) -> sitk.Image:
    """A 192 x 192 x 208 grid of 1.75 x 1.25 x 1.75 mm (Learn2Reg lung CT), centred on the CT's body."""
    return grid_image(LEARN2REG_SIZE, LEARN2REG_SPACING, body_centre(ct))


def resample_like(ct: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """The CT (HU) linearly resampled onto ``reference``'s grid, float32; air (-1024 HU) outside the CT."""
    return sitk.Resample(ct, reference, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)


def resample_to_grid(ct: sitk.Image, size: tuple[int, int, int],
                     spacing: tuple[float, float, float]) -> sitk.Image:
    """The CT resampled onto an axis-aligned grid of ``size`` voxels (x, y, z) and ``spacing`` mm
    centred on its body."""
    return resample_like(ct, grid_image(size, spacing, body_centre(ct)))


def _resample(image: sitk.Image, reference: sitk.Image, interpolator: int,
              transform: sitk.Transform | None = None) -> sitk.Image:
    """``image`` sampled at ``T(p)`` for every point p of ``reference``; nearest edge value outside."""
    return sitk.Resample(image, reference, transform or sitk.Transform(), interpolator, 0.0,
                         image.GetPixelID(), True)


def _in_view(moving: sitk.Image, transform: sitk.Transform) -> sitk.Image:
    """uint8 mask of the fixed points p (on ``moving``'s grid) whose ``T(p)`` lies inside ``moving``."""
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    return sitk.Resample(ones, moving, transform, sitk.sitkNearestNeighbor, 0)


# ----------------------------------------------------------------------------- motion


def _motion_grid(image: sitk.Image) -> sitk.Image:
    """An axis-aligned grid of MOTION_SPACING_MM covering ``image``'s voxels with one voxel to spare."""
    size = np.asarray(image.GetSize())
    corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)]) * (size - 1)
    points = index_to_points(corners, image)
    low, high = points.min(axis=0) - MOTION_SPACING_MM, points.max(axis=0) + MOTION_SPACING_MM
    count = np.ceil((high - low) / MOTION_SPACING_MM).astype(int) + 1
    return grid_image(tuple(count), (MOTION_SPACING_MM,) * 3, (low + high) / 2.0)


def _physical_bounds(mask: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest LPS coordinates (mm) of the corners of a non-empty mask's index bounding box."""
    array = sitk.GetArrayFromImage(mask) > 0
    ranges = []
    for axis in (2, 1, 0):
        occupied = np.nonzero(array.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        ranges.append((occupied[0], occupied[-1]))
    corners = index_to_points(np.array([[i, j, k] for i in ranges[0] for j in ranges[1] for k in ranges[2]]), mask)
    return corners.min(axis=0), corners.max(axis=0)


def _coarse_fraction(mask: sitk.Image, grid: sitk.Image) -> np.ndarray:
    """A mask's fraction on ``grid`` (linear; beyond the mask's grid, that of its edge); (z, y, x)."""
    return sitk.GetArrayFromImage(_resample(sitk.Cast(mask, sitk.sitkFloat32), grid, sitk.sitkLinear))


def _motion_model(body: sitk.Image, lungs: sitk.Image, amplitude_mm: float, rng: np.random.Generator,
                  expansion_fraction: float, anterior_fraction: float) -> tuple[sitk.Image, sitk.Image]:
    """The breathing field on a coarse axis-aligned grid covering the masks' grid (VectorFloat64,
    LPS mm) and its det(I + grad u).

    Superior-inferior, expansion and random parts are weighted by the smoothed
    lung mask (the SI part by its downward 'shadow', so the diaphragm follows
    the lung base) and faded to zero at the skin. Above and below the CT's
    field of view (slices without body) the masks continue as at its edge.
    """
    grid = _motion_grid(lungs)
    body_fraction, lung_fraction = (_coarse_fraction(mask, grid) for mask in (body, lungs))
    with_body = np.nonzero(body_fraction.max(axis=(1, 2)) >= 0.5)[0]
    nearest = np.clip(np.arange(len(body_fraction)), with_body[0], with_body[-1])
    lung = ndimage.gaussian_filter(lung_fraction[nearest], LUNG_BLEND_MM / MOTION_SPACING_MM)
    skin = ndimage.gaussian_filter(body_fraction[nearest], BODY_BLEND_MM / MOTION_SPACING_MM)
    skin = np.clip(2.0 * skin - 1.0, 0.0, 1.0)
    below_lung = np.maximum.accumulate(lung[::-1], axis=0)[::-1]  # axis 0 is LPS z, superior last
    shadow = ndimage.gaussian_filter(below_lung, LUNG_BLEND_MM / MOTION_SPACING_MM)
    inner, inner_si = (skin * (BODY_WEIGHT + (1.0 - BODY_WEIGHT) * w) for w in (lung, shadow))

    z, y, x = np.meshgrid(*(grid.GetOrigin()[a] + MOTION_SPACING_MM * np.arange(grid.GetSize()[a])
                            for a in (2, 1, 0)), indexing="ij")
    low, high = _physical_bounds(lungs)
    height = np.clip((high[2] - z) / max(high[2] - low[2], 1.0), 0.0, 1.0)
    si_profile = np.where(z >= low[2], APEX_FRACTION + (1.0 - APEX_FRACTION) * height,
                          np.exp(-((low[2] - z) / BELOW_BASE_MM) ** 2))
    centre, half_width = (low + high) / 2.0, np.maximum((high - low) / 2.0, 1.0)
    expansion = [expansion_fraction * (c - centre[a]) / half_width[a] * inner for a, c in enumerate((x, y))]
    anterior = np.clip((high[1] - y) / (2.0 * half_width[1]), 0.0, 1.0)  # 0 posterior lung edge, 1 anterior
    expansion[1] = expansion[1] - anterior_fraction * anterior * inner
    regular = amplitude_mm * np.stack([*expansion, -si_profile * inner_si], axis=-1)
    random = amplitude_mm * PERTURBATION_FRACTION * _smooth_noise(grid, rng) * inner[..., None]

    jacobian = _motion_jacobian(regular + random)
    while jacobian.min() < MIN_JACOBIAN:  # too strong for this anatomy: damp the random part first
        random *= 0.5
        regular *= 0.9
        jacobian = _motion_jacobian(regular + random)
    field = sitk.GetImageFromArray((regular + random).astype(np.float64), isVector=True)
    field.CopyInformation(grid)
    jacobian_image = sitk.GetImageFromArray(jacobian.astype(np.float32))
    jacobian_image.CopyInformation(grid)
    return field, jacobian_image


def _smooth_noise(grid: sitk.Image, rng: np.random.Generator) -> np.ndarray:
    """Three smooth random fields on ``grid`` (z, y, x, 3), each scaled to a peak of 1."""
    noise = rng.standard_normal((*grid.GetSize()[::-1], 3))
    smooth = ndimage.gaussian_filter(noise, (*(PERTURBATION_SIGMA_MM / MOTION_SPACING_MM,) * 3, 0))
    return smooth / np.abs(smooth).max(axis=(0, 1, 2))


def _motion_jacobian(vectors: np.ndarray) -> np.ndarray:
    """det(I + grad u) of (z, y, x, 3) LPS vectors on the axis-aligned motion grid."""
    return metrics.jacobian_determinant(np.moveaxis(vectors[..., ::-1], -1, 0), (MOTION_SPACING_MM,) * 3)


def jacobian_determinant(field: sitk.Image) -> np.ndarray:
    """det(I + grad u) of a displacement field image (LPS mm) on its own grid, (z, y, x)."""
    return metrics.jacobian_determinant(field_to_voxel_flow(field))


# ----------------------------------------------------------------------------- intensities and landmarks


def _compress_lung(fixed: sitk.Image, fixed_mask: sitk.Image, jacobian: sitk.Image) -> sitk.Image:
    """Mass conservation in the lung: air-like HU inside the mask become -1000 + (HU + 1000) * det J,
    at most -400 HU (vessels and soft tissue keep their density)."""
    hu = sitk.GetArrayFromImage(fixed)
    lung = (sitk.GetArrayFromImage(fixed_mask) > 0) & (hu < AIR_HU)
    compressed = -1000.0 + (hu + 1000.0) * sitk.GetArrayFromImage(jacobian)
    hu[lung] = np.minimum(compressed[lung], AIR_HU)
    result = sitk.GetImageFromArray(hu)
    result.CopyInformation(fixed)
    return result


def _add_noise(image: sitk.Image, noise_hu: float, rng: np.random.Generator) -> sitk.Image:
    """``image`` (float32 HU) plus independent Gaussian noise of std ``noise_hu``."""
    values = sitk.GetArrayFromImage(image)
    if noise_hu > 0:
        values += np.float32(noise_hu) * rng.standard_normal(values.shape, dtype=np.float32)
    result = sitk.GetImageFromArray(values)
    result.CopyInformation(image)
    return result


def _sample_landmarks(image: sitk.Image, mask: sitk.Image, count: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``count`` vessel-like points (N, 3) LPS mm inside ``mask``, spread out.

    Candidates are local maxima above -500 HU of the image smoothed with a
    1 mm Gaussian, at least 3 mm inside the mask. Brighter ones are taken
    first, ties in seeded random order, keeping a minimum distance that shrinks
    until enough are found.
    """
    spacing = np.asarray(image.GetSpacing())
    inner_array = ndimage.minimum_filter(sitk.GetArrayFromImage(mask) > 0, box_size(3.0, image), mode="constant")
    if count <= 0 or not inner_array.any():
        return np.zeros((0, 3))
    box = tuple(slice(idx.min(), idx.max() + 1) for idx in np.nonzero(inner_array))
    smooth = ndimage.gaussian_filter(sitk.GetArrayFromImage(image)[box], 1.0 / spacing[::-1])
    peaks = (smooth == ndimage.maximum_filter(smooth, 3)) & inner_array[box] & (smooth > LANDMARK_HU)
    indices = np.argwhere(peaks) + [s.start for s in box]
    values = smooth[peaks]
    order = np.lexsort((rng.permutation(len(values)), -values))
    points = index_to_points(indices[order][:, ::-1].astype(float), image)

    chosen: list[int] = []
    distance = 0.6 * (inner_array.sum() * spacing.prod() / count) ** (1.0 / 3.0)
    while len(chosen) < count and distance > 0.5:
        for candidate in range(len(points)):
            if len(chosen) == count:
                break
            gaps = np.sum((points[chosen] - points[candidate]) ** 2, axis=1)
            if not chosen or gaps.min() >= distance ** 2:
                chosen.append(candidate)
        distance *= 0.7
    return points[sorted(chosen)]
