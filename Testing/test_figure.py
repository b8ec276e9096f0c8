"""The registration figure: a readable PNG, and its checkerboard helper."""

from __future__ import annotations

import numpy as np
from PIL import Image

from LungUDRNetLib.figure import _checkerboard, save_registration_figure
from LungUDRNetLib.geometry import warp_image
from LungUDRNetLib.phantom import analytic_field, chest_phantom, make_grid


def test_checkerboard_alternates_tiles():
    a, b = np.zeros((4, 4)), np.ones((4, 4))
    board = _checkerboard(a, b, tiles=2)
    np.testing.assert_array_equal(board, [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]])


def test_figure_is_a_png_with_fourteen_panels(tmp_path):
    grid = make_grid((40, 36, 24), (3.0, 3.0, 5.0), (-60.0, -54.0, -60.0))
    moving = chest_phantom(grid, seed=4)
    field = analytic_field(grid, (0.0, 0.0, 5.0), 3.0)
    fixed = warp_image(moving, field)
    path = save_registration_figure(fixed, moving, fixed, field, tmp_path / "figure.png", title="phantom")
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        width, height = picture.size
        pixels = np.asarray(picture.convert("L"), dtype=float)
    assert width > 2.5 * height  # seven columns, two rows
    assert pixels.std() > 20  # not a blank page
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]
