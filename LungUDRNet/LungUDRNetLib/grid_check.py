"""Checking an image's voxel grid: positive finite spacing, a finite origin and an orthonormal direction.

Every output is written on the fixed image's grid; a grid that NIfTI cannot
store (skewed or scaled axes) or that has no orientation (zero or NaN
direction, zero or negative spacing) would give results that disagree with
the input, so such images are refused by name.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import InputError

ORTHONORMAL_TOLERANCE = 1e-4  # largest |D^T D - I| entry accepted (rounding in headers stays far below)


def check_grid(spacing: Sequence[float], direction: Sequence[float], origin: Sequence[float], what: str) -> None:
    """Raise :class:`InputError` naming ``what`` unless the grid is usable (see the module docstring)."""
    spacing, origin = np.asarray(spacing, dtype=float), np.asarray(origin, dtype=float)
    matrix = np.asarray(direction, dtype=float).reshape(len(spacing), len(spacing))
    shown = " x ".join(f"{value:g}" for value in spacing)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"{what}: has voxel spacing {shown} mm; every spacing must be positive (a zero or "
                         "negative voxel size gives no orientation: store flips in the direction matrix); fix "
                         "the header or export the scan again")
    if not np.all(np.isfinite(origin)):
        raise InputError(f"{what}: has origin {tuple(origin)}, which is not a finite position; fix the header or "
                         "export the scan again")
    if not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix)) < 0.5:
        raise InputError(f"{what}: has a direction matrix that is zero, NaN or singular "
                         f"({_rows(matrix)}); the axes have no orientation: fix the header or export the scan again")
    error = np.abs(matrix.T @ matrix - np.eye(len(spacing))).max()
    if error > ORTHONORMAL_TOLERANCE:
        raise InputError(f"{what}: has a direction matrix whose axes are not orthonormal ({_rows(matrix)}: "
                         "skewed or scaled axes, e.g. a gantry tilt); NIfTI cannot store such a grid, so the "
                         "results would not lie on it: resample the scan onto an orthogonal grid first (e.g. "
                         "3D Slicer's Resample Scalar Volume, or SimpleITK's Resample)")


def _rows(matrix: np.ndarray) -> str:
    return "; ".join(" ".join(f"{value:g}" for value in row) for row in matrix)
