"""The paper's windowing, normalisation and crop, and the network grid mapping."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from LungUDRNetLib.phantom import chest_phantom, lung_mask_phantom, make_grid
from LungUDRNetLib.preprocess import (PreprocessConfig, min_max, network_grid, normalise_ct, prepare_pair,
                                      replace_non_finite, to_grid, window)


def test_window_equation_one():
    values = window(np.array([-2000.0, -1350.0, -600.0, 150.0, 900.0]), level=-600.0, width=1500.0)
    np.testing.assert_allclose(values, [0.0, 0.0, 127.5, 255.0, 255.0])


def test_min_max_equation_two():
    np.testing.assert_allclose(min_max(np.array([2.0, 4.0, 6.0])), [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(min_max(np.full(4, 7.0)), np.zeros(4))
    np.testing.assert_array_equal(min_max(np.full(3, np.inf)), np.zeros(3))  # not NaN
    assert window(150.0, level=-600.0, width=1500.0) == 255.0  # a scalar as well as an array


def test_normalise_ct_leaves_its_input_alone_and_writes_one_new_array():
    hu = np.array([[-1350, -600], [150, 400]], dtype=np.int16)
    kept = hu.copy()
    values = normalise_ct(hu, PreprocessConfig(window_level=-600.0, window_width=1500.0))
    np.testing.assert_array_equal(hu, kept)
    np.testing.assert_allclose(values, [[0.0, 0.5], [1.0, 1.0]], atol=1e-6)
    assert values.dtype == np.float32


def test_normalise_treats_nan_as_air():
    values = normalise_ct(np.array([np.nan, -1000.0, 100.0]), PreprocessConfig())
    assert np.all(np.isfinite(values))
    assert values[0] == values[1] == 0.0 and values[2] == 1.0


def test_crop_mode_is_the_papers_exact_crop_of_208_to_192():
    fixed = make_grid((24, 24, 26), (1.75, 1.25, 1.75), (10.0, -5.0, 3.0), np.diag([-1.0, 1.0, 1.0]))
    array = np.random.default_rng(0).normal(size=(26, 24, 24)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(fixed)
    grid = network_grid(image, PreprocessConfig(grid_shape=(24, 24, 24), grid_mode="crop"))
    np.testing.assert_allclose(to_grid(image, grid), array[1:25], atol=1e-5)
    assert grid.GetSpacing() == image.GetSpacing()


def test_fit_grid_with_roi_covers_the_mask_only():
    fixed = chest_phantom(make_grid((48, 40, 36), (2.0, 2.5, 3.0), (-40.0, 7.0, 2.0)))
    mask = lung_mask_phantom(fixed)
    config = PreprocessConfig(grid_shape=(16, 16, 16), roi_margin_mm=0.0)
    full, roi = network_grid(fixed, config), network_grid(fixed, config, roi_mask=mask)
    assert all(r < f for r, f in zip(roi.GetSpacing(), full.GetSpacing()))
    assert to_grid(mask, roi, sitk.sitkNearestNeighbor).mean() > to_grid(mask, full, sitk.sitkNearestNeighbor).mean()


def test_prepare_pair_handles_different_geometries():
    fixed = chest_phantom(make_grid((40, 36, 30), (1.5, 2.0, 2.5), (-30.0, -36.0, -37.0)))
    moving = chest_phantom(make_grid((30, 30, 20), (2.0, 2.4, 3.75), (-30.0, -36.0, -37.0)))
    grid, fixed01, moving01 = prepare_pair(fixed, moving, PreprocessConfig(grid_shape=(16, 18, 20)))
    assert fixed01.shape == moving01.shape == (16, 18, 20)
    assert 0.0 <= fixed01.min() and fixed01.max() <= 1.0 and moving01.max() == pytest.approx(1.0)
    assert np.corrcoef(fixed01.ravel(), moving01.ravel())[0, 1] > 0.8


def test_replace_non_finite_keeps_geometry_and_warns(caplog):
    image = chest_phantom(make_grid((10, 10, 10), (1.0, 1.0, 2.0), (5.0, 5.0, 5.0)))
    array = sitk.GetArrayFromImage(image)
    array[0, 0, :3] = [np.nan, np.inf, -np.inf]
    broken = sitk.GetImageFromArray(array)
    broken.CopyInformation(image)
    cleaned = replace_non_finite(broken, "moving image")
    assert np.all(np.isfinite(sitk.GetArrayViewFromImage(cleaned)))
    assert cleaned.GetOrigin() == image.GetOrigin()
    assert "3 NaN/Inf voxels" in caplog.text


def test_canonical_grid_keeps_its_spacing_and_centres_on_the_lungs_however_the_scan_is_cut_or_stored():
    fixed = chest_phantom(make_grid((60, 50, 40), (1.5, 2.0, 2.5), (-45.0, -50.0, -50.0)))
    mask = lung_mask_phantom(fixed)
    config = PreprocessConfig(grid_shape=(16, 24, 20), grid_mode="canonical", grid_spacing_mm=6.0, roi_margin_mm=0.0)
    grid = network_grid(fixed, config, roi_mask=mask)
    assert grid.GetSpacing() == pytest.approx((6.0, 6.0, 6.0)) and grid.GetSize() == (20, 24, 16)
    assert grid.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    lung = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1]
    corners = [fixed.TransformContinuousIndexToPhysicalPoint([float(v) for v in c])
               for c in (lung.min(axis=0) - 0.5, lung.max(axis=0) + 0.5)]
    centre = grid.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in grid.GetSize()])
    np.testing.assert_allclose(centre, np.mean(corners, axis=0), atol=1e-6)
    # a wider field of view around the same lungs, stored flipped: the same canonical grid; "fit" stretches
    wider = sitk.Flip(sitk.ConstantPad(fixed, (10, 0, 6), (4, 8, 0), -1000), [True, False, True])
    wider_mask = sitk.Flip(sitk.ConstantPad(mask, (10, 0, 6), (4, 8, 0), 0), [True, False, True])
    again = network_grid(wider, config, roi_mask=wider_mask)
    assert again.GetSize() == grid.GetSize()
    np.testing.assert_allclose(again.GetOrigin(), grid.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(again.GetSpacing(), grid.GetSpacing())
    fit = PreprocessConfig(grid_shape=(16, 24, 20), grid_mode="fit")
    assert network_grid(wider, fit).GetSpacing() != pytest.approx(network_grid(fixed, fit).GetSpacing())


@pytest.mark.parametrize("settings, message", [
    ({"grid_mode": "stretch"}, "unknown grid mode"), ({"grid_mode": "canonical"}, "grid_spacing_mm"),
    ({"window_width": 0.0}, "window_width"), ({"grid_shape": (0, 4, 4)}, "grid_shape")])
def test_preprocess_settings_that_cannot_work_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        PreprocessConfig(**settings)


def test_canonical_grid_says_when_the_lungs_do_not_fit(caplog):
    fixed = chest_phantom(make_grid((60, 50, 40), (1.5, 2.0, 2.5), (-45.0, -50.0, -50.0)))
    mask = lung_mask_phantom(fixed)
    small = PreprocessConfig(grid_shape=(4, 4, 4), grid_mode="canonical", grid_spacing_mm=6.0, roi_margin_mm=0.0)
    network_grid(fixed, small, roi_mask=mask)
    assert "lung box" in caplog.text and "is larger than the network grid (24 x 24 x 24 mm)" in caplog.text
    caplog.clear()
    network_grid(fixed, PreprocessConfig(grid_shape=(32, 32, 32), grid_mode="canonical", grid_spacing_mm=6.0),
                 roi_mask=mask)
    assert "larger than the network grid" not in caplog.text
