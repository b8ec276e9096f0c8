"""Shared fixtures: small images with awkward geometry (anisotropic, offset, rotated and flipped)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LungUDRNetLib.phantom import make_grid

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(2)


def oblique_direction(degrees: float = 20.0) -> np.ndarray:
    """A rotation about an oblique axis composed with a left-right flip (det = -1)."""
    axis = np.array([1.0, 2.0, 2.0]) / 3.0
    angle = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    return rotation @ np.diag([-1.0, 1.0, 1.0])


@pytest.fixture
def oblique_grid() -> sitk.Image:
    """40 x 36 x 30 voxels, spacing 1.5 x 2.0 x 2.5 mm, origin (-30, 12, 50), oblique flipped direction."""
    return make_grid((40, 36, 30), (1.5, 2.0, 2.5), (-30.0, 12.0, 50.0), oblique_direction())


def shared_data(*parts: str) -> Path:
    """Path under the shared reference data, or skip the test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared reference data not available here ({'/'.join(parts)})")
    return path
