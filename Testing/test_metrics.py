"""Metric functions against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from LungUDRNetLib import metrics


def test_dice_hand_cases():
    assert metrics.dice(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == pytest.approx(0.5)
    assert metrics.dice(np.array([1, 1, 1, 0]), np.array([1, 1, 1, 0])) == 1.0
    assert metrics.dice(np.array([1, 0]), np.array([0, 1])) == 0.0
    assert metrics.dice(np.zeros(3), np.zeros(3)) == 1.0


def test_mse_and_ncc_hand_cases():
    assert metrics.mse(np.array([0.0, 1.0]), np.array([1.0, 1.0])) == pytest.approx(0.5)
    x = np.array([1.0, 2.0, 4.0, 7.0])
    assert metrics.ncc(x, 2 * x + 3) == pytest.approx(1.0)
    assert metrics.ncc(x, -x) == pytest.approx(-1.0)
    # (x - mean) = (-2.5, -1.5, 0.5, 3.5); y = (1, 0, 0, 0) -> (0.75, -0.25, -0.25, -0.25)
    y = np.array([1.0, 0.0, 0.0, 0.0])
    expected = (-2.5 * 0.75 + 1.5 * 0.25 - 0.5 * 0.25 - 3.5 * 0.25) / np.sqrt(21.0 * 0.75)
    assert metrics.ncc(x, y) == pytest.approx(expected)
    assert metrics.ncc(x, np.ones(4)) == 0.0
    mask = np.array([True, True, False, True])
    assert metrics.mse_and_ncc(x, y, mask) == (metrics.mse(x, y, mask), metrics.ncc(x, y, mask))
    assert metrics.mse_and_ncc(x, y, mask)[0] == pytest.approx((0.0 + 4.0 + 49.0) / 3)


def test_tre_in_millimetres():
    mapped = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    truth = np.array([[3.0, 4.0, 0.0], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(metrics.target_registration_error(mapped, truth), [5.0, 0.0])


def test_learn2reg_tre_uses_the_moving_spacing():
    flow = np.zeros((3, 6, 6, 6))
    flow[0] = 1.0  # one voxel along x everywhere
    fixed = np.array([[2.0, 2.0, 2.0], [3.5, 1.0, 4.0]])
    moving = fixed + [1.0, 0.0, 2.0]
    # residual (0, 0, 2) voxels x spacing 1.75 along z
    np.testing.assert_allclose(metrics.learn2reg_tre(fixed, moving, flow, (1.75, 1.25, 1.75)), [3.5, 3.5])


def test_jacobian_of_linear_fields():
    shape = (8, 9, 10)
    grids = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    matrix = np.array([[0.2, 0.1, 0.0], [0.0, -0.3, 0.05], [0.1, 0.0, 0.4]])
    field = np.stack([sum(matrix[r, c] * grids[c] for c in range(3)) for r in range(3)])
    det = metrics.jacobian_determinant(field)
    np.testing.assert_allclose(det, np.linalg.det(np.eye(3) + matrix), rtol=1e-5)  # float32
    # In mm with spacing 2: the same displacement (in mm) varies half as fast per mm.
    np.testing.assert_allclose(metrics.jacobian_determinant(field, (2.0, 2.0, 2.0)),
                               np.linalg.det(np.eye(3) + matrix / 2), rtol=1e-5)
    stats = metrics.jacobian_statistics(field)
    assert stats["folding_percent"] == 0.0
    assert stats["sdlogj"] == pytest.approx(0.0, abs=1e-6)


def test_folding_is_counted_and_excluded_from_sdlogj():
    field = np.zeros((3, 6, 6, 6))
    field[0] = -2.0 * np.arange(6, dtype=float)[:, None, None]  # d u_0 / d axis0 = -2 -> det = -1
    field[0, 3:] = 0.0
    stats = metrics.jacobian_statistics(field)
    assert 0.0 < stats["folding_percent"] < 100.0
    assert stats["jacobian_min"] < 0
    assert np.isfinite(stats["sdlogj"])
