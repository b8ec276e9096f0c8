"""What ITK does not say about a NIfTI file: missing voxel bytes, NaN/Inf voxels, the NIfTI-2 format.

ITK reads a truncated NIfTI file without complaint (the missing voxels become
0) and reads NaN and Inf voxels as 0 (soft tissue in HU), so the voxel data
are scanned here first: :func:`scan_voxels` reads them once, stopping where
they end (trailing bytes are never read), and counts the non-finite ones of a
float image; :func:`restore_non_finite` puts those back into ITK's image, so
that they get the warning and the handling that NRRD or MetaImage input gets.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from .errors import CancelledError

CHUNK_BYTES = 1 << 22
NIFTI2_HEADER_BYTES = 540
CONVERT_NIFTI2 = ("NIfTI-2 files are not supported (ITK reads NIfTI-1 only); convert it, e.g. in Python with "
                  "nibabel: img = nib.load('in.nii.gz'); nib.save(nib.Nifti1Image(img.dataobj, img.affine, "
                  "img.header), 'out.nii.gz'), or save it as NRRD or NIfTI from 3D Slicer")


@dataclass(frozen=True)
class VoxelScan:
    """Whether the file holds all the voxel bytes its header promises, and how many are NaN/Inf (float only)."""

    complete: bool
    non_finite: int = 0


def is_nifti2(path: Path) -> bool:
    """Whether the file starts with a NIfTI-2 header (its first field, sizeof_hdr, is 540)."""
    try:
        with _open(path) as stream:
            first = stream.read(4)
    except (EOFError, OSError, zlib.error):
        return False
    return len(first) == 4 and NIFTI2_HEADER_BYTES in (int.from_bytes(first, "little"), int.from_bytes(first, "big"))


def scan_voxels(path: Path) -> VoxelScan:
    """Read the voxel data once, up to their end (never beyond), counting non-finite values of a float image.

    An integer ``.nii.gz`` whose gzip trailer (uncompressed size modulo 2^32)
    matches the header is complete without decompressing it.
    """
    try:
        proxy = nib.load(str(path)).dataobj
    except CancelledError:  # SIGTERM while reading: not a problem of the file
        raise
    except Exception:  # nibabel's many header errors; ITK read the header, so the data are what is in question
        return VoxelScan(False)
    dtype = np.dtype(proxy.dtype)
    offset, data_bytes = int(proxy.offset), int(np.prod(proxy.shape)) * dtype.itemsize
    is_float = np.issubdtype(dtype, np.floating)
    if not is_float and _size_known_complete(path, offset + data_bytes):
        return VoxelScan(True)
    try:
        with _open(path) as stream:
            return _scan(stream, offset, data_bytes, dtype if is_float else None)
    except (EOFError, OSError, zlib.error):
        return VoxelScan(False)


def _size_known_complete(path: Path, needed: int) -> bool:
    """Whether the file's size (``.nii``) or gzip trailer (``.nii.gz``) shows ``needed`` bytes at once."""
    if not path.name.lower().endswith(".gz"):
        return path.stat().st_size >= needed
    with path.open("rb") as handle:
        handle.seek(-4, os.SEEK_END)
        return int.from_bytes(handle.read(4), "little") == needed % 2 ** 32


def _scan(stream, offset: int, data_bytes: int, float_dtype: np.dtype | None) -> VoxelScan:
    skipped = len(stream.read(offset))
    if skipped < offset:
        return VoxelScan(False)
    remaining, non_finite = data_bytes, 0
    while remaining:
        chunk = stream.read(min(CHUNK_BYTES, remaining))
        if not chunk:
            return VoxelScan(False)
        remaining -= len(chunk)
        if float_dtype is not None:
            usable = len(chunk) - len(chunk) % float_dtype.itemsize
            non_finite += int(np.count_nonzero(~np.isfinite(np.frombuffer(chunk[:usable], float_dtype))))
    return VoxelScan(True, non_finite)


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else path.open("rb")


def restore_non_finite(image: sitk.Image, path: Path) -> sitk.Image:
    """``image`` as ITK read it from the NIfTI file ``path``, with the NaN/Inf voxels that ITK set to 0 put back."""
    stored = np.asanyarray(nib.load(str(path)).dataobj).reshape(image.GetSize(), order="F").T  # z, y, x
    bad = ~np.isfinite(stored)
    values = sitk.GetArrayFromImage(image)
    values[bad] = stored[bad]
    restored = sitk.GetImageFromArray(values)
    restored.CopyInformation(image)
    return restored
