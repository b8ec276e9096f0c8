"""Reading and writing images, displacement fields, points and reports.

Readers check what they read and raise :class:`~.errors.InputError` naming the
file and the problem: missing, unreadable, not a regular file (:mod:`.input_files`),
not an image, truncated (:mod:`.nifti_checks`), not a 3D real scalar volume, a
grid that cannot be written back (:mod:`.grid_check`), an ambiguous DICOM
folder. Every ``write_*`` function is
atomic: it writes a temporary file beside the target and renames it into
place, so a crash, a full disk or Ctrl-C never leaves a partial output
(:func:`atomic_paths` does the same for several files at once).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import math
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputError
from .geometry import index_to_ras_matrix, lps_to_ras
from .grid_check import check_grid
from .input_files import check_folder_entries, check_input_path
from .nifti_checks import CONVERT_NIFTI2, is_nifti2, restore_non_finite, scan_voxels
from .output_folder import temporary_path

COMPLEX_PIXEL_IDS = (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64)
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
NIFTI_INTENT_DISPVECT = 1006
MIN_AXIS_VOXELS = 2  # fewer voxels along an axis is a slice, not a volume
TRUNCATED = ("the voxel data are truncated or corrupt (the header was read, the voxels were not); "
             "copy or export the file again")


@dataclass(frozen=True)
class ImageHeader:
    """What an image header tells before the voxels are read: size (x, y, z voxels), voxel type and
    spacing (mm along x, y, z)."""

    size: tuple[int, ...]
    components: int = 1
    component_bytes: int = 4
    complex_values: bool = False
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0)

    @property
    def voxels(self) -> int:
        """Number of voxels."""
        return int(np.prod(self.size, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes of the voxels in memory."""
        return self.voxels * self.components * self.component_bytes

    @classmethod
    def of(cls, image: sitk.Image) -> "ImageHeader":
        """The header of an image in memory."""
        return cls(tuple(image.GetSize()), image.GetNumberOfComponentsPerPixel(), image.GetSizeOfPixelComponent(),
                   image.GetPixelID() in COMPLEX_PIXEL_IDS, tuple(image.GetSpacing()))


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), path.suffix.lower())


def read_image(path: str | os.PathLike, what: str = "image", series_uid: str | None = None) -> sitk.Image:
    """Read a 3D scalar image (NIfTI, NRRD, MetaImage or a DICOM series folder).

    Origin, spacing and direction are kept (LPS). ``what`` names the input in
    error messages ("fixed image", "moving mask", ...); ``series_uid`` picks
    one series of a DICOM folder that holds several. The header is checked
    before the voxels are read.
    """
    path = Path(path)
    files = _image_files(path, what, series_uid)
    _read_header(files, path, what)
    scan = scan_voxels(path) if _is_nifti(path) else None
    if scan is not None and not scan.complete:
        raise InputError(f"{what} {path}: {TRUNCATED}")
    try:
        image = sitk.ReadImage(files if path.is_dir() else files[0])
    except RuntimeError:
        raise InputError(f"{what} {path}: {TRUNCATED}") from None
    return restore_non_finite(image, path) if scan is not None and scan.non_finite else image


def read_image_header(path: str | os.PathLike, what: str = "image", series_uid: str | None = None) -> ImageHeader:
    """Size and voxel type of an image file or DICOM folder, checked, without reading its voxels."""
    path = Path(path)
    return _read_header(_image_files(path, what, series_uid), path, what)


def _is_nifti(path: Path) -> bool:
    return _suffix(path) in (".nii", ".nii.gz")


def _image_files(path: Path, what: str, series_uid: str | None) -> list[str]:
    """The file(s) holding the image: ``[path]``, or the slices of one DICOM series of the folder."""
    check_input_path(path, what, folder=True)
    if not path.is_dir():
        return [str(path)]
    check_folder_entries(path, what)
    return _dicom_series_files(path, what, series_uid)


def _dicom_series_files(folder: Path, what: str, series_uid: str | None) -> list[str]:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{what} {folder}: folder holds no DICOM series; pass an image file (NIfTI, NRRD, "
                         "MetaImage) or a folder of DICOM slices")
    if series_uid is None and len(series) == 1:
        series_uid = series[0]
    if series_uid not in series:
        listing = "; ".join(f"{uid} ({len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))} "
                            "slices)" for uid in series)
        problem = (f"holds no DICOM series {series_uid}" if series_uid
                   else f"holds {len(series)} DICOM series")
        raise InputError(f"{what} {folder}: folder {problem}: {listing}; choose one by its SeriesInstanceUID "
                         "(--fixed-series/--moving-series, or series_uid=)")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid))


def _read_header(files: list[str], path: Path, what: str) -> ImageHeader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        if _is_nifti(path) and is_nifti2(path):
            raise InputError(f"{what} {path}: is a NIfTI-2 file; {CONVERT_NIFTI2}") from None
        raise InputError(f"{what} {path}: cannot be read as an image ({_itk_reason(error)})") from None
    size = reader.GetSize() if len(files) == 1 else (*reader.GetSize()[:2], len(files))
    if reader.GetPixelID() in COMPLEX_PIXEL_IDS:
        header = ImageHeader(tuple(size), complex_values=True, spacing=tuple(reader.GetSpacing()))
    else:
        component_bytes = sitk.Image([1] * 3, reader.GetPixelID(),
                                     reader.GetNumberOfComponents()).GetSizeOfPixelComponent()
        header = ImageHeader(tuple(size), reader.GetNumberOfComponents(), component_bytes, spacing=tuple(reader.GetSpacing()))
    check_header(header, f"{what} {path}")
    check_grid(reader.GetSpacing(), reader.GetDirection(), reader.GetOrigin(), f"{what} {path}")
    return header


def _itk_reason(error: RuntimeError) -> str:
    """The last line of a SimpleITK exception, without ITK's prefixes."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[-1] if lines else "unknown error"
    if "Unable to determine ImageIO reader" in reason:
        return "not a NIfTI, NRRD, MetaImage or DICOM file, or its header is corrupt"
    return re.sub(r"^(sitk::ERROR: |ITK ERROR: \w+\(0x[0-9a-fA-F]+\): )", "", reason)


def check_header(header: ImageHeader, what: str) -> None:
    """Raise :class:`InputError` unless the image is 3D, real, scalar and at least 2 voxels along every axis."""
    if header.complex_values:
        raise InputError(f"{what}: holds complex values (e.g. MR k-space or phase data); a real-valued CT image in "
                         "HU is needed")
    if len(header.size) != 3:
        raise InputError(f"{what}: is {len(header.size)}D, a 3D image is needed")
    if header.components != 1:
        raise InputError(f"{what}: has {header.components} components per voxel "
                         "(a vector/colour image or a displacement field); a scalar CT image is needed")
    if min(header.size) < MIN_AXIS_VOXELS:
        raise InputError(f"{what}: is {'x'.join(map(str, header.size))} voxels; a 3D volume needs at least "
                         f"{MIN_AXIS_VOXELS} voxels along every axis (a single slice cannot be registered in 3D)")


def check_scalar_3d(image: sitk.Image, what: str) -> None:
    """Raise :class:`InputError` unless ``image`` is a 3D real single-component volume (see :func:`check_header`)
    on a usable grid (:func:`.grid_check.check_grid`)."""
    check_header(ImageHeader.of(image), what)
    check_grid(image.GetSpacing(), image.GetDirection(), image.GetOrigin(), what)


@contextlib.contextmanager
def atomic_paths(targets: Sequence[str | os.PathLike], overwrite: bool = True) -> Iterator[list[Path]]:
    """Yield temporary paths beside ``targets``; on success rename them all into place.

    All or nothing: on any exception (a failed write, a full disk, Ctrl-C)
    every temporary file is removed and no target is created or replaced;
    a failure while renaming removes the targets already renamed. Writer
    errors (``OSError``: disk full, permission denied) become :class:`OutputError`.
    """
    targets = [Path(target) for target in targets]
    for target in targets:
        if target.exists() and not overwrite:
            raise OutputError(f"output {target}: already exists (use --overwrite to replace it)")
        if not target.parent.is_dir():
            raise OutputError(f"output {target}: folder {target.parent} does not exist")
    where = targets[0] if len(targets) == 1 else targets[0].parent
    # Every name is known before any file exists, so a signal at any point leaves nothing unlisted behind.
    token = secrets.token_hex(6)
    temporaries = [temporary_path(target, _suffix(target), token) for target in targets]
    try:
        for temporary in temporaries:
            temporary.touch(exist_ok=False)  # the usual permissions (umask)
        yield temporaries
        _rename_all(temporaries, targets)
    except OSError as error:
        reason = error.strerror or str(error)
        raise OutputError(f"output {where}: write failed ({reason}); check free disk space and permissions") from None
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)


def _rename_all(sources: list[Path], targets: list[Path]) -> None:
    """Rename each source onto its target; if interrupted, remove the targets renamed so far."""
    done: list[Path] = []
    try:
        for source, target in zip(sources, targets):
            os.replace(source, target)
            done.append(target)
    except BaseException:
        for target in done:
            target.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` on success (see :func:`atomic_paths`)."""
    with atomic_paths([target], overwrite) as (temporary,):
        yield temporary


def rounded_to_integer(image: sitk.Image, dtype) -> sitk.Image:
    """``image`` rounded to the nearest integer and clipped to the range of the integer ``dtype`` (e.g.
    ``np.int16``, as CT is stored; NaN becomes 0), same geometry."""
    limits = np.iinfo(dtype)
    exact = np.float64 if limits.bits > 16 else np.float32  # holds every value of the type and its limits
    values = np.rint(sitk.GetArrayViewFromImage(image).astype(exact, copy=False))  # a new array, not the view
    np.nan_to_num(values, copy=False, nan=0.0)
    result = sitk.GetImageFromArray(np.clip(values, limits.min, limits.max, out=values).astype(dtype))
    result.CopyInformation(image)
    return result


def write_image(image: sitk.Image, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write a scalar image atomically (format from the file extension), compressed."""
    with atomic_path(path, overwrite) as temporary:
        save_image(image, temporary)
    return Path(path)


def save_image(image: sitk.Image, path: Path) -> None:
    """Write a scalar image, compressed (not atomic: see :func:`write_image`)."""
    _sitk_write(image, path)


def _sitk_write(image: sitk.Image, path: Path, compress: bool = True) -> None:
    """``sitk.WriteImage`` raising ``OSError``, as other writers do, when the file cannot be written."""
    try:
        sitk.WriteImage(image, str(path), compress)
    except RuntimeError as error:
        raise OSError(errno.EIO, _itk_reason(error)) from None


def write_displacement_field(field: sitk.Image, path: str | os.PathLike, overwrite: bool = True,
                             compress: bool = False) -> Path:
    """Write an LPS-mm displacement field as an ITK displacement-field file.

    NIfTI output gets the displacement-vector intent (1006), which ITK, SimpleITK
    and 3D Slicer need to read it as a transform; NIfTI stores such vectors in
    RAS and the readers convert them back to LPS. Other formats (``.nrrd``,
    ``.mha``) are written by SimpleITK with LPS vectors. Without ``compress``
    a field is stored as it is (``.nii.gz`` as a gzip file of level 0): a
    registration's field shrank by 7-8 % compressed, and compressing a
    192x192x208 one took 1.8 s; fields that are zero over much of their grid
    (e.g. generated training motion) are worth compressing.
    """
    with atomic_path(path, overwrite) as temporary:
        save_displacement_field(field, temporary, compress)
    return Path(path)


def save_displacement_field(field: sitk.Image, path: Path, compress: bool = False) -> None:
    """Write a displacement field as :func:`write_displacement_field` does, but not atomically."""
    if _suffix(path) in (".nii", ".nii.gz"):
        _save_nifti_field(field, path, compress)
    else:
        _sitk_write(sitk.Cast(field, sitk.sitkVectorFloat32), path, compress)


def _save_nifti_field(field: sitk.Image, path: Path, compress: bool) -> None:
    vectors_zyx = lps_to_ras(sitk.GetArrayViewFromImage(field)).astype(np.float32)
    data = np.transpose(vectors_zyx, (2, 1, 0, 3))[:, :, :, np.newaxis, :]  # x, y, z, t=1, vector
    affine = index_to_ras_matrix(field)
    image = nib.Nifti1Image(data, affine)
    image.header.set_intent(NIFTI_INTENT_DISPVECT)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    if _suffix(path) == ".nii":
        nib.save(image, str(path))
        return
    # no file name in the gzip header (it would be the temporary file's) and no time: the same field, the same bytes
    with open(path, "wb") as file, gzip.GzipFile("", "wb", 1 if compress else 0, file, mtime=0) as stream:
        image.to_stream(stream)


def read_displacement_field(path: str | os.PathLike) -> sitk.Image:
    """Read a displacement field file as a VectorFloat64 LPS-mm image."""
    path = check_input_path(path, "displacement field")
    try:
        field = sitk.ReadImage(str(path), sitk.sitkVectorFloat64)
    except RuntimeError:
        raise InputError(f"displacement field {path}: cannot be read as a vector image") from None
    if field.GetDimension() != 3 or field.GetNumberOfComponentsPerPixel() != 3:
        raise InputError(f"displacement field {path}: needs 3 components per voxel in 3D")
    return field


def read_transform(path: str | os.PathLike) -> sitk.DisplacementFieldTransform:
    """A displacement field file (e.g. ``displacement.nii.gz``) as a SimpleITK transform.

    ``TransformPoint`` maps a fixed point to its moving point, p -> p + u(p)
    (LPS mm), and ``sitk.Resample(moving, fixed, transform, ...)`` warps the
    moving image onto the fixed grid. (SimpleITK's transform needs 64-bit float
    vectors, so the file is read as such.)
    """
    return sitk.DisplacementFieldTransform(read_displacement_field(path))


def write_json(data: dict, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path, overwrite) as temporary:
        save_json(data, temporary)
    return Path(path)


def save_json(data: dict, path: Path) -> None:
    """Write ``data`` as indented strict JSON (NaN and Inf as null), not atomically (see :func:`write_json`)."""
    path.write_text(json.dumps(json_safe(data), indent=2, sort_keys=False, allow_nan=False) + "\n")


def json_safe(value):
    """``value`` with every NaN or infinite float (also numpy's) replaced by None, which JSON can hold."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def read_points(path: str | os.PathLike) -> np.ndarray:
    """Read an (N, 3) point list: CSV/whitespace 'x,y,z' rows, or elastix 'point'/'index' files.

    The numbers are returned as stored; whether they are voxel indices or
    millimetres is up to the file's source (see the callers).
    """
    path = check_input_path(path, "point file")
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
