"""Small synthetic chest phantoms and analytic fields for tests and smoke runs.

Not anatomy: a soft-tissue body ellipsoid with two air-filled 'lungs' that
contain bright tubular 'vessels', on any geometry (spacing, origin, direction).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .geometry import index_to_lps_matrix


def make_grid(size_xyz=(48, 40, 36), spacing=(2.0, 2.5, 3.0), origin=(0.0, 0.0, 0.0),
              direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> sitk.Image:
    """An empty float32 image with the given geometry (LPS)."""
    image = sitk.Image([int(v) for v in size_xyz], sitk.sitkFloat32)
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetDirection(tuple(float(v) for v in np.ravel(direction)))
    return image


def normalised_coordinates(grid: sitk.Image) -> np.ndarray:
    """Voxel centres as (z, y, x, 3) coordinates in [-1, 1] along the grid's own index axes."""
    axes = [np.linspace(-1.0, 1.0, n) for n in grid.GetSize()]
    i, j, k = np.meshgrid(*axes, indexing="ij")
    return np.stack([i, j, k], axis=-1).transpose(2, 1, 0, 3)


def chest_phantom(grid: sitk.Image, seed: int = 0) -> sitk.Image:
    """A CT-like phantom in HU on ``grid``: air -1000, body 40, lungs -850, vessels 100."""
    rng = np.random.default_rng(seed)
    c = normalised_coordinates(grid)
    hu = np.full(c.shape[:3], -1000.0, dtype=np.float32)
    body = (c[..., 0] / 0.9) ** 2 + (c[..., 1] / 0.75) ** 2 <= 1.0
    hu[body & (np.abs(c[..., 2]) < 0.95)] = 40.0
    for side in (-1.0, 1.0):
        lung = ((c[..., 0] - 0.4 * side) / 0.32) ** 2 + (c[..., 1] / 0.5) ** 2 + ((c[..., 2] + 0.05) / 0.75) ** 2 <= 1
        hu[lung] = -850.0
        for _ in range(4):
            centre = np.array([0.4 * side, 0.0]) + rng.uniform(-0.15, 0.15, 2)
            vessel = (c[..., 0] - centre[0]) ** 2 + (c[..., 1] - centre[1]) ** 2 <= 0.05 ** 2
            hu[lung & vessel] = 100.0
        nodule = ((c[..., 0] - 0.4 * side) ** 2 + (c[..., 1] + 0.2) ** 2 + (c[..., 2] - 0.3 * side) ** 2) <= 0.1 ** 2
        hu[nodule] = 60.0
    hu += rng.normal(0.0, 10.0, hu.shape).astype(np.float32)
    image = sitk.GetImageFromArray(hu)
    image.CopyInformation(grid)
    return image


def lung_mask_phantom(image: sitk.Image) -> sitk.Image:
    """Air-like voxels (HU < -500) inside the phantom's body: its 'lung mask' (uint8)."""
    values = sitk.GetArrayViewFromImage(image)
    c = normalised_coordinates(image)
    inside = ((c[..., 0] / 0.85) ** 2 + (c[..., 1] / 0.7) ** 2 <= 1.0) & (np.abs(c[..., 2]) < 0.9)
    mask = sitk.GetImageFromArray(((values < -500) & inside).astype(np.uint8))
    mask.CopyInformation(image)
    return mask


def analytic_field(grid: sitk.Image, translation_mm=(3.0, -2.0, 4.0), amplitude_mm: float = 3.0,
                   wavelength_mm: float = 80.0) -> sitk.Image:
    """A smooth LPS-mm field on ``grid``: a translation plus a sinusoid of the physical position.

    u(p) = t + a * (sin(2 pi p_y / L), sin(2 pi p_z / L), sin(2 pi p_x / L)) -- defined for
    every physical point p, so tests can evaluate it anywhere with :func:`analytic_displacement`.
    """
    size = grid.GetSize()
    i, j, k = np.meshgrid(*[np.arange(n) for n in size], indexing="ij")
    indices = np.stack([i, j, k], axis=-1).reshape(-1, 3)
    matrix = index_to_lps_matrix(grid)
    points = indices @ matrix[:3, :3].T + matrix[:3, 3]
    vectors = analytic_displacement(points, translation_mm, amplitude_mm, wavelength_mm)
    vectors = vectors.reshape(size[0], size[1], size[2], 3).transpose(2, 1, 0, 3)
    field = sitk.GetImageFromArray(vectors, isVector=True)
    field.CopyInformation(grid)
    return field


def analytic_displacement(points_lps: np.ndarray, translation_mm=(3.0, -2.0, 4.0), amplitude_mm: float = 3.0,
                          wavelength_mm: float = 80.0) -> np.ndarray:
    """The field of :func:`analytic_field` evaluated at LPS points (N, 3) -> (N, 3) mm."""
    p = np.atleast_2d(points_lps) * (2.0 * np.pi / wavelength_mm)
    wave = np.stack([np.sin(p[:, 1]), np.sin(p[:, 2]), np.sin(p[:, 0])], axis=1)
    return np.asarray(translation_mm) + amplitude_mm * wave
