"""Geometry conventions checked against SimpleITK's own resampling and transforms."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from LungUDRNetLib import geometry
from LungUDRNetLib.io import write_displacement_field
from LungUDRNetLib.phantom import analytic_displacement, analytic_field, chest_phantom, make_grid
from LungUDRNetLib.preprocess import PreprocessConfig, flow_to_fixed_field, network_grid
from LungUDRNetLib.warp import warp


def test_index_to_ras_matches_simpleitk_and_inverts(oblique_grid):
    index = (3.0, 7.5, 11.0)
    lps = np.asarray(oblique_grid.TransformContinuousIndexToPhysicalPoint(index))
    ras = geometry.index_to_ras_matrix(oblique_grid) @ np.array([*index, 1.0])
    np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-9)
    origin, spacing, direction = geometry.geometry_from_index_to_ras(geometry.index_to_ras_matrix(oblique_grid))
    np.testing.assert_allclose(origin, oblique_grid.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(spacing, oblique_grid.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(direction, oblique_grid.GetDirection(), atol=1e-9)


def test_points_index_round_trip_matches_simpleitk(oblique_grid):
    indices = np.array([[0.0, 0.0, 0.0], [10.2, 3.3, 29.0], [39.0, 35.0, 1.5]])
    points = geometry.index_to_points(indices, oblique_grid)
    expected = [oblique_grid.TransformContinuousIndexToPhysicalPoint(tuple(i)) for i in indices]
    np.testing.assert_allclose(points, expected, atol=1e-9)
    np.testing.assert_allclose(geometry.points_to_index(points, oblique_grid), indices, atol=1e-9)


def test_voxel_flow_round_trip_and_axis_order(oblique_grid):
    flow = np.zeros((3, *oblique_grid.GetSize()[::-1]), dtype=np.float32)
    flow[2] = 1.0  # one voxel along the i (x, W) index axis
    field = geometry.voxel_flow_to_field(flow, oblique_grid)
    expected = geometry.direction_matrix(oblique_grid)[:, 0] * oblique_grid.GetSpacing()[0]
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(field)[5, 6, 7], expected, atol=1e-6)
    random_flow = np.random.default_rng(0).normal(size=flow.shape).astype(np.float32)
    back = geometry.field_to_voxel_flow(geometry.voxel_flow_to_field(random_flow, oblique_grid))
    np.testing.assert_allclose(back, random_flow, atol=1e-5)


def test_written_field_reproduces_torch_warp_with_simpleitk(oblique_grid, tmp_path):
    """The library's torch warp by a voxel flow equals SimpleITK's Resample with the written field file.

    The displacement file goes through NIfTI (intent 1006, RAS on disk) and is read back by SimpleITK,
    so this checks voxel<->mm, axis order, direction, LPS/RAS and the pull convention together.
    Tolerance 0.5 HU on a phantom with 1000 HU contrast (float32 trilinear interpolation), compared
    where p + u(p) stays 2 voxels inside the volume (the two tools differ only outside).
    """
    moving = chest_phantom(oblique_grid, seed=3)
    field = analytic_field(oblique_grid, translation_mm=(2.0, -3.0, 1.5), amplitude_mm=2.5, wavelength_mm=60.0)
    path = write_displacement_field(field, tmp_path / "displacement.nii.gz")
    read_back = sitk.ReadImage(str(path), sitk.sitkVectorFloat64)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(read_back), sitk.GetArrayViewFromImage(field), atol=1e-4)

    reference = sitk.Resample(moving, oblique_grid, sitk.DisplacementFieldTransform(read_back), sitk.sitkLinear, 0.0)
    flow = geometry.field_to_voxel_flow(field)
    moving_t = torch.from_numpy(sitk.GetArrayFromImage(moving))[None, None]
    ours = warp(moving_t, torch.from_numpy(flow)[None])[0, 0].numpy()

    target = np.stack(np.meshgrid(*[np.arange(n) for n in flow.shape[1:]], indexing="ij")) + flow
    inside = np.all([(target[a] > 2) & (target[a] < flow.shape[1 + a] - 3) for a in range(3)], axis=0)
    assert inside.mean() > 0.4
    np.testing.assert_allclose(ours[inside], sitk.GetArrayViewFromImage(reference)[inside], atol=0.5)


def test_written_field_maps_points_like_the_analytic_field(oblique_grid, tmp_path):
    field = analytic_field(oblique_grid, amplitude_mm=3.0, wavelength_mm=80.0)
    read_back = sitk.ReadImage(str(write_displacement_field(field, tmp_path / "u.nii.gz")), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(read_back)
    rng = np.random.default_rng(1)
    indices = rng.uniform(2, np.asarray(oblique_grid.GetSize()) - 3, size=(25, 3))
    points = geometry.index_to_points(indices, oblique_grid)
    mapped = np.array([transform.TransformPoint(tuple(p)) for p in points])
    # Linear interpolation of a sinusoid of wavelength 80 mm sampled every <= 2.5 mm errs by < 0.05 mm.
    np.testing.assert_allclose(mapped, points + analytic_displacement(points, amplitude_mm=3.0), atol=0.05)
    np.testing.assert_allclose(geometry.transform_points(points, field), mapped, atol=1e-4)


def test_network_grid_flow_comes_back_on_fixed_grid(oblique_grid):
    """A field sampled on a coarser 'fit' network grid returns to the fixed grid in mm, LPS."""
    field = analytic_field(oblique_grid, amplitude_mm=2.0, wavelength_mm=120.0)
    grid = network_grid(oblique_grid, PreprocessConfig(grid_shape=(16, 20, 24)))
    flow = geometry.field_to_voxel_flow(geometry.resample_field(field, grid))
    back = flow_to_fixed_field(flow, grid, oblique_grid)
    error = np.abs(sitk.GetArrayViewFromImage(back) - sitk.GetArrayViewFromImage(field))
    # mm; two linear interpolations of a 120 mm wavelength sinusoid, the first on a patient-aligned grid that
    # spans the oblique image's larger LPS box (coarser than the image's own axes would need)
    assert error.max() < 0.25


def test_fit_grid_is_patient_aligned_and_spans_the_fixed_images_lps_box(oblique_grid):
    grid = network_grid(oblique_grid, PreprocessConfig(grid_shape=(10, 12, 16)))
    fixed_corners = np.array([oblique_grid.TransformContinuousIndexToPhysicalPoint(
        (-0.5 + 40 * a, -0.5 + 36 * b, -0.5 + 30 * c)) for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    grid_corners = np.array([grid.TransformContinuousIndexToPhysicalPoint(
        (-0.5 + 16 * a, -0.5 + 12 * b, -0.5 + 10 * c)) for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    np.testing.assert_allclose(grid.GetDirection(), np.eye(3).ravel())
    np.testing.assert_allclose(grid_corners.min(axis=0), fixed_corners.min(axis=0), atol=1e-6)
    np.testing.assert_allclose(grid_corners.max(axis=0), fixed_corners.max(axis=0), atol=1e-6)


def test_the_same_scan_stored_flipped_or_permuted_gives_the_same_fit_grid(oblique_grid):
    """The network sees the anatomy the same way however a file stores its axes."""
    stored = {"as is": oblique_grid, "flipped": sitk.Flip(oblique_grid, [True, False, True]),
              "permuted": sitk.PermuteAxes(oblique_grid, [2, 0, 1])}
    grids = {name: network_grid(image, PreprocessConfig(grid_shape=(10, 12, 16))) for name, image in stored.items()}
    for grid in grids.values():
        np.testing.assert_allclose(grid.GetOrigin(), grids["as is"].GetOrigin(), atol=1e-6)
        np.testing.assert_allclose(grid.GetSpacing(), grids["as is"].GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(grid.GetDirection(), grids["as is"].GetDirection(), atol=1e-12)


def test_ras_field_round_trip(oblique_grid):
    field = analytic_field(oblique_grid)
    vectors, origin, spacing, direction = geometry.field_in_ras(field)
    np.testing.assert_allclose(vectors[..., :2], -sitk.GetArrayViewFromImage(field)[..., :2])
    back = geometry.field_from_ras(vectors, origin, spacing, direction)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(field))
    np.testing.assert_allclose(back.GetOrigin(), field.GetOrigin())
    np.testing.assert_allclose(back.GetDirection(), field.GetDirection())


def test_warp_image_by_zero_field_is_identity(oblique_grid):
    moving = chest_phantom(oblique_grid)
    zero = sitk.Image(oblique_grid.GetSize(), sitk.sitkVectorFloat64, 3)
    zero.CopyInformation(oblique_grid)
    warped = geometry.warp_image(moving, zero)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(warped), sitk.GetArrayViewFromImage(moving), atol=1e-3)


def test_warp_image_by_translation_field_shifts_by_whole_voxels():
    grid = make_grid((20, 18, 16), (2.0, 2.0, 2.0))
    moving = chest_phantom(grid, seed=2)
    array = np.zeros((16, 18, 20, 3))
    array[..., 0] = 4.0  # +2 voxels along x, in mm
    shift = sitk.GetImageFromArray(array, isVector=True)
    shift.CopyInformation(grid)
    warped = sitk.GetArrayFromImage(geometry.warp_image(moving, shift))
    np.testing.assert_allclose(warped[:, :, :-2], sitk.GetArrayViewFromImage(moving)[:, :, 2:], atol=1e-3)
