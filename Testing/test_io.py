"""Reading, checking and atomically writing files."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from LungUDRNetLib import io
from LungUDRNetLib.errors import InputError, OutputError
from LungUDRNetLib.phantom import analytic_field, chest_phantom


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_image_round_trip_keeps_geometry(oblique_grid, tmp_path, suffix):
    image = chest_phantom(oblique_grid)
    path = io.write_image(image, tmp_path / f"ct{suffix}")
    back = io.read_image(path)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image), atol=1e-4)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == [f"ct{suffix}"]  # no temporary file left


def test_rounded_to_integer_rounds_clips_and_keeps_geometry(oblique_grid):
    values = np.array([-40000.4, -1000.6, -0.4, 0.5, 1.5, 2.49, 40000.0], dtype=np.float32)
    image = sitk.GetImageFromArray(np.resize(values, oblique_grid.GetSize()[::-1]).astype(np.float32))
    image.CopyInformation(oblique_grid)
    rounded = io.rounded_to_integer(image, np.int16)
    assert rounded.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(rounded).ravel()[:7],
                                  [-32768, -1001, 0, 0, 2, 2, 32767])  # halves to even, as numpy rounds
    assert (rounded.GetOrigin(), rounded.GetSpacing(), rounded.GetDirection()) == (
        image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    wide = sitk.GetImageFromArray(np.array([[[3e9, -3e9, np.nan, 1e9 + 0.6]]]))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(io.rounded_to_integer(wide, np.int32)).ravel(),
                                  [2147483647, -2147483648, 0, 1000000001])  # NaN: 0


def test_nifti_field_has_displacement_intent_and_ras_vectors(oblique_grid, tmp_path):
    field = analytic_field(oblique_grid)
    path = io.write_displacement_field(field, tmp_path / "u.nii.gz")
    header = nib.load(str(path)).header
    assert int(header["intent_code"]) == io.NIFTI_INTENT_DISPVECT
    stored = np.asarray(nib.load(str(path)).dataobj)[:, :, :, 0, :]  # x, y, z, vector
    lps = sitk.GetArrayViewFromImage(field).transpose(2, 1, 0, 3)
    np.testing.assert_allclose(stored, lps * [-1, -1, 1], atol=1e-5)
    back = io.read_displacement_field(path)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(field), atol=1e-5)


@pytest.mark.parametrize("name", ["u.nii.gz", "u.mha", "u.nrrd"])
def test_fields_are_stored_uncompressed_and_read_back_exactly(oblique_grid, tmp_path, name):
    """Float displacements barely compress, so the vectors are stored as they are (``.nii.gz`` as gzip of
    level 0): the file holds at least their bytes, and ITK's reader gives the same field back."""
    field = sitk.Cast(analytic_field(oblique_grid), sitk.sitkVectorFloat32)
    path = io.write_displacement_field(field, tmp_path / name)
    vector_bytes = 4 * 3 * int(np.prod(field.GetSize()))
    stored = gzip.decompress(path.read_bytes()) if name.endswith(".gz") else path.read_bytes()
    assert path.stat().st_size >= vector_bytes and len(stored) >= vector_bytes
    back = sitk.ReadImage(str(path), sitk.sitkVectorFloat32)
    assert back.GetSize() == field.GetSize() and np.allclose(back.GetOrigin(), field.GetOrigin())
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(field), atol=1e-5)
    again = io.write_displacement_field(field, tmp_path / f"again_{name}")
    assert again.read_bytes() == path.read_bytes()  # no temporary file name or time in the file


def test_a_field_can_be_written_compressed(oblique_grid, tmp_path):
    """Generated training fields, zero over much of their grid, are written compressed."""
    vectors = np.zeros((*oblique_grid.GetSize()[::-1], 3), dtype=np.float32)
    vectors[:2] = 1.5
    field = sitk.GetImageFromArray(vectors, isVector=True)
    field.CopyInformation(oblique_grid)
    path = io.write_displacement_field(field, tmp_path / "u.nii.gz", compress=True)
    assert path.stat().st_size < vectors.nbytes / 4
    np.testing.assert_array_equal(sitk.GetArrayFromImage(io.read_displacement_field(path)), vectors)


def test_read_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="fixed image .*missing.nii.gz: file not found"):
        io.read_image(tmp_path / "missing.nii.gz", "fixed image")
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(InputError, match="corrupt.nii.gz: cannot be read as an image"):
        io.read_image(corrupt)
    flat = tmp_path / "flat.nrrd"
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkFloat32), str(flat))
    with pytest.raises(InputError, match="is 2D, a 3D image is needed"):
        io.read_image(flat)
    with pytest.raises(InputError, match="holds no DICOM series"):
        io.read_image(tmp_path)


def test_a_displacement_field_is_not_accepted_as_an_image(oblique_grid, tmp_path):
    path = io.write_displacement_field(analytic_field(oblique_grid), tmp_path / "u.nii.gz")
    with pytest.raises(InputError, match="3 components per voxel"):
        io.read_image(path, "moving image")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as temporary:
            temporary.write_text("half")
            raise RuntimeError("crash while writing")
    assert list(tmp_path.iterdir()) == []
    io.write_json({"a": 1}, target)
    with pytest.raises(OutputError, match="already exists"):
        io.write_json({"a": 2}, target, overwrite=False)
    assert json.loads(target.read_text()) == {"a": 1}


def test_read_points_formats(tmp_path):
    csv = tmp_path / "points.csv"
    csv.write_text("1.5,2,3\n4,5,6.25\n")
    np.testing.assert_allclose(io.read_points(csv), [[1.5, 2, 3], [4, 5, 6.25]])
    elastix = tmp_path / "points.txt"
    elastix.write_text("point\n2\n1 2 3\n-4 5.5 6\n")
    np.testing.assert_allclose(io.read_points(elastix), [[1, 2, 3], [-4, 5.5, 6]])
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n")
    with pytest.raises(InputError, match="rows of three numbers"):
        io.read_points(bad)


def test_outputs_get_the_usual_file_permissions(tmp_path):
    import os
    import stat
    path = io.write_json({"a": 1}, tmp_path / "out.json")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
