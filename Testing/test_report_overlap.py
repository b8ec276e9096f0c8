"""Similarity in metrics.json and the status line is measured where both scans have data (the overlap) and
inside the lungs, never over the padding that a partial moving scan leaves on the fixed grid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from LungUDRNetLib import metrics
from LungUDRNetLib.checkpoint import save_checkpoint, untrained_model
from LungUDRNetLib.cli import main
from LungUDRNetLib.geometry import field_to_transform, warp_image
from LungUDRNetLib.io import write_image
from LungUDRNetLib.phantom import analytic_field, chest_phantom, lung_mask_phantom, make_grid
from LungUDRNetLib.preprocess import PreprocessConfig, normalise_ct
from LungUDRNetLib.registration import RegistrationResult, in_pixel_type_of, register, warp_ct
from LungUDRNetLib.report import on_fixed_grid, overlap_mask, registration_report, summary_line

SIZE = (40, 36, 32)
MOVING_SLICES = 19  # the moving scan covers 19 of the fixed scan's 32 slices (59 %)
TRANSLATION_MM = (0.0, 1.0, 12.0)  # mostly along the cut: the true field pulls part of the fixed scan out of it


@pytest.fixture(scope="module")
def partial_pair():
    """A fixed phantom, a moving scan cropped to its lower 59 % and the true field between them (LPS mm)."""
    grid = make_grid(SIZE, (2.0, 2.0, 2.5), (-40.0, -36.0, -40.0))
    whole_moving = chest_phantom(grid, seed=3)
    field = analytic_field(grid, translation_mm=TRANSLATION_MM, amplitude_mm=1.0)
    fixed = warp_image(whole_moving, field)  # fixed(p) = moving(p + u(p))
    moving = sitk.RegionOfInterest(whole_moving, (SIZE[0], SIZE[1], MOVING_SLICES), (0, 0, 0))
    result = RegistrationResult(warped=warp_image(moving, field), transform=field_to_transform(field), grid=fixed,
                                preprocess=PreprocessConfig(), device="cpu", timings={"total": 2.5},
                                fixed_grid_displacement=sitk.Cast(field, sitk.sitkVectorFloat32))
    return fixed, moving, result


def _normalised(image: sitk.Image) -> np.ndarray:
    return normalise_ct(sitk.GetArrayViewFromImage(image), PreprocessConfig())


def _identity(moving: sitk.Image, fixed: sitk.Image) -> sitk.Image:
    return sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, -1000.0, moving.GetPixelID())


def _inside_moving(moving: sitk.Image, fixed: sitk.Image, field: sitk.Image | None) -> np.ndarray:
    """Independently of the report: where SimpleITK resamples moving data (a ones-image, 0 outside)."""
    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    moved = (sitk.Resample(ones, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0) if field is None
             else warp_image(ones, field, sitk.sitkNearestNeighbor, 0))
    return sitk.GetArrayFromImage(moved) > 0


def _ncc_percent(a: np.ndarray, b: np.ndarray) -> float:
    return 100.0 * float(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1])


def test_partial_moving_scan_whole_grid_ncc_falls_but_the_overlap_ncc_rises(partial_pair):
    fixed, moving, result = partial_pair
    report = registration_report(fixed, moving, result)
    fixed_values = _normalised(fixed)
    before, after = _normalised(_identity(moving, fixed)), _normalised(result.warped)

    # The trap: over the whole fixed grid, padding scored as air makes the exact field look worse.
    whole_before, whole_after = 100 * metrics.ncc(fixed_values, before), 100 * metrics.ncc(fixed_values, after)
    assert whole_after < whole_before - 1.0  # 60.3 % -> 58.8 %
    # On the overlap it is a clear gain, to (almost) a perfect match.
    assert report["before"]["ncc_percent"] < 85.0 and report["after"]["ncc_percent"] > 99.9
    assert report["after"]["one_minus_mse_percent"] > report["before"]["one_minus_mse_percent"] + 5.0
    assert report["after"]["one_minus_mse_percent"] > 99.99

    # The overlap: fixed voxels with data before (p) and after (p + u(p)), as SimpleITK resamples them.
    overlap = _inside_moving(moving, fixed, None) & _inside_moving(moving, fixed, result.displacement)
    assert report["overlap_percent"] == pytest.approx(100.0 * overlap.mean())
    assert 40.0 < report["overlap_percent"] < 50.0  # 59 % of the slices, less the 12 mm the field pulls out
    for state, values in (("before", before), ("after", after)):
        assert report[state]["ncc_percent"] == pytest.approx(_ncc_percent(fixed_values[overlap], values[overlap]))
    assert not any(key.startswith("lung_") for key in (*report, *report["after"]))


def test_the_warp_says_where_it_holds_moving_data_as_simpleitk_resamples_it(partial_pair):
    """register()'s warp marks where p + u(p) falls outside the moving scan (its padding) without the field on
    the fixed grid; SimpleITK's nearest-neighbour resampling of a ones-image through that field agrees, and the
    warped scan is the linear warp through that field (to 0.01 HU: float32 rounding) in the moving scan's
    pixel type."""
    fixed, moving, result = partial_pair
    warped, inside = warp_ct(moving, fixed, result.transform)
    expected = _inside_moving(moving, fixed, result.displacement)
    assert 0.4 < expected.mean() < 0.6  # the field pulls part of the fixed grid out of the moving scan
    np.testing.assert_array_equal(inside, expected)
    reference = in_pixel_type_of(warp_image(sitk.Cast(moving, sitk.sitkFloat32), result.displacement), moving)
    assert warped.GetPixelID() == moving.GetPixelID()
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(warped), sitk.GetArrayViewFromImage(reference), atol=0.01)


def test_a_registration_computes_its_overlap_without_the_fixed_grid_field(partial_pair):
    fixed, moving, _ = partial_pair
    model, _, _ = untrained_model()
    result = register(fixed, moving, model=model, preprocess=PreprocessConfig(grid_shape=(32, 32, 32)),
                      device="cpu", fast=True, affine=False)
    report = registration_report(fixed, moving, result)
    assert result.fixed_grid_displacement is None  # not needed for the report
    expected = overlap_mask(fixed, moving, result.displacement)
    assert report["overlap_percent"] == pytest.approx(100.0 * expected.mean())
    assert 100.0 * expected.mean() == pytest.approx(100.0 * MOVING_SLICES / SIZE[2], abs=1.0)


def test_lung_similarity_is_computed_on_the_fixed_lungs_within_the_overlap(partial_pair):
    fixed, moving, result = partial_pair
    fixed_mask = lung_mask_phantom(fixed)
    report = registration_report(fixed, moving, result, fixed_mask)
    lungs = sitk.GetArrayViewFromImage(fixed_mask) > 0
    overlap = _inside_moving(moving, fixed, None) & _inside_moving(moving, fixed, result.displacement)
    region = lungs & overlap
    assert 0 < region.sum() < lungs.sum()  # the moving scan misses part of the lungs
    assert report["lung_overlap_percent"] == pytest.approx(100.0 * region.sum() / lungs.sum())
    fixed_values = _normalised(fixed)
    for state, moved in (("before", _identity(moving, fixed)), ("after", result.warped)):
        values = _normalised(moved)
        f, m = fixed_values[region], values[region]
        assert report[state]["lung_ncc_percent"] == pytest.approx(_ncc_percent(f, m), abs=1e-9)
        assert report[state]["lung_one_minus_mse_percent"] == pytest.approx(
            100.0 * (1.0 - np.mean((f.astype(np.float64) - m) ** 2)), abs=1e-9)
    assert report["before"]["lung_ncc_percent"] < 40.0 and report["after"]["lung_ncc_percent"] > 99.0
    # The overlap values stay those of the overlap, with or without a mask.
    assert report["after"]["ncc_percent"] == registration_report(fixed, moving, result)["after"]["ncc_percent"]


def test_an_empty_overlap_gives_null_similarity_and_says_so(partial_pair):
    fixed, moving, result = partial_pair
    elsewhere = sitk.Image(moving)
    elsewhere.SetOrigin((500.0, 0.0, 0.0))
    report = registration_report(fixed, elsewhere, result, lung_mask_phantom(fixed))
    assert report["overlap_percent"] == 0.0 and report["lung_overlap_percent"] == 0.0
    assert report["after"]["ncc_percent"] is None and report["before"]["lung_ncc_percent"] is None
    json.dumps(report, allow_nan=False)
    assert summary_line(report).startswith("NCC: none, the scans do not overlap; ")


def test_the_summary_line_names_the_region(partial_pair):
    fixed, moving, result = partial_pair
    overlap_only = registration_report(fixed, moving, result)
    line = summary_line(overlap_only)
    assert line.startswith(f"NCC on the overlap ({overlap_only['overlap_percent']:.0f}% of the fixed scan) "
                           f"{overlap_only['before']['ncc_percent']:.1f}% -> {overlap_only['after']['ncc_percent']:.1f}%")
    assert line.endswith("; folded voxels 0.000%; 2.5 s on cpu")

    with_lungs = registration_report(fixed, moving, result, lung_mask_phantom(fixed), lung_mask_phantom(fixed),
                                     np.array([[0.0, 0.0, -20.0]]), np.array([[0.0, 1.0, -8.0]]))
    line = summary_line(with_lungs)
    assert line.startswith(f"NCC in the lungs ({with_lungs['lung_overlap_percent']:.0f}% of them in both scans) "
                           f"{with_lungs['before']['lung_ncc_percent']:.1f}% -> "
                           f"{with_lungs['after']['lung_ncc_percent']:.1f}%; lung Dice ")
    assert f"; TRE {with_lungs['before']['tre_mm']['mean']:.2f} -> " in line
    # A scan that covers the whole fixed grid needs no share in brackets.
    full = dict(overlap_only, overlap_percent=100.0)
    assert summary_line(full).startswith(f"NCC on the overlap {overlap_only['before']['ncc_percent']:.1f}% -> ")


def test_summary_of_the_slicer_logic_is_the_same_line(partial_pair):
    pytest.importorskip("slicer")
    from LungUDRNetSlicerLib.logic import RegistrationOutput

    fixed, moving, result = partial_pair
    report = registration_report(fixed, moving, result, lung_mask_phantom(fixed))
    output = RegistrationOutput(warped_volume=None, transform=None, report=report, notes=["ran on the CPU"])
    assert output.summary() == summary_line(report) + "\nran on the CPU"
    assert output.summary().startswith("NCC in the lungs")


def test_cli_metrics_json_holds_the_overlap_and_lung_similarity(partial_pair, tmp_path, capsys):
    fixed, moving, _ = partial_pair
    model, _, _ = untrained_model()  # an (almost) zero field: the overlap is the moving scan's share of the slices
    paths = {"fixed": write_image(fixed, tmp_path / "fixed.nrrd"), "moving": write_image(moving, tmp_path / "moving.mha"),
             "mask": write_image(lung_mask_phantom(fixed), tmp_path / "fixed_mask.nii.gz"),
             "model": save_checkpoint(tmp_path / "model.pt", model, PreprocessConfig(grid_shape=(32, 32, 32)))}
    out = tmp_path / "out"
    assert main(["register", "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"]), "--out", str(out),
                 "--model", str(paths["model"]), "--device", "cpu", "--fixed-mask", str(paths["mask"]),
                 "--no-affine", "--fast"]) == 0

    def refuse(constant):
        raise ValueError(f"metrics.json holds {constant}")

    report = json.loads((out / "metrics.json").read_text(), parse_constant=refuse)
    assert report["overlap_percent"] == pytest.approx(100.0 * MOVING_SLICES / SIZE[2])
    assert report["stages"]["lung_masks"] == {"fixed": "given", "moving": None}  # --no-affine: none needed
    assert 0.0 < report["lung_overlap_percent"] < 100.0
    for state in ("before", "after"):
        assert set(report[state]) == {"ncc_percent", "one_minus_mse_percent", "lung_ncc_percent",
                                      "lung_one_minus_mse_percent"}  # no moving mask: no Dice
        assert all(-100.0 <= value <= 100.0 for value in report[state].values())
    # The field is almost zero: after equals before.
    assert report["after"]["lung_ncc_percent"] == pytest.approx(report["before"]["lung_ncc_percent"], abs=0.5)
    printed = capsys.readouterr().out
    assert f"NCC in the lungs ({report['lung_overlap_percent']:.0f}% of them in both scans) " in printed


def test_before_state_on_the_fixed_grid_is_the_resampled_image_and_skips_resampling_on_the_same_grid():
    grid = make_grid((20, 18, 16), (2.0, 2.5, 3.0))
    image = chest_phantom(grid, seed=1)
    resampled = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, -1000.0, image.GetPixelID())
    same = on_fixed_grid(image, grid, sitk.sitkLinear)
    assert same is image  # no copy
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(same), sitk.GetArrayViewFromImage(resampled), atol=1e-3)
    shifted = sitk.Image(image)
    shifted.SetOrigin(tuple(v + 1.0 for v in image.GetOrigin()))  # half a voxel or less along each axis
    moved = on_fixed_grid(shifted, grid, sitk.sitkLinear)
    assert moved is not shifted and moved.GetOrigin() == grid.GetOrigin()
    expected = sitk.Resample(shifted, grid, sitk.Transform(), sitk.sitkLinear,
                             float(sitk.GetArrayViewFromImage(shifted).min()), shifted.GetPixelID())
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(moved), sitk.GetArrayViewFromImage(expected))


def test_a_coverage_mask_on_another_grid_and_a_result_without_a_field_are_refused(partial_pair):
    fixed, moving, result = partial_pair
    with pytest.raises(ValueError, match="not on the fixed grid"):
        overlap_mask(fixed, moving, moved_inside=np.ones((5, 5, 5), dtype=bool))
    with pytest.raises(ValueError, match="needs the displacement or moved_inside"):
        overlap_mask(fixed, moving)
    empty = RegistrationResult(warped=result.warped, transform=result.transform, grid=fixed,
                               preprocess=PreprocessConfig(), device="cpu")
    with pytest.raises(ValueError, match="holds no field"):
        empty.displacement
    with pytest.raises(TypeError):  # fields by keyword only: the old positional order cannot be misread
        RegistrationResult(result.warped, result.displacement, result.transform, fixed, PreprocessConfig(), "cpu")
