"""A tiny Learn2Reg-layout dataset of chest phantoms with known deformations (tests, smoke runs).

Case N: ``Toy_000N_0000`` (fixed, "inspiration") is a chest phantom;
``Toy_000N_0001`` (moving, "expiration") is the same phantom deformed by a
random smooth field v: moving(q) = fixed(q + v(q)). Keypoints are exact
correspondences: fixed point p and moving point q with q + v(q) = p.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LungUDRNetLib.geometry import points_to_index, warp_image
from LungUDRNetLib.io import write_image
from LungUDRNetLib.phantom import analytic_displacement, analytic_field, chest_phantom, lung_mask_phantom, make_grid


def _inverse_points(points: np.ndarray, field_args: dict, iterations: int = 20) -> np.ndarray:
    """Solve q + v(q) = p for each LPS point p by fixed-point iteration (v smooth and small)."""
    q = points.copy()
    for _ in range(iterations):
        q = points - analytic_displacement(q, **field_args)
    return q


def _write_points(path: Path, indices: np.ndarray) -> None:
    path.write_text("".join(f"{x:.3f},{y:.3f},{z:.3f}\n" for x, y, z in indices))


def write_toy_learn2reg(root: str | Path, cases: int = 6, val_cases: int = 2, size=(40, 36, 32),
                        spacing=(5.0, 5.5, 6.0), amplitude_mm: float = 6.0, points: int = 40,
                        seed: int = 0) -> Path:
    """Write ``cases`` phantom pairs in the Learn2Reg layout under ``root``; the last ``val_cases`` are
    the ``registration_val`` pairs. Returns ``root``."""
    root = Path(root)
    for folder in ("imagesTr", "masksTr", "keypointsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grid = make_grid(size, spacing, origin=(-0.5 * size[0] * spacing[0], -0.5 * size[1] * spacing[1], -100.0),
                     direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1))
    names = []
    for case in range(1, cases + 1):
        name = f"Toy_{case:04d}"
        names.append(name)
        field_args = {"translation_mm": tuple(rng.uniform(-0.5, 0.5, 3) * amplitude_mm),
                      "amplitude_mm": amplitude_mm, "wavelength_mm": 160.0}
        fixed = chest_phantom(grid, seed=case)
        fixed_mask = lung_mask_phantom(fixed)
        field = analytic_field(grid, **field_args)
        moving = warp_image(fixed, field)
        moving_mask = warp_image(fixed_mask, field, sitk.sitkNearestNeighbor, 0)
        lung = np.argwhere(sitk.GetArrayViewFromImage(fixed_mask) > 0)[:, ::-1]  # (i, j, k)
        fixed_index = lung[rng.choice(len(lung), size=min(points, len(lung)), replace=False)].astype(float)
        fixed_points = np.array([fixed.TransformContinuousIndexToPhysicalPoint(p) for p in fixed_index])
        moving_index = points_to_index(_inverse_points(fixed_points, field_args), moving)
        for phase, image, mask, index in ((0, fixed, fixed_mask, fixed_index), (1, moving, moving_mask, moving_index)):
            stem = f"{name}_{phase:04d}"
            write_image(image, root / "imagesTr" / f"{stem}.nii.gz")
            write_image(mask, root / "masksTr" / f"{stem}.nii.gz")
            _write_points(root / "keypointsTr" / f"{stem}.csv", index)
    dataset = {
        "name": "Toy", "description": "chest phantoms with known smooth deformations",
        "tensorImageSize": {"0": "3D"}, "modality": {"0": "CT"}, "pairings": "paired",
        "numTraining": 2 * cases,
        "training": [{"image": f"./imagesTr/{n}_{p:04d}.nii.gz", "mask": f"./masksTr/{n}_{p:04d}.nii.gz",
                      "keypoints": f"./keypointsTr/{n}_{p:04d}.csv"} for n in names for p in (0, 1)],
        "registration_val": [{"fixed": f"./imagesTr/{n}_0000.nii.gz", "moving": f"./imagesTr/{n}_0001.nii.gz"}
                             for n in names[cases - val_cases:]],
    }
    (root / "Toy_dataset.json").write_text(json.dumps(dataset, indent=2))
    return root
