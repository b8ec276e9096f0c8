"""Images whose header or voxels are not what they claim: a grid that cannot be written back (skewed, zero,
negative or NaN geometry), complex values, NIfTI-2, NaN voxels that ITK reads as 0, trailing data, scans
apart in space. Each gives one line naming the file (exit 2, nothing written) or a correct result."""

from __future__ import annotations

import gzip
import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from LungUDRNetLib import nifti_checks, register
from LungUDRNetLib.checkpoint import untrained_model
from LungUDRNetLib.cli import main
from LungUDRNetLib.errors import InputError
from LungUDRNetLib.io import read_image, read_image_header, write_image
from LungUDRNetLib.preprocess import PreprocessConfig

from robustness_cases import (TINY_GRID, array, checksums, edited_metaimage, fixed_phantom, moving_phantom,
                              register_args, write_case)

TINY = PreprocessConfig(grid_shape=TINY_GRID)
NOT_ORTHONORMAL = (r"has a direction matrix whose axes are not orthonormal \(1 0.5 0; 0 1 0; 0 0 1: skewed or scaled "
                   r"axes, e.g. a gantry tilt\); NIfTI cannot store such a grid, so the results would not lie on it: "
                   r"resample the scan onto an orthogonal grid first")
NO_ORIENTATION = r"has a direction matrix that is zero, NaN or singular \(0 0 0; 0 0 0; 0 0 0\); the axes have no "


def _refused_by_cli(files: dict, tmp_path: Path, capsys, expected: str) -> None:
    """``lungudrnet register`` exits 2 with ``expected`` on one line, writes nothing and changes no input."""
    before = checksums(tmp_path)
    assert main(register_args(files, tmp_path / "out")) == InputError.exit_code
    error = capsys.readouterr().err
    assert len(error.splitlines()) == 1 and re.match(f"lungudrnet: error: {expected}", error), error
    assert not (tmp_path / "out").exists() and checksums(tmp_path) == before


# --- grids that cannot be written back -------------------------------------------------------------------

@pytest.mark.parametrize("fields, expected", [
    ({"TransformMatrix": "1 0 0 0.5 1 0 0 0 1"}, NOT_ORTHONORMAL),
    ({"ElementSpacing": "-5 4 5.5"}, r"has voxel spacing -5 x 4 x 5.5 mm; every spacing must be positive"),
    ({"ElementSpacing": "0 4 5.5"}, r"has voxel spacing 0 x 4 x 5.5 mm; every spacing must be positive"),
    ({"TransformMatrix": "nan 0 0 0 1 0 0 0 1"}, NO_ORIENTATION),
    ({"TransformMatrix": "0 0 0 0 0 0 0 0 0"}, NO_ORIENTATION),
], ids=["skewed", "negative-spacing", "zero-spacing", "nan-direction", "zero-direction"])
@pytest.mark.parametrize("role", ["fixed", "moving"])
def test_a_grid_that_cannot_be_written_back_is_refused_by_name(tmp_path, capsys, fields, expected, role):
    files = write_case(tmp_path)
    files[role] = edited_metaimage(tmp_path / f"{role}_edited.mha", moving_phantom(), **fields)
    what = f"{role} image {re.escape(str(files[role]))}: "
    with pytest.raises(InputError, match=what + expected):
        read_image_header(files[role], f"{role} image")
    _refused_by_cli(files, tmp_path, capsys, what + expected)


def test_a_skewed_image_in_memory_is_refused_by_the_api():
    skewed = moving_phantom()
    skewed.SetDirection((1.0, 0.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    with pytest.raises(InputError, match="^fixed image: " + NOT_ORTHONORMAL):
        register(skewed, moving_phantom(), model=untrained_model()[0], preprocess=TINY, device="cpu")


def test_scans_apart_in_space_are_refused_with_both_extents_without_the_affine_stage(tmp_path, capsys):
    files = write_case(tmp_path)
    moving = moving_phantom()
    moving.SetOrigin(tuple(np.asarray(moving.GetOrigin()) + (1000.0, 0.0, 0.0)))
    files["moving"] = write_image(moving, tmp_path / "far.nrrd")
    assert main(register_args(files, tmp_path / "out", "--no-affine")) == InputError.exit_code
    error = capsys.readouterr().err
    assert re.fullmatch(r"lungudrnet: error: the scans do not overlap in physical space \(fixed image: x -\d+\.\.\d+, "
                        r".* mm \(LPS\); moving image: x 9\d\d\.\.10\d\d, .* mm \(LPS\)\); check that both scans "
                        r"are .*\n", error), error
    assert not (tmp_path / "out").exists()


# --- voxels that are not real numbers ---------------------------------------------------------------------

def test_a_complex_valued_nifti_is_refused(tmp_path, capsys):
    files = write_case(tmp_path)
    values = array(fixed_phantom()).transpose(2, 1, 0).astype(np.complex64)
    files["fixed"] = tmp_path / "complex.nii.gz"
    nib.save(nib.Nifti1Image(values, np.diag([4.0, 4.0, 5.0, 1.0])), str(files["fixed"]))
    expected = (f"fixed image {re.escape(str(files['fixed']))}: holds complex values \\(e.g. MR k-space or phase "
                r"data\); a real-valued CT image in HU is needed")
    with pytest.raises(InputError, match=expected):
        read_image(files["fixed"], "fixed image")
    _refused_by_cli(files, tmp_path, capsys, expected)


def _with_nan(image: sitk.Image) -> sitk.Image:
    values = array(sitk.Cast(image, sitk.sitkFloat32))
    values[2:5, 3:6, 4:7] = np.nan
    values[0, 0, :2] = [np.inf, -np.inf]
    result = sitk.GetImageFromArray(values)
    result.CopyInformation(image)
    return result


def test_nan_voxels_in_a_nifti_file_are_found_and_warned_about_as_in_nrrd(tmp_path, caplog):
    moving = _with_nan(moving_phantom())
    paths = {suffix: write_image(moving, tmp_path / f"moving{suffix}") for suffix in (".nii.gz", ".nii", ".nrrd")}
    assert np.isfinite(array(sitk.ReadImage(str(paths[".nii.gz"])))).all()  # what ITK alone makes of them
    expected = np.isnan(array(moving))
    for path in paths.values():
        np.testing.assert_array_equal(np.isnan(array(read_image(path))), expected)
    warnings = {}
    for suffix, path in paths.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="LungUDRNetLib"):
            result = register(fixed_phantom(), path, model=untrained_model()[0], preprocess=TINY, device="cpu")
        warnings[suffix] = [r.getMessage() for r in caplog.records if "NaN/Inf" in r.getMessage()]
        assert np.isfinite(array(result.warped)).all()
    assert warnings[".nii.gz"] == warnings[".nii"] == warnings[".nrrd"] == [
        "moving image: 29 NaN/Inf voxels replaced by the image minimum"]


# --- NIfTI-2 ---------------------------------------------------------------------------------------------------

def test_a_nifti2_file_is_named_as_such_with_a_conversion_that_works(tmp_path, capsys):
    files = write_case(tmp_path)
    nifti1 = write_image(moving_phantom(), tmp_path / "moving1.nii.gz")
    files["moving"] = tmp_path / "moving2.nii.gz"
    image = nib.load(str(nifti1))
    nib.save(nib.Nifti2Image(np.asarray(image.dataobj), image.affine), str(files["moving"]))
    expected = (f"moving image {re.escape(str(files['moving']))}: is a NIfTI-2 file; NIfTI-2 files are not supported "
                r"\(ITK reads NIfTI-1 only\); convert it, e.g. in Python with nibabel: ")
    _refused_by_cli(files, tmp_path, capsys, expected)
    with pytest.raises(InputError) as caught:
        read_image(files["moving"], "moving image")
    # The message's own conversion line gives a file that reads as the original.
    snippet = re.search(r"nibabel: (.*), or save it", str(caught.value))[1]
    converted = tmp_path / "out.nii.gz"
    exec(snippet.replace("in.nii.gz", str(files["moving"])).replace("out.nii.gz", str(converted)).replace("; ", "\n"),
         {"nib": nib})
    np.testing.assert_array_equal(array(read_image(converted)), array(read_image(nifti1)))


# --- trailing data -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("pixel_type", [sitk.sitkInt16, sitk.sitkFloat32])
def test_a_nifti_gz_with_trailing_data_is_checked_without_reading_past_its_voxels(tmp_path, monkeypatch, pixel_type):
    image = sitk.Cast(fixed_phantom(), pixel_type)
    path = write_image(image, tmp_path / "fixed.nii.gz")
    with path.open("ab") as handle:  # a second gzip member of 64 MB: the trailer no longer gives the size
        handle.write(gzip.compress(bytes(64 << 20), compresslevel=1))
    proxy = nib.load(str(path)).dataobj
    needed = int(proxy.offset) + int(np.prod(proxy.shape)) * np.dtype(proxy.dtype).itemsize
    read = []
    open_stream = nifti_checks._open

    def counting(file):
        stream = open_stream(file)
        original = stream.read
        stream.read = lambda size=-1: read.append(len(data := original(size))) or data
        return stream

    monkeypatch.setattr(nifti_checks, "_open", counting)
    assert nifti_checks.scan_voxels(path) == nifti_checks.VoxelScan(True, 0)
    assert sum(read) == needed
    np.testing.assert_array_equal(array(read_image(path)), array(image))
