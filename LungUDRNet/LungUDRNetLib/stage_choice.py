"""Never worse than doing nothing: a registration stage is kept only if it raises the lung similarity.

The candidates (identity, affine, network, instance optimisation, in that
order) are compared on the network grid: NCC between the normalised fixed image and the
moving image as each candidate maps it, over the fixed lungs (the whole grid
without a mask) where every compared candidate samples inside the moving scan.
A candidate that maps less than half as much of that region into the moving
scan as the best one (e.g. the identity when the scans lie apart) is not
compared and never kept. A stage is kept when it scores at least as well as
the best stage before it; the result is the last stage kept. Points are LPS
mm; arrays (D, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from . import metrics
from .geometry import index_to_points, points_to_index


MIN_COVERAGE = 0.5  # share of the best candidate's overlap a candidate needs to be compared


@dataclass
class Candidate:
    """One stage's result on the network grid: the moving image as it maps it ([0, 1]) and where each
    grid point lands in the moving scan (LPS mm, (D, H, W, 3))."""

    name: str
    moving01: np.ndarray
    moving_points: np.ndarray


@dataclass
class StageScore:
    """A stage's lung NCC (%) on the network grid, and whether it was kept (None: nothing to compare)."""

    stage: str
    lung_ncc_percent: float | None
    kept: bool


def grid_points(grid: sitk.Image) -> np.ndarray:
    """The LPS mm positions of every voxel of ``grid``, (D, H, W, 3)."""
    shape = grid.GetSize()[::-1]
    indices = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1)[..., ::-1]
    return index_to_points(indices.reshape(-1, 3).astype(np.float64), grid).reshape(*shape, 3)


def inside(points: np.ndarray, image: sitk.Image) -> np.ndarray:
    """Whether LPS mm points (..., 3) lie where ``image`` has data (continuous index in [-0.5, n - 0.5))."""
    index = points_to_index(points.reshape(-1, 3), image)
    size = np.asarray(image.GetSize())
    return np.all((index >= -0.5) & (index < size - 0.5), axis=1).reshape(points.shape[:-1])


def choose(fixed01: np.ndarray, lungs: np.ndarray | None, moving: sitk.Image,
           candidates: list[Candidate]) -> tuple[str, list[StageScore]]:
    """The stage to keep and every stage's score (see the module docstring).

    ``lungs``: the fixed lung mask on the network grid (bool), or None.
    """
    region = np.ones(fixed01.shape, dtype=bool) if lungs is None else lungs.copy()
    inside_moving = [inside(candidate.moving_points, moving) & region for candidate in candidates]
    coverage = np.array([mask.sum() for mask in inside_moving], dtype=float)
    compared = coverage >= max(MIN_COVERAGE * coverage.max(), 2.0)
    for mask, used in zip(inside_moving, compared):
        if used:
            region &= mask
    scores, best = [], -np.inf
    chosen = candidates[int(np.argmax(compared))].name if compared.any() else candidates[0].name
    for candidate, used in zip(candidates, compared):
        if not used or region.sum() < 2:
            scores.append(StageScore(candidate.name, None, candidate.name == chosen and best == -np.inf))
            continue
        value = 100.0 * metrics.ncc(fixed01, candidate.moving01, region)
        kept = value >= best
        if kept:
            best, chosen = value, candidate.name
        scores.append(StageScore(candidate.name, value, kept))
    return chosen, scores
