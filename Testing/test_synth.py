"""Synthetic breathing pairs: exact ground truth, plausible motion, masks and landmarks.

The phantom is built in physical (LPS mm) space on an anisotropic, offset,
flipped and tilted grid, so every check also exercises the image geometry.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from LungUDRNetLib import sample_data, synth
from LungUDRNetLib.errors import InputError
from LungUDRNetLib.geometry import index_to_points
from LungUDRNetLib.phantom import make_grid

BODY_AXES = (140.0, 95.0)  # mm, elliptic cylinder along z
LUNG_CENTRES = ((-70.0, 0.0, 0.0), (70.0, 0.0, 0.0))  # LPS mm
LUNG_AXES = (50.0, 65.0, 100.0)
TRACHEA_RADIUS = 9.0


def tilted_direction(degrees: float = 10.0) -> np.ndarray:
    """A left-right flip followed by a rotation about the x axis."""
    angle = np.deg2rad(degrees)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    return rotation @ np.diag([-1.0, 1.0, 1.0])


def physical_points(image: sitk.Image) -> np.ndarray:
    """LPS mm coordinates of every voxel centre, (z, y, x, 3)."""
    size = image.GetSize()
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    indices = np.stack([i, j, k], axis=-1).reshape(-1, 3).astype(float)
    return index_to_points(indices, image).reshape(*size[::-1], 3)


def in_body(p: np.ndarray, scale: float = 1.0) -> np.ndarray:
    return (p[..., 0] / (BODY_AXES[0] * scale)) ** 2 + (p[..., 1] / (BODY_AXES[1] * scale)) ** 2 <= 1.0


def in_lung(p: np.ndarray, scale: float = 1.0) -> np.ndarray:
    inside = np.zeros(p.shape[:-1], dtype=bool)
    for centre in LUNG_CENTRES:
        d = (p - centre) / (np.asarray(LUNG_AXES) * scale)
        inside |= np.sum(d ** 2, axis=-1) <= 1.0
    return inside


def in_trachea(p: np.ndarray) -> np.ndarray:
    """A tube of air above the lungs' centre that branches into both lungs at z = 50 mm."""
    trachea = (p[..., 0] ** 2 + (p[..., 1] + 10.0) ** 2 <= TRACHEA_RADIUS ** 2) & (p[..., 2] >= 50.0)
    bronchi = ((p[..., 2] - 50.0) ** 2 + (p[..., 1] + 10.0) ** 2 <= 6.0 ** 2) & (np.abs(p[..., 0]) <= 60.0)
    return trachea | bronchi


def chest_ct(seed: int = 0) -> sitk.Image:
    """Air -1000, body -50 with a table below, lungs -850 with bright vessels and nodules, trachea -1000 HU."""
    grid = make_grid((80, 72, 60), (4.0, 3.5, 5.0), (0.0, 0.0, 0.0), tilted_direction())
    centre = np.asarray(grid.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in grid.GetSize()]))
    grid.SetOrigin(tuple(np.asarray(grid.GetOrigin()) - centre + (12.0, -30.0, 40.0)))
    p = physical_points(grid) - (12.0, -30.0, 40.0)  # phantom coordinates: body centred on the axis
    hu = np.full(p.shape[:-1], -1000.0)
    hu[in_body(p)] = -50.0
    hu[(p[..., 1] > BODY_AXES[1] + 10.0) & (p[..., 1] < BODY_AXES[1] + 18.0)] = 300.0  # table
    hu[in_lung(p)] = -850.0
    for cx in (-70.0, 70.0):
        for dx, dy in ((-20.0, -25.0), (15.0, 20.0), (0.0, 0.0), (25.0, -10.0)):
            vessel = (p[..., 0] - cx - dx) ** 2 + (p[..., 1] - dy) ** 2 <= 3.0 ** 2
            hu[vessel & in_lung(p, 0.9)] = 40.0
        for z in (-60.0, 0.0, 60.0):
            hu[np.sum((p - (cx - 10.0, 30.0, z)) ** 2, axis=-1) <= 6.0 ** 2] = 80.0
    hu[in_trachea(p)] = -1000.0
    hu += np.random.default_rng(seed).normal(0.0, 15.0, hu.shape)
    image = sitk.GetImageFromArray(hu.astype(np.float32))
    image.CopyInformation(grid)
    return image


def phantom_coordinates(image: sitk.Image) -> np.ndarray:
    return physical_points(image) - (12.0, -30.0, 40.0)


def array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


@pytest.fixture(scope="module")
def ct() -> sitk.Image:
    return chest_ct()


@pytest.fixture(scope="module")
def exact_pair(ct) -> synth.BreathingPair:
    """No noise and no density change: fixed is exactly the warped moving image."""
    return synth.make_breathing_pair(ct, seed=3, n_landmarks=30, noise_hu=0.0, density_change=False)


@pytest.fixture(scope="module")
def pair(ct) -> synth.BreathingPair:
    return synth.make_breathing_pair(ct, seed=3, n_landmarks=30)


def test_pair_geometry_and_types(ct, pair):
    for image in (pair.fixed, pair.moving, pair.displacement, pair.fixed_mask, pair.moving_mask):
        assert image.GetSize() == ct.GetSize()
        np.testing.assert_allclose(image.GetOrigin(), ct.GetOrigin())
        np.testing.assert_allclose(image.GetSpacing(), ct.GetSpacing())
        np.testing.assert_allclose(image.GetDirection(), ct.GetDirection())
    assert pair.fixed.GetPixelID() == pair.moving.GetPixelID() == sitk.sitkFloat32
    assert pair.displacement.GetPixelID() == sitk.sitkVectorFloat32
    assert pair.displacement.GetNumberOfComponentsPerPixel() == 3
    assert pair.fixed_mask.GetPixelID() == pair.moving_mask.GetPixelID() == sitk.sitkUInt8
    assert pair.fixed_points.shape == pair.moving_points.shape == (30, 3)


def test_fixed_is_moving_pulled_through_the_field(exact_pair):
    transform = sitk.DisplacementFieldTransform(sitk.Cast(exact_pair.displacement, sitk.sitkVectorFloat64))
    # ITK's nearest-neighbour extrapolation where p + u(p) leaves the CT, as the generator documents
    warped = sitk.Resample(exact_pair.moving, exact_pair.fixed, transform, sitk.sitkLinear, 0.0,
                           sitk.sitkFloat32, True)
    np.testing.assert_allclose(array(warped), array(exact_pair.fixed), atol=1e-3)
    plain = sitk.Resample(exact_pair.moving, exact_pair.fixed, transform, sitk.sitkLinear, np.nan)
    inside = ~np.isnan(array(plain))
    assert inside.mean() > 0.95
    np.testing.assert_allclose(array(plain)[inside], array(exact_pair.fixed)[inside], atol=1e-3)
    assert np.abs(array(exact_pair.fixed) - array(exact_pair.moving)).max() > 300  # it did move


def test_field_is_smooth_and_does_not_fold(exact_pair):
    u = array(exact_pair.displacement).astype(np.float64)
    spacing = exact_pair.displacement.GetSpacing()
    gradients = [np.gradient(u, spacing[2 - axis], axis=axis) for axis in range(3)]
    assert max(np.abs(g).max() for g in gradients) < 0.6  # mm per mm
    jacobian = synth.jacobian_determinant(exact_pair.displacement)
    assert 0.3 < jacobian.min() and jacobian.max() < 2.0
    lung = array(exact_pair.fixed_mask) > 0
    assert jacobian[lung].mean() > 1.02  # the inhale lung is larger than the exhale lung


def test_motion_is_respiratory(ct, exact_pair):
    u = array(exact_pair.displacement)
    p = phantom_coordinates(ct)
    magnitude = np.linalg.norm(u, axis=-1)
    outside = ~in_body(p, 1.1)
    assert magnitude[outside].max() < 0.5
    deep_lung = in_lung(p, 0.7)
    chest_wall = in_body(p) & ~in_body(p, 0.85) & (np.abs(p[..., 2]) < 80.0)
    assert magnitude[deep_lung].mean() > 2.5 * magnitude[chest_wall].mean()
    base = deep_lung & (p[..., 2] < -40.0)
    apex = deep_lung & (p[..., 2] > 40.0)
    assert -u[..., 2][base].mean() > 2.0 * -u[..., 2][apex].mean()
    assert u[..., 2][base].mean() < -7.0  # exhale points lie superior to their inhale position
    assert 10.0 < magnitude[in_lung(p)].max() < 16.0  # ~ amplitude_mm = 12


def test_large_amplitude_is_scaled_down_rather_than_folding(ct):
    pair = synth.make_breathing_pair(ct, amplitude_mm=60.0, n_landmarks=0, noise_hu=0.0)
    assert synth.jacobian_determinant(pair.displacement).min() > 0.1
    assert pair.fixed_points.shape == (0, 3)


def test_masks(ct, exact_pair):
    p = phantom_coordinates(ct)
    mask = array(synth.lung_mask(ct)) > 0
    assert not mask[~in_body(p)].any()  # outside air and table excluded
    assert mask[in_lung(p, 0.95)].mean() > 0.97  # lungs included, vessels and nodules filled
    assert not mask[~in_lung(p, 1.1)].any()  # trachea, bronchi and body excluded
    np.testing.assert_array_equal(array(exact_pair.moving_mask), mask)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(exact_pair.displacement, sitk.sitkVectorFloat64))
    warped = sitk.Resample(exact_pair.moving_mask, exact_pair.fixed_mask, transform, sitk.sitkNearestNeighbor, 0,
                           sitk.sitkUInt8, True)
    np.testing.assert_array_equal(array(warped), array(exact_pair.fixed_mask))
    assert array(exact_pair.fixed_mask).sum() < 0.97 * mask.sum()  # the exhale lung is smaller


def test_landmarks(exact_pair):
    transform = sitk.DisplacementFieldTransform(sitk.Cast(exact_pair.displacement, sitk.sitkVectorFloat64))
    expected = np.array([transform.TransformPoint(tuple(p)) for p in exact_pair.fixed_points])
    np.testing.assert_allclose(exact_pair.moving_points, expected, atol=1e-3)
    assert np.linalg.norm(exact_pair.moving_points - exact_pair.fixed_points, axis=1).max() > 3.0

    def mask_at(mask, points):
        return np.array([mask[mask.TransformPhysicalPointToIndex(tuple(q))] for q in points])

    assert mask_at(exact_pair.fixed_mask, exact_pair.fixed_points).all()
    assert mask_at(exact_pair.moving_mask, exact_pair.moving_points).mean() >= 0.95
    values = np.array([exact_pair.fixed.EvaluateAtPhysicalPoint(tuple(q)) for q in exact_pair.fixed_points])
    assert np.median(values) > -500  # on vessels, not in the parenchyma
    gaps = np.linalg.norm(exact_pair.fixed_points[:, None] - exact_pair.fixed_points[None], axis=-1)
    assert gaps[~np.eye(len(gaps), dtype=bool)].min() > 4.0  # spread out


def test_density_change_and_noise(exact_pair, pair):
    lung = array(pair.fixed_mask) > 0
    exhale_change = array(pair.fixed)[lung & (array(exact_pair.fixed) < -700)] + 850.0
    assert 5.0 < exhale_change.mean() < 80.0  # denser exhale parenchyma (-850 HU at inhale)
    noise = array(pair.moving) - array(exact_pair.moving)
    assert 17.0 < noise.std() < 23.0 and abs(noise.mean()) < 1.0
    noise_fixed = (array(pair.fixed) - array(exact_pair.fixed))[~lung]
    assert 17.0 < noise_fixed.std() < 23.0
    assert abs(np.corrcoef(noise[~lung].ravel(), noise_fixed.ravel())[0, 1]) < 0.05  # independent


def test_same_seed_same_pair_other_seed_other_field(ct, pair):
    again = synth.make_breathing_pair(ct, seed=3, n_landmarks=30)
    for name in ("fixed", "moving", "displacement", "fixed_mask", "moving_mask"):
        np.testing.assert_array_equal(array(getattr(again, name)), array(getattr(pair, name)))
    np.testing.assert_array_equal(again.fixed_points, pair.fixed_points)
    np.testing.assert_array_equal(again.moving_points, pair.moving_points)
    other = synth.make_breathing_pair(ct, seed=4, n_landmarks=30)
    assert np.abs(array(other.displacement) - array(pair.displacement)).max() > 0.5
    assert not np.array_equal(array(other.fixed), array(pair.fixed))


def test_reference_grid(ct):
    reference = synth.grid_image((70, 60, 50), (4.5, 4.0, 6.0), synth.body_centre(ct))
    np.testing.assert_allclose(synth.body_centre(ct), (12.0, -30.0, 40.0), atol=4.0)
    pair = synth.make_breathing_pair(ct, n_landmarks=10, noise_hu=0.0, reference=reference)
    assert pair.fixed.GetSize() == (70, 60, 50)
    np.testing.assert_allclose(pair.displacement.GetSpacing(), (4.5, 4.0, 6.0))
    np.testing.assert_allclose(pair.fixed.GetDirection(), np.eye(3).ravel())
    assert synth.jacobian_determinant(pair.displacement).min() > 0.3
    resampled = synth.resample_to_grid(ct, (70, 60, 50), (4.5, 4.0, 6.0))
    np.testing.assert_array_equal(array(resampled), array(pair.moving))
    learn2reg = synth.learn2reg_like_grid(ct)
    assert learn2reg.GetSize() == (192, 192, 208)
    np.testing.assert_allclose(learn2reg.GetSpacing(), (1.75, 1.25, 1.75))
    centre = learn2reg.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in learn2reg.GetSize()])
    np.testing.assert_allclose(centre, synth.body_centre(ct))


def test_jacobian_of_a_linear_field_on_an_oblique_grid(oblique_grid):
    matrix = np.array([[0.10, 0.05, 0.0], [-0.02, 0.20, 0.03], [0.0, 0.01, -0.15]])
    field = sitk.GetImageFromArray(physical_points(oblique_grid) @ matrix.T, isVector=True)
    field.CopyInformation(oblique_grid)
    np.testing.assert_allclose(synth.jacobian_determinant(field), np.linalg.det(np.eye(3) + matrix), rtol=1e-5)  # float32 voxel flow


def test_no_lungs_is_an_input_error(ct):
    soft_tissue = sitk.Image(ct.GetSize(), sitk.sitkFloat32) + 40.0
    soft_tissue.CopyInformation(ct)
    with pytest.raises(InputError, match="no lungs"):
        synth.make_breathing_pair(soft_tissue)


def cached_ct(name: str) -> sitk.Image:
    path = sample_data.default_cache_dir() / sample_data.SAMPLE_FILES[name]
    if not path.is_file() or sample_data.sha256(path) != sample_data.CHECKSUMS[path.name]:
        pytest.skip(f"sample CT {name} not in the cache; fetch it with: python -m LungUDRNetLib.sample_data")
    return sitk.ReadImage(str(path))


def test_real_ct_pair_on_a_coarse_grid():
    ct = cached_ct("lung2")
    pair = synth.make_breathing_pair(ct, reference=synth.grid_image((128, 100, 80), (2.6, 2.6, 4.0),
                                                                     synth.body_centre(ct)))
    litres = array(pair.moving_mask).sum() * np.prod(pair.moving_mask.GetSpacing()) / 1e6
    assert 2.5 < litres < 6.0
    assert synth.jacobian_determinant(pair.displacement).min() > 0.3
    assert len(pair.fixed_points) == 100
    lung = array(pair.fixed_mask) > 0
    assert 9.0 < np.linalg.norm(array(pair.displacement), axis=-1)[lung].max() < 16.0
