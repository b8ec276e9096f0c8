"""Phantom inputs for the tests of what registration writes (no pytest here, so that child processes can import
it): a shifted pair as files (``test_result_files``, ``test_displacement_snippet``) and a stand-in for the demo's
sample CT with the grid of its pair (``test_demo``)."""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from LungUDRNetLib import synth
from LungUDRNetLib.checkpoint import save_checkpoint, untrained_model
from LungUDRNetLib.geometry import warp_image
from LungUDRNetLib.io import write_image
from LungUDRNetLib.phantom import analytic_field, chest_phantom, make_grid
from LungUDRNetLib.preprocess import PreprocessConfig

SHIFT_MM = (2.0, -3.0, 6.0)  # LPS: the pull field's mean, which the affine stage finds


def tiny_model(path: Path) -> Path:
    """An untrained network on a 32^3 grid, saved as a checkpoint."""
    return save_checkpoint(path, untrained_model()[0], PreprocessConfig(grid_shape=(32, 32, 32)))


def write_shifted_pair(folder: Path) -> dict[str, Path]:
    """``exhale.nii.gz`` (fixed) and ``inhale.nii.gz`` (moving) phantoms on different grids, the fixed one
    the moving one pulled by ``SHIFT_MM`` plus a 1 mm sinusoid, and a :func:`tiny_model` ``model.pt``."""
    moving = chest_phantom(make_grid((40, 36, 30), (1.8, 2.0, 2.6), (-36.0, -36.0, -39.0)), seed=1)
    fixed_grid = make_grid((36, 34, 28), (2.0, 2.2, 2.8), (-35.0, -38.0, -40.0))
    fixed = warp_image(moving, analytic_field(fixed_grid, translation_mm=SHIFT_MM, amplitude_mm=1.0))
    return {"fixed": write_image(fixed, folder / "exhale.nii.gz"),
            "moving": write_image(moving, folder / "inhale.nii.gz"), "model": tiny_model(folder / "model.pt")}


def demo_ct() -> sitk.Image:
    """A chest phantom standing in for the demo's sample CT: 252 x 220 x 235 mm."""
    return chest_phantom(make_grid((64, 56, 48), (4.0, 4.0, 5.0), (-126.0, -110.0, -117.5)), seed=3)


def demo_grid(ct: sitk.Image) -> sitk.Image:
    """The demo pair's grid (for the Learn2Reg one): 288 mm high, so it reaches beyond the CT above and below."""
    return synth.grid_image((48, 44, 64), (4.5, 4.0, 4.5), synth.body_centre(ct))
