"""The registration figure: a readable PNG, and its helpers (checkerboard, masked differences, orientation)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from LungUDRNetLib.figure import (DPI, FIGURE_INCHES, checkerboard, difference_image, orientation_letters,
                                  save_registration_figure)
from LungUDRNetLib.geometry import warp_image
from LungUDRNetLib.phantom import analytic_field, chest_phantom, make_grid


def test_checkerboard_squares_have_equal_sides_in_mm():
    a, b = np.zeros((8, 6)), np.ones((8, 6))
    board = checkerboard(a, b, spacing=(1.25, 2.5), square_mm=5.0)  # 4 rows and 2 columns per square
    expected = (np.arange(8)[:, None] // 4 + np.arange(6)[None, :] // 2) % 2
    np.testing.assert_array_equal(board, expected)


def test_checkerboard_shows_the_first_image_out_of_view():
    a, b = np.zeros((4, 4)), np.ones((4, 4))
    in_view = np.ones((4, 4), bool)
    in_view[:, 2:] = False
    board = checkerboard(a, b, spacing=(1.0, 1.0), square_mm=1.0, in_view=in_view)
    np.testing.assert_array_equal(board, [[0, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]])


def test_difference_image_leaves_out_voxels_out_of_view():
    fixed = np.array([[0.0, 10.0], [-1000.0, 40.0]])
    other = np.array([[5.0, 10.0], [1000.0, -24.0]])  # [1, 0]: padding against anatomy, 2000 HU apart
    in_view = np.array([[True, True], [False, True]])
    difference = difference_image(fixed, other, in_view)
    np.testing.assert_array_equal(difference.mask, ~in_view)
    np.testing.assert_array_equal(difference.compressed(), [5.0, 0.0, 64.0])
    assert difference.max() == 64.0
    assert not difference_image(fixed, other).mask.any()


@pytest.mark.parametrize("direction, view, expected", [
    (np.eye(3), "axial", {"left": "R", "right": "L", "top": "A", "bottom": "P"}),
    (np.eye(3), "coronal", {"left": "R", "right": "L", "top": "S", "bottom": "I"}),
    (np.diag([-1.0, -1.0, 1.0]), "axial", {"left": "L", "right": "R", "top": "P", "bottom": "A"}),  # RAS storage
    (np.diag([1.0, 1.0, -1.0]), "coronal", {"left": "R", "right": "L", "top": "I", "bottom": "S"}),
    (np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), "axial",  # i along y, j along z
     {"left": "A", "right": "P", "top": "I", "bottom": "S"}),
])
def test_orientation_letters_follow_the_direction_matrix(direction, view, expected):
    assert orientation_letters(direction, view) == expected


def test_figure_is_a_png_of_the_documented_size(tmp_path):
    grid = make_grid((40, 36, 24), (3.0, 3.0, 5.0), (-60.0, -54.0, -60.0))
    moving = chest_phantom(grid, seed=4)
    field = analytic_field(grid, (0.0, 0.0, 5.0), 3.0)
    fixed = warp_image(moving, field)
    in_view = np.ones(fixed.GetSize()[::-1], bool)
    in_view[:3] = False
    path = save_registration_figure(fixed, moving, fixed, field, tmp_path / "figure.png", title="phantom",
                                    in_view=in_view)
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        assert picture.size == (round(FIGURE_INCHES[0] * DPI), round(FIGURE_INCHES[1] * DPI))
        pixels = np.asarray(picture.convert("L"), dtype=float)
    assert pixels.std() > 20  # not a blank page
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]
