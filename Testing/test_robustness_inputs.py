"""Bad or awkward input images: each gives one clear InputError (or a warning and a sane result)."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
import SimpleITK as sitk

from LungUDRNetLib import register
from LungUDRNetLib.checkpoint import untrained_model
from LungUDRNetLib.cli import main
from LungUDRNetLib.errors import InputError
from LungUDRNetLib.io import read_image, read_image_header, write_displacement_field, write_image
from LungUDRNetLib.phantom import analytic_field, lung_mask_phantom, make_grid
from LungUDRNetLib.preprocess import PreprocessConfig
from LungUDRNetLib.report import registration_report

from robustness_cases import (TINY_GRID, array, as_unprivileged_user, centred_grid, checksums, fixed_phantom,
                              moving_phantom, register_args, write_case, write_dicom_series)

TINY = PreprocessConfig(grid_shape=TINY_GRID)
NET = untrained_model()[0]


def _register(fixed, moving, **kwargs):
    return register(fixed, moving, model=NET, preprocess=TINY, device="cpu", **kwargs)


# --- files that are not there, not readable, not images ---------------------------------------------

@pytest.mark.parametrize("content", [None, "notes.txt"])
def test_a_folder_without_dicom_is_refused_with_the_fix(tmp_path, content):
    folder = tmp_path / "scan"
    folder.mkdir()
    if content:
        (folder / content).write_text("not an image")
    with pytest.raises(InputError, match=r"fixed image .*scan: folder holds no DICOM series; pass an image file"):
        read_image(folder, "fixed image")


def test_an_unreadable_file_is_refused(world_dir):
    path = write_image(fixed_phantom(), world_dir / "fixed.nrrd")
    path.chmod(0o000)
    outcome = as_unprivileged_user(lambda: read_image(path, "fixed image"))
    assert outcome.startswith(f"InputError: fixed image {path}: permission denied (not readable)"), outcome


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_a_truncated_image_is_refused_not_zero_filled(tmp_path, suffix):
    path = write_image(fixed_phantom(), tmp_path / f"fixed{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.8)])
    with pytest.raises(InputError, match=r"fixed image .*: the voxel data are truncated or corrupt"):
        read_image(path, "fixed image")


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_a_file_that_is_not_an_image_is_refused(tmp_path, suffix):
    path = tmp_path / f"fixed{suffix}"
    path.write_bytes(b"\x00garbage\x01" * 10)
    with pytest.raises(InputError, match=r"cannot be read as an image \(not a NIfTI, NRRD, MetaImage or DICOM"):
        read_image(path, "fixed image")


# --- DICOM folders ----------------------------------------------------------------------------------

def test_a_dicom_folder_with_two_series_lists_them_and_one_can_be_chosen(tmp_path):
    image = sitk.GetImageFromArray(np.arange(6 * 10 * 12, dtype=np.int16).reshape(6, 10, 12) - 500)
    image.SetSpacing((2.0, 2.0, 3.0))
    uids = ["1.2.826.0.1.3680043.2.1125.1", "1.2.826.0.1.3680043.2.1125.2"]
    write_dicom_series(tmp_path / "dicom", image, uids[0])
    write_dicom_series(tmp_path / "dicom", image + 7, uids[1])
    with pytest.raises(InputError) as error:
        read_image(tmp_path / "dicom", "fixed image")
    message = str(error.value)
    assert "folder holds 2 DICOM series" in message and "--fixed-series" in message
    assert all(f"{uid} (6 slices)" in message for uid in uids)
    second = read_image(tmp_path / "dicom", "fixed image", series_uid=uids[1])
    np.testing.assert_array_equal(array(second), array(image) + 7)
    assert second.GetSpacing() == pytest.approx((2.0, 2.0, 3.0))
    with pytest.raises(InputError, match=r"holds no DICOM series 9\.9: .*1125\.1 \(6 slices\)"):
        read_image_header(tmp_path / "dicom", "fixed image", series_uid="9.9")


def test_cli_registers_the_chosen_dicom_series(tmp_path):
    files = write_case(tmp_path)
    fixed = sitk.Cast(sitk.Resample(fixed_phantom(), make_grid((20, 18, 8), (4.0, 4.0, 6.0), (-40.0, -36.0, -24.0)),
                                    sitk.Transform(), sitk.sitkLinear, -1000), sitk.sitkInt16)
    write_dicom_series(tmp_path / "dicom", fixed, "1.2.3.1")
    write_dicom_series(tmp_path / "dicom", fixed, "1.2.3.2")
    files["fixed"] = tmp_path / "dicom"
    assert main(register_args(files, tmp_path / "out", "--fixed-series", "1.2.3.2")) == 0
    assert sitk.ReadImage(str(tmp_path / "out" / "warped.nii.gz")).GetSize() == (20, 18, 8)


# --- not a 3D scalar volume ---------------------------------------------------------------------------

def _four_d() -> sitk.Image:
    return sitk.JoinSeries([fixed_phantom(), fixed_phantom()])


def _rgb() -> sitk.Image:
    return sitk.GetImageFromArray(np.zeros((8, 9, 10, 3), np.uint8), isVector=True)


def _single_slice() -> sitk.Image:
    return fixed_phantom()[:, :, 3:4]


@pytest.mark.parametrize("make, expected", [
    (_four_d, "is 4D, a 3D image is needed"),
    (_rgb, "has 3 components per voxel"),
    (_single_slice, r"is 24x22x1 voxels; a 3D volume needs at least 2 voxels along every axis"),
])
def test_not_a_3d_scalar_volume_is_refused_from_the_header_and_in_memory(tmp_path, make, expected):
    path = tmp_path / "moving.nrrd"
    sitk.WriteImage(make(), str(path))
    with pytest.raises(InputError, match=f"moving image .*moving.nrrd: {expected}"):
        read_image_header(path, "moving image")
    with pytest.raises(InputError, match=f"moving image: {expected}"):
        _register(fixed_phantom(), make())


def test_a_displacement_field_passed_as_the_moving_image_is_refused_by_the_cli(tmp_path, capsys):
    files = write_case(tmp_path)
    files["moving"] = write_displacement_field(analytic_field(fixed_phantom()), tmp_path / "displacement.nii.gz")
    assert main(register_args(files, tmp_path / "out")) == 2
    assert "moving image" in capsys.readouterr().err and not (tmp_path / "out").exists()


# --- awkward but valid images ---------------------------------------------------------------------------

def test_tiny_volumes_under_the_network_minimum_are_registered_on_their_own_grid():
    fixed = sitk.Resample(fixed_phantom(), make_grid((6, 5, 4), (12.0, 12.0, 15.0), (-30.0, -24.0, -22.0)),
                          sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkInt16)
    moving = sitk.Resample(moving_phantom(), make_grid((7, 3, 5), (10.0, 20.0, 12.0), (-30.0, -24.0, -24.0)))
    network = _register(fixed, moving, fast=True)
    assert network.grid.GetSize() == TINY_GRID
    for result in (network, _register(fixed, moving)):  # the network alone, and with instance optimisation
        assert result.displacement.GetSize() == result.warped.GetSize() == (6, 5, 4)
        assert np.isfinite(array(result.displacement)).all()


def test_fixed_and_moving_differ_in_size_spacing_origin_direction_and_pixel_type():
    fixed = fixed_phantom()  # int16, oblique and flipped
    moving = sitk.Cast(moving_phantom(), sitk.sitkFloat64)
    result = _register(fixed, moving, affine=False, fast=True)
    optimised = _register(fixed, moving, affine=False)  # with instance optimisation
    for output in (result.warped, result.displacement, optimised.warped, optimised.displacement):
        assert output.GetSize() == fixed.GetSize()
        np.testing.assert_allclose(output.GetDirection(), fixed.GetDirection(), atol=1e-9)
    # The untrained network barely moves anything: warped = moving resampled onto the fixed grid.
    identity = array(sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, -1000.0, sitk.sitkFloat32))
    inside = identity > -999
    np.testing.assert_allclose(array(result.warped)[inside], identity[inside], atol=2.0)


def _report_json(fixed, moving, result, fixed_mask=None, moving_mask=None) -> dict:
    """The report as metrics.json holds it, refusing NaN/Inf (strict JSON)."""
    return json.loads(json.dumps(registration_report(fixed, moving, result, fixed_mask, moving_mask), allow_nan=False))


def test_nan_and_inf_voxels_give_a_warning_and_never_reach_the_outputs(caplog):
    fixed = sitk.Cast(fixed_phantom(), sitk.sitkFloat32)
    values = sitk.GetArrayFromImage(fixed)
    values[2:5, 3:9, 4:12] = np.nan
    values[0, 0, :3] = [np.inf, -np.inf, np.inf]
    with_nan = sitk.GetImageFromArray(values)
    with_nan.CopyInformation(fixed)
    with caplog.at_level(logging.WARNING, logger="LungUDRNetLib"):
        result = _register(with_nan, moving_phantom())
    assert "fixed image: 147 NaN/Inf voxels replaced" in caplog.text
    assert np.isfinite(array(result.warped)).all() and np.isfinite(array(result.displacement)).all()
    _report_json(with_nan, moving_phantom(), result)


@pytest.mark.parametrize("values, expected", [
    (lambda hu: np.full_like(hu, 40.0), r"moving image: is constant \(every voxel 40\)"),
    (lambda hu: (hu + 1000.0) / 2000.0, "moving image: intensities 0 to 0.5.* do not look like CT"),
    (lambda hu: hu + 1000.0, "moving image: intensities 0 to 1.* do not look like CT"),
])
def test_constant_or_non_ct_images_give_a_warning_and_a_finite_result(caplog, values, expected):
    moving = moving_phantom()
    changed = sitk.GetImageFromArray(values(np.clip(array(moving), -1000.0, None)))
    changed.CopyInformation(moving)
    with caplog.at_level(logging.WARNING, logger="LungUDRNetLib"):
        result = _register(fixed_phantom(), changed)
    assert [r for r in caplog.records if r.levelno == logging.WARNING and re.search(expected, r.getMessage())]
    report = _report_json(fixed_phantom(), changed, result)
    assert np.isfinite(array(result.warped)).all() and report["jacobian"]["folding_percent"] == 0.0


# --- masks --------------------------------------------------------------------------------------------------

def test_a_mask_on_another_grid_is_resampled_onto_its_image(tmp_path, capsys):
    files = write_case(tmp_path)
    fixed = fixed_phantom()
    coarse = centred_grid((12, 11, 10), (8.0, 8.0, 10.0), np.reshape(fixed.GetDirection(), (3, 3)))
    mask = sitk.Resample(lung_mask_phantom(fixed), coarse, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    coarse_mask = write_image(mask, tmp_path / "coarse_mask.nrrd")
    moving_mask = write_image(lung_mask_phantom(moving_phantom()), tmp_path / "moving_mask.nii.gz")
    args = register_args(files, tmp_path / "out", "--fixed-mask", str(coarse_mask), "--moving-mask", str(moving_mask))
    assert main(args) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert 0.0 < report["after"]["dice_percent"] <= 100.0


def _empty_mask() -> sitk.Image:
    return lung_mask_phantom(fixed_phantom()) * 0


def _faraway_mask() -> sitk.Image:
    mask = lung_mask_phantom(fixed_phantom())
    mask.SetOrigin((500.0, 500.0, 500.0))
    return mask


def _faint_mask() -> sitk.Image:
    return sitk.Cast(lung_mask_phantom(fixed_phantom()), sitk.sitkFloat32) * 0.3


EMPTY = (r"is empty \(no voxel above 0.5, the lung threshold\); pass a mask that marks the lungs \(e.g. with 1\), "
         "or none")
ELSEWHERE = "does not overlap its image \\(no mask voxel inside it\\); check that the mask belongs to this scan"


@pytest.mark.parametrize("make, expected", [(_empty_mask, EMPTY), (_faint_mask, EMPTY), (_faraway_mask, ELSEWHERE)],
                         ids=["empty", "all-below-threshold", "elsewhere"])
def test_an_empty_or_misplaced_mask_is_refused_naming_its_file(tmp_path, capsys, make, expected):
    with pytest.raises(InputError, match=f"^fixed mask: {expected}"):
        _register(fixed_phantom(), moving_phantom(), fixed_mask=make())
    files = write_case(tmp_path)
    mask = write_image(make(), tmp_path / "mask.nii.gz")
    with pytest.raises(InputError, match=f"^fixed mask {re.escape(str(mask))}: {expected}"):
        _register(files["fixed"], files["moving"], fixed_mask=mask)
    assert main(register_args(files, tmp_path / "out", "--fixed-mask", str(mask))) == InputError.exit_code
    error = capsys.readouterr().err
    assert re.fullmatch(f"lungudrnet: error: fixed mask {re.escape(str(mask))}: {expected}\n", error), error
    assert not (tmp_path / "out").exists()


def test_a_float_mask_counts_voxels_above_one_half_as_lung(tmp_path, capsys):
    """A mask of 0.7 in the lungs (a probability map, an interpolated mask) is the same as one of 1."""
    fixed = fixed_phantom()
    binary = lung_mask_phantom(fixed)
    fuzzy = sitk.Cast(binary, sitk.sitkFloat32) * 0.7
    fuzzy_result, binary_result = (_register(fixed, moving_phantom(), fixed_mask=mask) for mask in (fuzzy, binary))
    np.testing.assert_array_equal(array(fuzzy_result.fixed_mask), array(binary_result.fixed_mask))
    np.testing.assert_array_equal(array(fuzzy_result.displacement), array(binary_result.displacement))
    files = write_case(tmp_path)
    mask = write_image(fuzzy, tmp_path / "fuzzy_mask.nii.gz")
    assert main(register_args(files, tmp_path / "out", "--fixed-mask", str(mask), "--moving-mask",
                              str(mask))) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["stages"]["lung_masks"]["fixed"] == "given" and report["after"]["dice_percent"] > 0


def test_bad_inputs_leave_every_input_unchanged(tmp_path):
    files = write_case(tmp_path)
    before = checksums(tmp_path)
    sitk.WriteImage(_rgb(), str(tmp_path / "rgb.nrrd"))
    before = checksums(tmp_path)
    files["moving"] = tmp_path / "rgb.nrrd"
    assert main(register_args(files, tmp_path / "out", "--fixed-mask", str(files["fixed_mask"]))) == 2
    assert checksums(tmp_path) == before
