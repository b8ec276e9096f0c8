"""Reading and writing images, displacement fields, points and reports.

Every writer is atomic: it writes a temporary file beside the target and
renames it into place, so a crash or Ctrl-C never leaves a partial output, and
it refuses to replace a file it was asked to read.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputError
from .geometry import index_to_ras_matrix, lps_to_ras

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
NIFTI_INTENT_DISPVECT = 1006


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), path.suffix.lower())


def read_image(path: str | os.PathLike, what: str = "image") -> sitk.Image:
    """Read a 3D scalar image (NIfTI, NRRD, MetaImage or a DICOM series folder).

    Origin, spacing and direction are kept (LPS). ``what`` names the input in
    error messages ("fixed image", "moving mask", ...).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path}: file not found")
    if path.is_dir():
        image = _read_dicom_series(path, what)
    else:
        if not os.access(path, os.R_OK):
            raise InputError(f"{what} {path}: permission denied (not readable)")
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown error"
            raise InputError(f"{what} {path}: cannot be read as an image ({reason})") from None
    check_scalar_3d(image, f"{what} {path}")
    return image


def _read_dicom_series(folder: Path, what: str) -> sitk.Image:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{what} {folder}: folder holds no DICOM series")
    if len(series) > 1:
        raise InputError(f"{what} {folder}: folder holds {len(series)} DICOM series "
                         f"({', '.join(series)}); pass a folder with one series")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    return reader.Execute()


def check_scalar_3d(image: sitk.Image, what: str) -> None:
    """Raise :class:`InputError` unless ``image`` is a 3D single-component image."""
    if image.GetDimension() != 3:
        raise InputError(f"{what}: is {image.GetDimension()}D, a 3D image is needed")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what}: has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                         "(a vector/colour image or a displacement field); a scalar CT image is needed")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success.

    On any exception the temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise OutputError(f"output {target}: already exists (use --overwrite to replace it)")
    if not target.parent.is_dir():
        raise OutputError(f"output {target}: folder {target.parent} does not exist")
    try:
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".part{_suffix(target)}",
                                             dir=target.parent)
    except OSError as error:
        raise OutputError(f"output {target}: cannot write in {target.parent} ({error.strerror})") from None
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        os.replace(temporary, target)
    except OSError as error:
        raise OutputError(f"output {target}: write failed ({error.strerror})") from None
    finally:
        temporary.unlink(missing_ok=True)


def write_image(image: sitk.Image, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write a scalar image atomically (format from the file extension), compressed."""
    with atomic_path(path, overwrite) as temporary:
        sitk.WriteImage(image, str(temporary), True)
    return Path(path)


def write_displacement_field(field: sitk.Image, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write an LPS-mm displacement field as an ITK displacement-field file.

    NIfTI output gets the displacement-vector intent (1006), which ITK, SimpleITK
    and 3D Slicer need to read it as a transform; NIfTI stores such vectors in
    RAS and the readers convert them back to LPS. Other formats (``.nrrd``,
    ``.mha``) are written by SimpleITK with LPS vectors.
    """
    path = Path(path)
    with atomic_path(path, overwrite) as temporary:
        if _suffix(path) in (".nii", ".nii.gz"):
            _write_nifti_field(field, temporary)
        else:
            sitk.WriteImage(sitk.Cast(field, sitk.sitkVectorFloat32), str(temporary), True)
    return path


def _write_nifti_field(field: sitk.Image, path: Path) -> None:
    vectors_zyx = lps_to_ras(sitk.GetArrayViewFromImage(field)).astype(np.float32)
    data = np.transpose(vectors_zyx, (2, 1, 0, 3))[:, :, :, np.newaxis, :]  # x, y, z, t=1, vector
    affine = index_to_ras_matrix(field)
    image = nib.Nifti1Image(data, affine)
    image.header.set_intent(NIFTI_INTENT_DISPVECT)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def read_displacement_field(path: str | os.PathLike) -> sitk.Image:
    """Read a displacement field file as a VectorFloat64 LPS-mm image."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"displacement field {path}: file not found")
    try:
        field = sitk.ReadImage(str(path), sitk.sitkVectorFloat64)
    except RuntimeError:
        raise InputError(f"displacement field {path}: cannot be read as a vector image") from None
    if field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
        raise InputError(f"displacement field {path}: needs 3 components per voxel in 3D")
    return field


def write_json(data: dict, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path, overwrite) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return Path(path)


def read_points(path: str | os.PathLike) -> np.ndarray:
    """Read an (N, 3) point list: CSV/whitespace 'x,y,z' rows, or elastix 'point'/'index' files.

    The numbers are returned as stored; whether they are voxel indices or
    millimetres is up to the file's source (see the callers).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"point file {path}: file not found")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if lines and lines[0].lower() in ("point", "index"):
        lines = lines[2:]
    try:
        points = np.array([[float(v) for v in line.replace(",", " ").split()[:3]] for line in lines])
    except ValueError:
        raise InputError(f"point file {path}: expected rows of three numbers x, y, z") from None
    if points.ndim != 2 or points.shape[1] != 3:
        raise InputError(f"point file {path}: expected rows of three numbers x, y, z")
    return points
