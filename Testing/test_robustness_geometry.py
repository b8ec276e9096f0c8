"""Property-based tests of the I/O and geometry layer over image headers (size, spacing, origin, direction)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from hypothesis import given, settings
from hypothesis import strategies as st

from LungUDRNetLib import geometry, io
from LungUDRNetLib.phantom import make_grid
from LungUDRNetLib.preprocess import PreprocessConfig, flow_to_fixed_field, network_grid

SETTINGS = settings(max_examples=20, deadline=None)


@st.composite
def grids(draw) -> sitk.Image:
    """A small float32 image with any positive spacing, origin and orthonormal direction (det +1 or -1)."""
    size = draw(st.tuples(*[st.integers(2, 6)] * 3))
    spacing = draw(st.tuples(*[st.floats(0.2, 5.0)] * 3))
    origin = draw(st.tuples(*[st.floats(-400.0, 400.0)] * 3))
    quaternion = np.array(draw(st.tuples(*[st.floats(-1.0, 1.0)] * 4)))
    if np.linalg.norm(quaternion) < 0.1:
        quaternion = np.array([1.0, 0.0, 0.0, 0.0])
    w, x, y, z = quaternion / np.linalg.norm(quaternion)
    rotation = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                         [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                         [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])
    flip = np.diag([draw(st.sampled_from([-1.0, 1.0])), 1.0, 1.0])
    return make_grid(size, spacing, origin, rotation @ flip)


def _assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-4)


@SETTINGS
@given(grid=grids(), suffix=st.sampled_from([".nii.gz", ".nrrd", ".mha"]))
def test_image_and_field_files_keep_their_geometry(grid, suffix):
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.normal(size=grid.GetSize()[::-1]).astype(np.float32))
    image.CopyInformation(grid)
    field = sitk.GetImageFromArray(rng.normal(size=(*grid.GetSize()[::-1], 3)), isVector=True)
    field.CopyInformation(grid)
    with tempfile.TemporaryDirectory() as folder:
        image_back = io.read_image(io.write_image(image, Path(folder) / f"image{suffix}"))
        field_back = io.read_displacement_field(io.write_displacement_field(field, Path(folder) / f"field{suffix}"))
    for back in (image_back, field_back):
        _assert_same_geometry(back, grid)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(image_back), sitk.GetArrayViewFromImage(image), atol=1e-6)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(field_back), sitk.GetArrayViewFromImage(field), atol=1e-5)


@SETTINGS
@given(grid=grids(), moving_grid=grids())
def test_a_zero_field_maps_every_point_to_itself(grid, moving_grid):
    zero = sitk.Image(grid.GetSize(), sitk.sitkVectorFloat64, 3)
    zero.CopyInformation(grid)
    corners = np.array([[0, 0, 0], np.asarray(grid.GetSize()) - 1, (np.asarray(grid.GetSize()) - 1) / 2.0])
    points = geometry.index_to_points(corners, grid)
    np.testing.assert_allclose(geometry.transform_points(points, zero), points, atol=1e-9)

    moving = sitk.GetImageFromArray(np.random.default_rng(1).normal(size=moving_grid.GetSize()[::-1]))
    moving.CopyInformation(moving_grid)
    identity = sitk.Resample(moving, grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    warped = geometry.warp_image(moving, zero, default_value=0.0)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(warped), sitk.GetArrayViewFromImage(identity), atol=1e-9)

    network = network_grid(grid, PreprocessConfig(grid_shape=(5, 4, 3)))
    on_fixed = flow_to_fixed_field(np.zeros((3, 5, 4, 3), np.float32), network, grid)
    _assert_same_geometry(on_fixed, grid)
    assert not np.any(sitk.GetArrayViewFromImage(on_fixed))
