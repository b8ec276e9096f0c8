"""What an input path must be before anything opens it: a readable regular file (or, where allowed, a folder).

A named pipe, socket or device would block a reader for ever, a symbolic link
loop or an over-long name raises deep inside a library; each is refused here
with one line naming the input: ``<what> <path>: <problem>``.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .errors import InputError

NAME_MAX = 255  # bytes of one file or folder name on common file systems


def check_input_path(path: str | os.PathLike, what: str, folder: bool = False,
                     error: type[Exception] = InputError) -> Path:
    """``path`` if it is a readable regular file (or, with ``folder``, a folder); else raise ``error``
    ("fixed image X: file not found", "...: is a named pipe, not a regular file", ...)."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as problem:
        raise error(f"{what} {path}: {_stat_problem(problem, path)}") from None
    if stat.S_ISDIR(mode) and not folder:
        raise error(f"{what} {path}: is a folder, not a file")
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        expected = "a regular file or a folder" if folder else "a regular file"
        raise error(f"{what} {path}: is {_kind(mode)}, not {expected}; pass the file itself (a pipe or device "
                    "would be read for ever)")
    if not os.access(path, os.R_OK | (os.X_OK if stat.S_ISDIR(mode) else 0)):
        raise error(f"{what} {path}: permission denied (not readable); check the file's permissions")
    return path


def check_folder_entries(folder: Path, what: str, error: type[Exception] = InputError) -> None:
    """Refuse a folder (e.g. of DICOM slices) that holds a named pipe, socket or device: reading the folder
    would open it and block."""
    with os.scandir(folder) as entries:
        for entry in entries:
            try:
                mode = entry.stat().st_mode
            except OSError:  # a broken link: the DICOM reader skips it
                continue
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise error(f"{what} {folder}: holds {entry.name}, which is {_kind(mode)}; a DICOM folder must "
                            "hold only files")


def _stat_problem(problem: OSError, path: Path) -> str:
    if problem.errno == errno.ENOENT:
        return "file not found"
    if problem.errno == errno.ELOOP:
        return "is a symbolic link loop (a link that points back to itself); point it at the real file"
    if problem.errno == errno.ENAMETOOLONG:
        longest = max((len(part.encode()) for part in path.parts), default=0)
        return (f"file name too long ({longest} bytes in one name, {len(str(path))} characters in all; "
                f"file systems allow {NAME_MAX} per name); rename the file or folder")
    if problem.errno == errno.ENOTDIR:
        return "file not found (a part of the path is a file, not a folder)"
    if problem.errno in (errno.EACCES, errno.EPERM):
        return "permission denied (a folder on the way cannot be entered); check the permissions"
    return f"cannot be accessed ({problem.strerror or problem})"


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"
