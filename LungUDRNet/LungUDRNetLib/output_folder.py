"""One run at a time per output folder, and no temporary files left over from a killed run.

* :func:`temporary_path`: the hidden name under which a file is written before it
  is renamed into place (``.NAME.PID-TOKEN.partSUFFIX``). The writer's process id
  is part of the name, so a later run can tell its own kind of leftover.
* :func:`remove_stale_temporaries`: deletes such files whose process is no
  longer alive (left by SIGKILL or a power cut); nothing else is touched.
* :func:`output_lock`: an exclusive lock on a folder (a lock file inside it,
  removed afterwards; the operating system releases the lock when its process
  dies, however it dies). A second run into the same folder fails at once with
  :class:`~.errors.OutputError` instead of replacing the first run's files. On
  taking the lock, stale temporaries in the folder are removed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
from pathlib import Path
from typing import Iterator

from .errors import OutputError

log = logging.getLogger(__name__)

LOCK_FILE = ".lungudrnet.lock"
_TEMPORARY = re.compile(r"^\..+\.(?P<pid>\d+)-[0-9a-f]{12}\.part(\.[A-Za-z0-9]+)*$")


def temporary_path(target: Path, suffix: str, token: str | None = None) -> Path:
    """The hidden temporary file beside ``target`` under which this process writes it."""
    return target.parent / f".{target.name}.{os.getpid()}-{token or secrets.token_hex(6)}.part{suffix}"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # alive, but another user's; or not knowable: keep its files
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete this tool's temporary files in ``folder`` whose writing process has ended; returns them."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _TEMPORARY.match(name)
        if match and not _alive(int(match["pid"])):
            with contextlib.suppress(OSError):
                (folder / name).unlink()
                removed.append(folder / name)
    if removed:
        log.info("removed %d temporary files left in %s by an interrupted run", len(removed), folder)
    return removed


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on the existing ``folder`` (see the module docstring)."""
    folder = Path(folder)
    path = folder / LOCK_FILE
    descriptor = _acquire(folder, path)
    try:
        remove_stale_temporaries(folder)
        yield folder
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still locked: a run that opened it meanwhile finds it gone and tries again
        os.close(descriptor)


def _acquire(folder: Path, path: Path, tries: int = 3) -> int:
    """An open, locked descriptor of the lock file ``path``; OutputError when another run holds it."""
    for _ in range(tries):
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise OutputError(f"output folder {folder}: cannot be locked ({error.strerror}); check its "
                              "permissions") from None
        if not _try_lock(descriptor):
            os.close(descriptor)
            break
        if _same_file(descriptor, path):
            return descriptor
        os.close(descriptor)  # the run before removed it as we opened it: open the new one
    raise OutputError(f"output folder {folder}: another lungudrnet run is writing into it; wait for it to end "
                      "or choose another --out folder")


def _same_file(descriptor: int, path: Path) -> bool:
    """Whether ``path`` is still the locked file (not removed by the run that held the lock before)."""
    try:
        return os.path.samestat(os.fstat(descriptor), os.stat(path))
    except OSError:
        return False


def _try_lock(descriptor: int) -> bool:
    """Take the lock without waiting; False if another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        try:
            import msvcrt
        except ImportError:  # neither: a platform without file locks; runs are then not kept apart
            return True
        try:
            msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        log.debug("no lock on this file system (%s); going on without", error)
    return True
