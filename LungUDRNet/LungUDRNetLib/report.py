"""Before/after metrics of one registration, as written to ``metrics.json``, and its one-line summary.

Image similarity (the paper's 1-MSE and NCC on windowed, min-max normalised
intensities) is measured on the **overlap**: the fixed voxels p whose moving
point lies inside the moving scan both before registration (p) and after it
(p + u(p)), one voxel set for both so that the two numbers compare. Elsewhere
the resampled moving scan is padding, not anatomy: scored as air it made a
correct registration of a partial scan look worse. With a fixed lung mask the
same scores are also given inside the lungs (the mask within the overlap).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import SimpleITK as sitk

from . import metrics
from .geometry import field_to_voxel_flow, index_to_lps_matrix, transform_points, warp_image
from .preprocess import normalise_ct, same_geometry
from .registration import OPTIMISED, RegistrationResult


def on_fixed_grid(image: sitk.Image, fixed: sitk.Image, interpolator: int) -> sitk.Image:
    """``image`` resampled onto ``fixed``'s grid with no transform (the 'before' state); ``image`` itself when
    it is on that grid already (as the phases of a 4D CT are), where resampling would give its own voxels."""
    if same_geometry(image, fixed):
        return image
    outside = float(np.min(sitk.GetArrayViewFromImage(image)))
    return sitk.Resample(image, fixed, sitk.Transform(), interpolator, outside, image.GetPixelID())


def overlap_mask(fixed: sitk.Image, moving: sitk.Image, displacement: sitk.Image | None = None,
                 moved_inside: np.ndarray | None = None) -> np.ndarray:
    """Bool array (z, y, x) on ``fixed``'s grid: True where both p and p + u(p) lie inside ``moving``.

    ``displacement`` is the pull field u (LPS mm) on ``fixed``'s grid; or
    ``moved_inside`` (bool (z, y, x) on that grid, e.g.
    :attr:`.registration.RegistrationResult.moved_inside`) says where p + u(p)
    lies inside, and no field is needed. Inside as :func:`inside_moving` says.
    """
    if moved_inside is not None:
        if moved_inside.shape != fixed.GetSize()[::-1]:
            raise ValueError(f"moved_inside {moved_inside.shape} is not on the fixed grid {fixed.GetSize()[::-1]}")
    elif displacement is None:
        raise ValueError("overlap_mask needs the displacement or moved_inside")
    else:
        moved_inside = inside_moving(fixed, moving, displacement)
    return inside_moving(fixed, moving) & moved_inside


def inside_moving(fixed: sitk.Image, moving: sitk.Image, displacement: sitk.Image | None = None) -> np.ndarray:
    """Bool array (z, y, x) on ``fixed``'s grid: True where p, or p + u(p) with ``displacement`` (the pull
    field u, LPS mm, on ``fixed``'s grid), lies inside ``moving``: a continuous moving index in
    [-0.5, size - 0.5) on every axis, the extent where a resampler reads moving data. Computed one fixed
    slice at a time, from the images' index-to-LPS matrices."""
    if displacement is not None and displacement.GetSize() != fixed.GetSize():
        raise ValueError(f"displacement grid {displacement.GetSize()} is not the fixed grid {fixed.GetSize()}")
    lps_to_moving = np.linalg.inv(index_to_lps_matrix(moving))
    fixed_to_moving = lps_to_moving @ index_to_lps_matrix(fixed)  # fixed (i, j, k) -> moving (i, j, k)
    columns, rows, slices = fixed.GetSize()
    i, j = np.arange(columns, dtype=np.float64), np.arange(rows, dtype=np.float64)[:, None]
    upper = np.asarray(moving.GetSize()) - 0.5
    vectors = None if displacement is None else sitk.GetArrayViewFromImage(displacement)  # (z, y, x, 3) LPS mm
    inside = np.ones((slices, rows, columns), dtype=bool)
    for k in range(slices):
        for axis in range(3):
            a = fixed_to_moving[axis]
            index = a[0] * i + a[1] * j + (a[2] * k + a[3])  # moving index of p
            if vectors is not None:
                index = index + vectors[k] @ lps_to_moving[axis, :3]  # ... of p + u(p)
            inside[k] &= (index >= -0.5) & (index < upper[axis])
    return inside


def _similarity(fixed: np.ndarray, other: np.ndarray, region: np.ndarray, prefix: str) -> dict:
    """1-MSE and NCC (%) over the voxels of ``region``; None when it is empty."""
    if not region.any():
        return {f"{prefix}one_minus_mse_percent": None, f"{prefix}ncc_percent": None}
    mse, ncc = metrics.mse_and_ncc(fixed, other, region)
    return {f"{prefix}one_minus_mse_percent": 100.0 * (1.0 - mse), f"{prefix}ncc_percent": 100.0 * ncc}


def registration_report(fixed: sitk.Image, moving: sitk.Image, result: RegistrationResult,
                        fixed_mask: sitk.Image | None = None,
                        moving_mask: sitk.Image | None = None, fixed_points: np.ndarray | None = None,
                        moving_points: np.ndarray | None = None) -> dict:
    """Metrics before (identity) and after registration, Jacobian statistics, runtime and device.

    * ``overlap_percent``: the share of the fixed grid's voxels in the overlap
      (fixed voxels p with p and p + u(p) inside the moving scan);
      ``lung_overlap_percent`` (with ``fixed_mask``): the share of the fixed
      lung mask's voxels in it.
    * ``before``/``after``: ``one_minus_mse_percent`` and ``ncc_percent`` on
      the overlap; ``lung_one_minus_mse_percent`` and ``lung_ncc_percent`` on
      the fixed lung mask within the overlap (with ``fixed_mask``); None where
      that region is empty. ``dice_percent``: lung Dice on the whole fixed grid
      (with both masks); ``tre_mm`` (with points). The masks default to
      those the registration used (given or automatic: ``stages.lung_masks``).
    * ``stages``: which stage was kept (identity, affine, network or
      instance optimisation) and each stage's lung NCC on the network grid.
    * ``jacobian``: SDlogJ and folding of the field on its native grid (the
      resolution it really has; the fixed grid where there is none).

    Points are LPS mm, row i of ``fixed_points`` corresponding to row i of ``moving_points``.
    """
    fixed_mask = result.fixed_mask if fixed_mask is None else fixed_mask
    moving_mask = result.moving_mask if moving_mask is None else moving_mask
    with ThreadPoolExecutor(max_workers=1) as pool:  # SimpleITK's resampling releases the GIL meanwhile
        moved_after = None if fixed_mask is None or moving_mask is None else pool.submit(
            warp_image, moving_mask, fixed, sitk.sitkNearestNeighbor, 0, result.transform)
        return _report(fixed, moving, result, fixed_mask, moving_mask, moved_after, fixed_points, moving_points)


def _report(fixed: sitk.Image, moving: sitk.Image, result: RegistrationResult, fixed_mask: sitk.Image | None,
            moving_mask: sitk.Image | None, moved_after: Future | None, fixed_points: np.ndarray | None,
            moving_points: np.ndarray | None) -> dict:
    """:func:`registration_report`, with ``moved_after`` the moving mask being warped meanwhile (None without
    both masks)."""
    preprocess = result.preprocess
    fixed_values = normalise_ct(sitk.GetArrayViewFromImage(fixed), preprocess)
    before = normalise_ct(sitk.GetArrayFromImage(on_fixed_grid(moving, fixed, sitk.sitkLinear)), preprocess)
    after = normalise_ct(sitk.GetArrayViewFromImage(result.warped), preprocess)
    overlap = (overlap_mask(fixed, moving, result.displacement) if result.moved_inside is None
               else overlap_mask(fixed, moving, moved_inside=result.moved_inside))
    regions = {"": overlap}
    report = {
        "device": result.device,
        "runtime_s": {k: round(v, 4) for k, v in result.timings.items()},
        "model": result.model_info,
        "overlap_percent": 100.0 * float(overlap.mean()),
    }
    if fixed_mask is not None:
        lungs = sitk.GetArrayViewFromImage(fixed_mask) > 0
        regions["lung_"] = lungs & overlap
        report["lung_overlap_percent"] = 100.0 * float(regions["lung_"].sum() / lungs.sum()) if lungs.any() else None
    for state, values in (("before", before), ("after", after)):
        report[state] = {key: value for prefix, region in regions.items()
                         for key, value in _similarity(fixed_values, values, region, prefix).items()}
    field = result.displacement if result.native_displacement is None else result.native_displacement
    report["jacobian"] = metrics.jacobian_statistics(field_to_voxel_flow(field))
    if fixed_mask is not None and moving_mask is not None:
        fixed_array = sitk.GetArrayViewFromImage(fixed_mask)
        moved_before = on_fixed_grid(moving_mask, fixed, sitk.sitkNearestNeighbor)
        report["before"]["dice_percent"] = 100.0 * metrics.dice(fixed_array, sitk.GetArrayViewFromImage(moved_before))
        warped_mask = moved_after.result()  # kept alive while its voxels are viewed
        report["after"]["dice_percent"] = 100.0 * metrics.dice(fixed_array, sitk.GetArrayViewFromImage(warped_mask))
    if fixed_points is not None and moving_points is not None:
        for state, mapped in (("before", fixed_points), ("after", transform_points(fixed_points, result.transform))):
            tre = metrics.target_registration_error(mapped, moving_points)
            report[state]["tre_mm"] = {"mean": float(tre.mean()), "std": float(tre.std()),
                                       "p90": float(np.percentile(tre, 90)), "max": float(tre.max())}
    report["stages"] = {"kept": result.kept_stage, "lung_masks": result.mask_sources,
                        "scores": [asdict(score) for score in result.stages]}
    return report


def summary_line(report: dict) -> str:
    """A :func:`registration_report` on one line for people: NCC before -> after in the lungs (on the
    overlap when no lung mask was given), lung Dice and TRE when known, folded voxels, runtime, device."""
    before, after = report["before"], report["after"]
    lungs = after.get("lung_ncc_percent") is not None
    key, region = ("lung_ncc_percent", "in the lungs") if lungs else ("ncc_percent", "on the overlap")
    share = report.get("lung_overlap_percent" if lungs else "overlap_percent")
    if share is not None and share < 99.5:  # the moving scan misses part of the fixed scan
        region += f" ({share:.0f}% of {'them in both scans' if lungs else 'the fixed scan'})"
    if after.get(key) is None:
        parts = ["NCC: none, the scans do not overlap"]
    else:
        parts = [f"NCC {region} {before[key]:.1f}% -> {after[key]:.1f}%"]
    if "dice_percent" in after:
        parts.append(f"lung Dice {before['dice_percent']:.1f}% -> {after['dice_percent']:.1f}%")
    if "tre_mm" in after:
        parts.append(f"TRE {before['tre_mm']['mean']:.2f} -> {after['tre_mm']['mean']:.2f} mm")
    parts.append(f"folded voxels {report['jacobian']['folding_percent']:.3f}%")
    parts.append(f"{report['runtime_s']['total']:.1f} s on {report['device']}")
    kept = report.get("stages", {}).get("kept")
    if kept and "network" not in kept:  # the network's result was dropped; instance optimisation, if kept,
        dropped = "the network" if OPTIMISED in kept else "the later stages"  # started from the stage before it
        parts.append(f"kept the {kept} result: {dropped} lowered the similarity in the lungs")
    return "; ".join(parts)
