"""Before/after metrics of one registration, as written to ``metrics.json``."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from . import metrics
from .geometry import field_to_voxel_flow, transform_points, warp_image
from .preprocess import normalise_ct
from .registration import RegistrationResult


def _on_fixed_grid(image: sitk.Image, fixed: sitk.Image, interpolator: int) -> sitk.Image:
    """``image`` resampled onto ``fixed``'s grid with no transform (the 'before' state)."""
    outside = float(np.min(sitk.GetArrayViewFromImage(image)))
    return sitk.Resample(image, fixed, sitk.Transform(), interpolator, outside, image.GetPixelID())


def _similarity(fixed: np.ndarray, other: np.ndarray) -> dict:
    return {"one_minus_mse_percent": 100.0 * (1.0 - metrics.mse(fixed, other)),
            "ncc_percent": 100.0 * metrics.ncc(fixed, other)}


def registration_report(fixed: sitk.Image, moving: sitk.Image, result: RegistrationResult,
                        fixed_mask: sitk.Image | None = None,
                        moving_mask: sitk.Image | None = None, fixed_points: np.ndarray | None = None,
                        moving_points: np.ndarray | None = None) -> dict:
    """Image similarity (paper's 1-MSE and NCC on normalised intensities), lung Dice, TRE (mm)
    before (identity) and after registration, Jacobian statistics, runtime and device.

    Points are LPS mm, row i of ``fixed_points`` corresponding to row i of ``moving_points``.
    """
    preprocess = result.preprocess
    fixed_values = normalise_ct(sitk.GetArrayViewFromImage(fixed), preprocess)
    before = normalise_ct(sitk.GetArrayFromImage(_on_fixed_grid(moving, fixed, sitk.sitkLinear)), preprocess)
    after = normalise_ct(sitk.GetArrayViewFromImage(result.warped), preprocess)
    report = {
        "device": result.device,
        "runtime_s": {k: round(v, 4) for k, v in result.timings.items()},
        "model": result.model_info,
        "before": _similarity(fixed_values, before),
        "after": _similarity(fixed_values, after),
        "jacobian": metrics.jacobian_statistics(field_to_voxel_flow(result.displacement)),
    }
    if fixed_mask is not None and moving_mask is not None:
        fixed_array = sitk.GetArrayViewFromImage(fixed_mask)
        moved_before = _on_fixed_grid(moving_mask, fixed, sitk.sitkNearestNeighbor)
        moved_after = warp_image(moving_mask, result.displacement, sitk.sitkNearestNeighbor, 0)
        report["before"]["dice_percent"] = 100.0 * metrics.dice(fixed_array, sitk.GetArrayViewFromImage(moved_before))
        report["after"]["dice_percent"] = 100.0 * metrics.dice(fixed_array, sitk.GetArrayViewFromImage(moved_after))
    if fixed_points is not None and moving_points is not None:
        for state, mapped in (("before", fixed_points), ("after", transform_points(fixed_points, result.displacement))):
            tre = metrics.target_registration_error(mapped, moving_points)
            report[state]["tre_mm"] = {"mean": float(tre.mean()), "std": float(tre.std()),
                                       "p90": float(np.percentile(tre, 90)), "max": float(tre.max())}
    return report
