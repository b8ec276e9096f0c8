"""Evaluation metrics on numpy arrays (the paper's section 4.3, plus TRE and SDlogJ)."""

from __future__ import annotations

import numpy as np


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Eq. 5: 2|A and B| / (|A| + |B|) of two binary masks (1.0 when both are empty)."""
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def _pieces(fixed: np.ndarray, warped: np.ndarray, mask: np.ndarray | None):
    """Matching float32 1-D pieces of the two arrays (only voxels where ``mask`` is True, when given),
    one slice of the first axis at a time: a 512x512x300 image is never copied whole."""
    fixed, warped = np.asarray(fixed), np.asarray(warped)
    if fixed.shape != warped.shape or (mask is not None and np.shape(mask) != fixed.shape):
        raise ValueError(f"shapes differ: fixed {fixed.shape}, warped {warped.shape}"
                         + ("" if mask is None else f", mask {np.shape(mask)}"))
    rows = fixed.shape[0] if fixed.ndim > 1 else 1
    fixed, warped = fixed.reshape(rows, -1), warped.reshape(rows, -1)
    keep = None if mask is None else np.asarray(mask, dtype=bool).reshape(rows, -1)
    for row in range(rows):
        f, w = (fixed[row], warped[row]) if keep is None else (fixed[row][keep[row]], warped[row][keep[row]])
        yield f.astype(np.float32, copy=False), w.astype(np.float32, copy=False)


def _sums(fixed: np.ndarray, warped: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Voxel count and the sums of f, w, f^2, w^2 and f w over the compared voxels, accumulated in float64
    slice by slice."""
    sums = np.zeros(6)
    for f, w in _pieces(fixed, warped, mask):
        f, w = f.astype(np.float64), w.astype(np.float64)  # once each: 3x faster than casting per product
        sums += (f.size, f.sum(), w.sum(), np.dot(f, f), np.dot(w, w), np.dot(f, w))
    return sums


def mse(fixed: np.ndarray, warped: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Eq. 6: mean squared difference over all voxels, or those where ``mask`` is True (NaN if none)
    (on [0, 1]-normalised images, 1 - MSE is the paper's score)."""
    return _mse_of(_sums(fixed, warped, mask))


def ncc(fixed: np.ndarray, warped: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Eq. 7: global normalised cross-correlation in [-1, 1] over all voxels, or those where ``mask``
    is True (0 if either image is constant there, NaN if there are none)."""
    return _ncc_of(_sums(fixed, warped, mask))


def mse_and_ncc(fixed: np.ndarray, warped: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float]:
    """:func:`mse` and :func:`ncc` together, from one pass over the voxels."""
    sums = _sums(fixed, warped, mask)
    return _mse_of(sums), _ncc_of(sums)


def _mse_of(sums: np.ndarray) -> float:
    count, _, _, ff, ww, fw = sums
    return float(max(ff + ww - 2.0 * fw, 0.0) / count) if count else float("nan")


def _ncc_of(sums: np.ndarray) -> float:
    count, sum_f, sum_w, ff, ww, fw = sums
    if not count:
        return float("nan")
    cross, var_f, var_w = fw - sum_f * sum_w / count, ff - sum_f ** 2 / count, ww - sum_w ** 2 / count
    if var_f <= 1e-9 * ff or var_w <= 1e-9 * ww:  # constant, up to the rounding of the sums
        return 0.0
    return float(np.clip(cross / np.sqrt(var_f * var_w), -1.0, 1.0))


def target_registration_error(mapped_points_mm: np.ndarray, moving_points_mm: np.ndarray) -> np.ndarray:
    """Per-landmark TRE (mm): distance from each mapped fixed point p + u(p) to its true moving point."""
    return np.linalg.norm(np.asarray(mapped_points_mm) - np.asarray(moving_points_mm), axis=1)


def learn2reg_tre(fixed_points_vox: np.ndarray, moving_points_vox: np.ndarray, flow_vox: np.ndarray,
                  moving_spacing: np.ndarray) -> np.ndarray:
    """Learn2Reg TRE (mm): the voxel field (3, X, Y, Z) on the fixed grid, sampled linearly at the
    fixed keypoints (N, 3; x, y, z voxels), moves them; the residual to the moving keypoints is
    scaled by the moving image's spacing (x, y, z mm)."""
    from scipy.ndimage import map_coordinates

    points = np.asarray(fixed_points_vox, dtype=np.float64)
    displacement = np.stack([map_coordinates(flow_vox[c], points.T, order=1, mode="nearest") for c in range(3)],
                            axis=1)
    return np.linalg.norm((points + displacement - moving_points_vox) * np.asarray(moving_spacing), axis=1)


def jacobian_determinant(field: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """det(I + grad u) per voxel of a field (3, A0, A1, A2) whose component c displaces along array
    axis c, in the same length unit as ``spacing`` (central differences, float32)."""
    field = np.asarray(field, dtype=np.float32)
    # j[r][c] = d u_r / d x_c + delta_rc
    j = [[g + (r == c) for c, g in enumerate(np.gradient(field[r], *spacing))] for r in range(3)]
    return (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1])
            - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
            + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))


def jacobian_statistics(field: np.ndarray, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> dict:
    """SDlogJ (std of log det J over voxels with det J > 0), % folded voxels (det J <= 0), min/max det J."""
    det = jacobian_determinant(field, spacing)
    positive = det[det > 0]
    return {
        "sdlogj": float(np.std(np.log(positive))) if positive.size else float("nan"),
        "folding_percent": float(100.0 * np.mean(det <= 0)),
        "jacobian_min": float(det.min()),
        "jacobian_max": float(det.max()),
    }
