"""Small inputs shared by the ``test_robustness_*`` tests: a phantom pair on different grids, a tiny
checkpoint, DICOM series, checksums, and running Python as an unprivileged user."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import os
import pkgutil
import pwd
import select
import signal
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk

import LungUDRNetLib
import LungUDRNetTrainerLib
from LungUDRNetLib.checkpoint import save_checkpoint, untrained_model
from LungUDRNetLib.io import write_image
from LungUDRNetLib.phantom import chest_phantom, lung_mask_phantom, make_grid
from LungUDRNetLib.preprocess import PreprocessConfig

from conftest import oblique_direction

TINY_GRID = (16, 16, 16)  # the default network's minimum: the fastest registration


def centred_grid(size, spacing, direction=np.eye(3)) -> sitk.Image:
    """A grid of ``size`` voxels whose centre is the LPS origin (0, 0, 0)."""
    half_extent = np.asarray(direction) @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2.0)
    return make_grid(size, spacing, -half_extent, direction)


def fixed_phantom() -> sitk.Image:
    """24 x 22 x 20 voxels (96 x 88 x 100 mm), oblique and flipped, int16 HU."""
    return sitk.Cast(chest_phantom(centred_grid((24, 22, 20), (4.0, 4.0, 5.0), oblique_direction(10.0))),
                     sitk.sitkInt16)


def moving_phantom() -> sitk.Image:
    """20 x 24 x 18 voxels on an axis-aligned grid with other spacing and origin, float32 HU."""
    return chest_phantom(centred_grid((20, 24, 18), (5.0, 4.0, 5.5)), seed=1)


def write_case(folder: Path, grid_shape: tuple[int, int, int] = TINY_GRID) -> dict[str, Path]:
    """Fixed (NRRD), moving (MetaImage), fixed lung mask (NIfTI) and an untrained checkpoint in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    fixed = fixed_phantom()
    return {
        "fixed": write_image(fixed, folder / "fixed.nrrd"),
        "moving": write_image(moving_phantom(), folder / "moving.mha"),
        "fixed_mask": write_image(lung_mask_phantom(fixed), folder / "fixed_mask.nii.gz"),
        "model": save_checkpoint(folder / "model.pt", untrained_model()[0], PreprocessConfig(grid_shape=grid_shape)),
    }


def register_args(files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """``lungudrnet register`` arguments for ``files`` (as made by :func:`write_case`) on the CPU."""
    return ["register", "--fixed", str(files["fixed"]), "--moving", str(files["moving"]), "--out", str(out),
            "--model", str(files["model"]), "--device", "cpu", *extra]


def checksums(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder``, by relative path."""
    def sha256(path: Path) -> str:
        with path.open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def write_dicom_series(folder: Path, image: sitk.Image, series_uid: str) -> None:
    """Write ``image`` (int16, axis-aligned) as one DICOM file per slice with the given SeriesInstanceUID."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {"0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.9", "0020|000e": series_uid,
                "0008|0018": f"{series_uid}.{k + 1}", "0020|0013": str(k + 1),
                "0020|0032": "\\".join(f"{v:.3f}" for v in position), "0020|0037": "1\\0\\0\\0\\1\\0",
                "0018|0050": f"{image.GetSpacing()[2]:.3f}", "0028|1052": "0", "0028|1053": "1"}
        slice_image = image[:, :, k]
        for tag, value in tags.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid}-{k:03d}.dcm"))
        writer.Execute(slice_image)


def call_as_nobody(function: Callable[[], object], timeout_s: float = 60.0) -> str:
    """``function()`` in a forked child running as the unprivileged user 'nobody'; what it returned
    (``repr``) or raised (``Type: message``), as text.

    Root reads and writes any file, so permission errors can only be tested as
    another user. The child inherits the loaded modules (the interpreter itself
    may not be reachable by 'nobody', nor the source tree), so every module of the
    two packages is imported first; ``function`` should only do what fails early.
    """
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("running as root and there is no user 'nobody' to test file permissions with")
    for package in (LungUDRNetLib, LungUDRNetTrainerLib):
        for module in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if not module.name.endswith(".__main__"):
                importlib.import_module(module.name)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            try:
                outcome = repr(function())
            except BaseException as error:
                outcome = f"{type(error).__name__}: {error}"
            os.write(write_end, outcome.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        if not select.select([read_end], [], [], timeout_s)[0]:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"the child running as 'nobody' did not answer within {timeout_s} s")
        chunks = []
        while chunk := os.read(read_end, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)


def as_unprivileged_user(function: Callable[[], object]) -> str:
    """``function()``'s outcome (as :func:`call_as_nobody` reports it) under file permissions: run directly, or
    as 'nobody' when running as root, whom permissions do not stop."""
    if os.geteuid() == 0:
        return call_as_nobody(function)
    try:
        return repr(function())
    except Exception as error:
        return f"{type(error).__name__}: {error}"


def array(image: sitk.Image) -> np.ndarray:
    """A copy of the image's voxels (safe to keep after the image is gone)."""
    return sitk.GetArrayFromImage(image)


def edited_metaimage(path: Path, image: sitk.Image, **fields: str) -> Path:
    """``image`` written uncompressed as a MetaImage at ``path``, header fields (e.g. ``TransformMatrix``,
    ``ElementSpacing``) replaced by the given text, as a hand-edited or broken exporter's file would be."""
    sitk.WriteImage(image, str(path), False)
    header, separator, voxels = path.read_bytes().partition(b"ElementDataFile = LOCAL\n")
    lines = [line for line in header.decode().splitlines()]
    for key, value in fields.items():
        lines = [f"{key} = {value}" if line.split(" = ")[0] == key else line for line in lines]
    path.write_bytes(("\n".join(lines) + "\n").encode() + separator + voxels)
    return path


@contextlib.contextmanager
def named_pipe(path: Path, timeout_s: float = 20.0):
    """A FIFO at ``path``; should a reader block on it, it is released (end of file) after ``timeout_s``, so
    that a regression fails the test instead of hanging it."""
    os.mkfifo(path)

    def release() -> None:
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    timer = threading.Timer(timeout_s, release)
    timer.start()
    try:
        yield path
    finally:
        timer.cancel()
