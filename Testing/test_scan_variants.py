"""Scan variants keep the ground truth exact: set-up differences, slice thickness, calibration, storage."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from LungUDRNetLib import scan_variants, synth
from LungUDRNetLib.geometry import affine_points, field_to_transform, invert_affine, transform_points
from LungUDRNetLib.phantom import chest_phantom, make_grid

from test_synth import chest_ct


@pytest.fixture(scope="module")
def exact_pair() -> synth.BreathingPair:
    """No noise and no density change: fixed is exactly the moving image pulled through the field."""
    return synth.make_breathing_pair(chest_ct(), seed=4, n_landmarks=30, noise_hu=0.0, density_change=False,
                                     anterior_fraction=0.3)


def test_invert_affine_undoes_the_map():
    transform = scan_variants.rigid_transform((8.0, -5.0, 12.0), (20.0, -7.0, 3.0), np.array([10.0, -40.0, 60.0]))
    points = np.random.default_rng(0).uniform(-100, 100, (20, 3))
    moved = affine_points(transform, points)
    np.testing.assert_allclose(affine_points(invert_affine(transform), moved), points, atol=1e-9)
    assert np.abs(moved - points).max() > 10


def test_set_up_difference_keeps_fixed_equal_to_the_moving_scan_pulled_through_the_new_field(exact_pair):
    setup = scan_variants.rigid_transform((4.0, -3.0, 5.0), (6.0, -4.0, 8.0),
                                          synth.body_centre(exact_pair.moving))
    shifted = scan_variants.with_setup_difference(exact_pair, setup)
    warped = sitk.Resample(shifted.moving, shifted.fixed, field_to_transform(shifted.displacement),
                           sitk.sitkLinear, np.nan, sitk.sitkFloat32)
    values, fixed = sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(shifted.fixed)
    before = sitk.GetArrayFromImage(sitk.Resample(shifted.moving, shifted.fixed, sitk.Transform(),
                                                  sitk.sitkLinear, np.nan, sitk.sitkFloat32))
    inside = np.isfinite(values) & np.isfinite(before)  # the pulled point stays in the new field of view
    assert inside.mean() > 0.5
    after_error, before_error = (float(np.mean(np.abs(v[inside] - fixed[inside]))) for v in (values, before))
    print(f"mean |difference| before {before_error:.1f} HU, through the new field {after_error:.1f} HU")
    # two linear interpolations of a noisy 4-5 mm phantom (the shift, then the warp): blurred edges remain
    assert after_error < 0.3 * before_error
    points = sitk.GetArrayFromImage(shifted.fixed).shape  # every point of the fixed grid: S(p + u'(p)) = p + u(p)
    rng = np.random.default_rng(2)
    indices = rng.uniform(0, np.asarray(points[::-1]) - 1, (200, 3))
    fixed_points = np.array([shifted.fixed.TransformContinuousIndexToPhysicalPoint(tuple(i)) for i in indices])
    np.testing.assert_allclose(affine_points(setup, transform_points(fixed_points, shifted.displacement)),
                               transform_points(fixed_points, exact_pair.displacement), atol=1e-3)
    np.testing.assert_allclose(transform_points(shifted.fixed_points, shifted.displacement), shifted.moving_points,
                               atol=1e-3)
    assert np.abs(shifted.moving_points - exact_pair.moving_points).max() > 5.0


def test_thick_slices_take_the_slice_spacing_and_keep_the_mean_and_positions():
    image = chest_phantom(make_grid((40, 36, 60), (2.0, 2.0, 1.0), (-40.0, -36.0, -30.0)))
    thick = scan_variants.thick_slices(image, 5.0)
    assert thick.GetSpacing() == pytest.approx((2.0, 2.0, 5.0))
    assert thick.GetOrigin() == pytest.approx(image.GetOrigin())
    assert (thick.GetSize()[2] - 1) * 5.0 <= (image.GetSize()[2] - 1) * 1.0
    on_thin = sitk.GetArrayFromImage(sitk.Resample(thick, image, sitk.Transform(), sitk.sitkLinear, np.nan))
    original = sitk.GetArrayFromImage(image)
    inside = np.isfinite(on_thin)
    assert abs(np.mean(on_thin[inside]) - np.mean(original[inside])) < 10.0
    assert np.abs(on_thin[inside] - original[inside]).max() > 50.0  # edges blurred along z
    assert scan_variants.thick_slices(image, 0.8) is image


def test_scale_intensities_keeps_air_near_minus_1000():
    image = sitk.GetImageFromArray(np.array([[[-1000.0, 0.0, 1000.0]]], dtype=np.float32))
    scaled = sitk.GetArrayFromImage(scan_variants.scale_intensities(image, 1.05, -20.0))
    np.testing.assert_allclose(scaled.ravel(), [-1020.0, 30.0, 1080.0], atol=1e-3)


@pytest.mark.parametrize("order, flips", [((0, 1, 2), (True, False, True)), ((2, 0, 1), (False, True, False)),
                                          ((1, 2, 0), (True, True, True))])
def test_restore_keeps_every_voxel_at_its_physical_position(order, flips):
    image = chest_phantom(make_grid((20, 16, 12), (1.5, 2.0, 3.0), (-10.0, 5.0, 20.0)))
    stored = scan_variants.restore(image, order, flips)
    assert sorted(stored.GetSize()) == sorted(image.GetSize())
    assert stored.GetSize() != image.GetSize() or stored.GetDirection() != image.GetDirection()
    rng = np.random.default_rng(1)
    for index in rng.integers(0, image.GetSize(), (25, 3)):
        point = image.TransformIndexToPhysicalPoint([int(v) for v in index])
        assert stored.GetPixel(stored.TransformPhysicalPointToIndex(point)) == image.GetPixel([int(v) for v in index])
