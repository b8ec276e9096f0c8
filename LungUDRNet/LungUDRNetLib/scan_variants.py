"""How the same anatomy reaches the software differently: set-up, slice thickness, intensities, storage.

Used to make training pairs that cover what users bring and the benchmark's
"unseen scans" group. Every function keeps the ground truth exact:

* :func:`shift_patient` moves the patient rigidly inside the scanner (the
  field of view stays); it returns the new image and the rigid map S from the
  new image's LPS mm to the old one's (new(q) = old(S(q))), with which
  :func:`.geometry.compose_affine` (``S^-1``) and :func:`.geometry.affine_points`
  update a pull field and points.
* :func:`thick_slices`, :func:`scale_intensities` change voxels, not positions.
* :func:`restore` stores the same physical image with its axes permuted and
  flipped (positions unchanged, so no ground truth changes).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .geometry import affine_points, compose_affine, invert_affine
from .synth import BreathingPair

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def rigid_transform(angles_deg: tuple[float, float, float], translation_mm: tuple[float, float, float],
                    centre_lps: np.ndarray) -> sitk.Euler3DTransform:
    """Rotation by ``angles_deg`` about the LPS x, y, z axes through ``centre_lps``, then ``translation_mm``."""
    transform = sitk.Euler3DTransform()
    transform.SetCenter(tuple(float(v) for v in centre_lps))
    transform.SetRotation(*(float(np.deg2rad(a)) for a in angles_deg))
    transform.SetTranslation(tuple(float(v) for v in translation_mm))
    return transform


def random_rigid(rng: np.random.Generator, max_angle_deg: float, max_shift_mm: float,
                 centre_lps: np.ndarray) -> sitk.Euler3DTransform:
    """A rigid map with angles and shifts drawn uniformly within +-``max_angle_deg`` and +-``max_shift_mm``."""
    return rigid_transform(tuple(rng.uniform(-max_angle_deg, max_angle_deg, 3)),
                           tuple(rng.uniform(-max_shift_mm, max_shift_mm, 3)), centre_lps)


def shift_patient(image: sitk.Image, transform: sitk.Transform, interpolator: int = sitk.sitkLinear) -> sitk.Image:
    """``image`` with the patient moved: new(q) = image(transform(q)) on the same grid; air (-1024 HU) or 0
    (masks, ``interpolator`` nearest neighbour) where the patient left the field of view."""
    outside = 0.0 if interpolator == sitk.sitkNearestNeighbor else -1024.0
    return sitk.Resample(image, image, transform, interpolator, outside, image.GetPixelID())


def thick_slices(image: sitk.Image, thickness_mm: float) -> sitk.Image:
    """``image`` (HU) as if reconstructed with slices ``thickness_mm`` thick along its third axis, spaced
    as thick: a Gaussian slice profile of that FWHM, then resampled. Thinner than the spacing: unchanged."""
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    if thickness_mm <= spacing[2]:
        return image
    sigma_voxels = np.sqrt(thickness_mm ** 2 - spacing[2] ** 2) / FWHM_PER_SIGMA / spacing[2]
    blurred = ndimage.gaussian_filter1d(sitk.GetArrayFromImage(image).astype(np.float32), sigma_voxels, axis=0)
    smooth = sitk.GetImageFromArray(blurred)
    smooth.CopyInformation(image)
    size = np.asarray(image.GetSize())
    new_spacing = np.array([spacing[0], spacing[1], thickness_mm])
    new_size = [int(size[0]), int(size[1]), max(1, int(np.floor((size[2] - 1) * spacing[2] / thickness_mm)) + 1)]
    reference = sitk.Image(new_size, sitk.sitkFloat32)
    reference.SetSpacing(tuple(float(v) for v in new_spacing))
    reference.SetOrigin(image.GetOrigin())
    reference.SetDirection(image.GetDirection())
    return sitk.Resample(smooth, reference, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)


def scale_intensities(image: sitk.Image, gain: float, offset_hu: float) -> sitk.Image:
    """HU changed by a scanner calibration difference: ``(HU + 1000) * gain - 1000 + offset_hu`` (air stays
    near -1000 HU), float32."""
    values = sitk.GetArrayFromImage(image).astype(np.float32)
    result = sitk.GetImageFromArray((values + 1000.0) * np.float32(gain) - 1000.0 + np.float32(offset_hu))
    result.CopyInformation(image)
    return result


def restore(image: sitk.Image, order: tuple[int, int, int] = (0, 1, 2),
            flips: tuple[bool, bool, bool] = (False, False, False)) -> sitk.Image:
    """The same physical image stored with its index axes permuted to ``order`` and then reversed where
    ``flips`` is set; origin, spacing and direction change so that every voxel keeps its LPS position."""
    permuted = sitk.PermuteAxes(image, [int(a) for a in order])
    return sitk.Flip(permuted, [bool(f) for f in flips], flipAboutOrigin=False)


def with_setup_difference(pair: BreathingPair, transform: sitk.Transform) -> BreathingPair:
    """``pair`` with the patient of the moving scan moved by the rigid (or affine) ``transform`` (new LPS mm
    -> old, see :func:`shift_patient`; e.g. a pre-alignment); displacement and moving points follow exactly."""
    inverse = invert_affine(transform)
    return dataclasses.replace(
        pair, moving=shift_patient(pair.moving, transform),
        moving_mask=shift_patient(pair.moving_mask, transform, sitk.sitkNearestNeighbor),
        displacement=compose_affine(inverse, pair.displacement),
        moving_points=affine_points(inverse, pair.moving_points))


def with_acquisition(pair: BreathingPair, rng: np.random.Generator, thickness_mm: tuple[float, float],
                     gain: tuple[float, float], offset_hu: tuple[float, float]) -> BreathingPair:
    """``pair`` with each scan given its own slice thickness, HU gain and offset, drawn uniformly from the
    ranges; positions (masks, points, displacement) are unchanged."""
    def acquire(image: sitk.Image) -> sitk.Image:
        thick = thick_slices(image, float(rng.uniform(*thickness_mm)))
        return scale_intensities(thick, float(rng.uniform(*gain)), float(rng.uniform(*offset_hu)))
    return dataclasses.replace(pair, fixed=acquire(pair.fixed), moving=acquire(pair.moving))
