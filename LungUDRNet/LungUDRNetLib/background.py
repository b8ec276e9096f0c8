"""``lungudrnet register`` in a child Python process: progress from its log, Cancel kills it.

The Slicer module registers this way so that the application stays responsive
while the network runs and Cancel stops the work at once. Nothing here needs
Qt: the caller polls (from a GUI timer or a loop). Inputs and results pass
through a private temporary folder, deleted when the results have been read,
on failure and on cancel.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psutil
import SimpleITK as sitk

from .errors import CancelledError, LungUDRNetError
from .io import read_displacement_field

LIBRARY_PARENT = Path(__file__).resolve().parent.parent  # the folder that holds LungUDRNetLib
PROGRESS_LINE = re.compile(r"\[\s*(\d+)%\]\s*(.*)$")
WARNING_LINE = re.compile(r"^WARNING [\w.]+: (.*)$")
ERROR_PREFIX = "lungudrnet: error: "


def python_executable() -> str:
    """Slicer's ``PythonSlicer`` when running inside Slicer, else the running interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


class ChildProcess:
    """A child process whose output lines (stdout and stderr) are collected by a reader thread."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        no_window = subprocess.CREATE_NO_WINDOW if os.name == "nt" else 0
        self._popen = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       encoding="utf-8", errors="replace", creationflags=no_window)
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._popen.stdout:
            self._lines.put(line.rstrip())

    def new_lines(self) -> list[str]:
        """The output lines that arrived since the last call."""
        lines = []
        with contextlib.suppress(queue.Empty):
            while True:
                lines.append(self._lines.get_nowait())
        return lines

    @property
    def returncode(self) -> int | None:
        """The exit status, or None while the child runs or output is left to read."""
        if self._reader.is_alive() or not self._lines.empty():
            return None
        return self._popen.wait()

    def kill(self) -> None:
        """Kill the child and all its descendants (``PythonSlicer`` is a launcher with a child of its own)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            for descendant in psutil.Process(self._popen.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    descendant.kill()
        self._popen.kill()
        self._popen.wait()
        self._reader.join()


class RegistrationProcess:
    """``lungudrnet register`` on in-memory images (LPS), run by a child process.

    ``fraction`` and ``message`` follow the child's progress lines and
    ``warnings`` collects its warnings once :meth:`poll` has read them.
    """

    def __init__(self, images: dict[str, sitk.Image | None], model: str | os.PathLike | None = None,
                 device: str = "auto", python: str | None = None, refine_steps: int = 0) -> None:
        self.fraction, self.message = 0.0, "starting the registration process"
        self.warnings: list[str] = []
        self.log: list[str] = []
        self._error = ""
        fixed = images["fixed"]
        self._geometry = (fixed.GetOrigin(), fixed.GetSpacing(), fixed.GetDirection())
        self._folder = Path(tempfile.mkdtemp(prefix="LungUDRNet-"))
        try:
            args = [python or python_executable(), "-m", "LungUDRNetLib.cli", "register",
                    "--out", str(self._folder / "out"), "--device", device, "--refine-steps", str(refine_steps)]
            for key, image in images.items():
                if image is not None:
                    path = self._folder / f"{key}.nrrd"
                    sitk.WriteImage(image, str(path))
                    args += [f"--{key.replace('_', '-')}", str(path)]
            if model is not None:
                args += ["--model", str(model)]
            self._child = ChildProcess(args, cwd=LIBRARY_PARENT)
        except BaseException:
            shutil.rmtree(self._folder, ignore_errors=True)
            raise

    def poll(self) -> bool:
        """Read the child's new output lines; True once the child has ended."""
        for line in self._child.new_lines():
            self.log.append(line)
            if match := PROGRESS_LINE.search(line):
                self.fraction, self.message = int(match[1]) / 100.0, match[2]
            elif match := WARNING_LINE.match(line):
                self.warnings.append(match[1])
            elif line.startswith(ERROR_PREFIX):
                self._error = line[len(ERROR_PREFIX):]
        return self._child.returncode is not None

    def results(self) -> tuple[sitk.Image, sitk.Image, dict]:
        """Warped image, displacement field (LPS mm) and metrics of the ended child; deletes the files.

        Raises the child's error as a :class:`LungUDRNetError`. Both images get
        the fixed image's exact geometry (NIfTI stores it in single precision).
        """
        try:
            code = self._child.returncode
            if code is None:
                raise RuntimeError("results() called while the registration process is running")
            if code != 0:
                raise self._failure(code)
            out = self._folder / "out"
            warped = sitk.ReadImage(str(out / "warped.nii.gz"))
            displacement = read_displacement_field(out / "displacement.nii.gz")
            report = json.loads((out / "metrics.json").read_text())
        finally:
            shutil.rmtree(self._folder, ignore_errors=True)
        origin, spacing, direction = self._geometry
        for image in (warped, displacement):
            image.SetOrigin(origin)
            image.SetSpacing(spacing)
            image.SetDirection(direction)
        return warped, displacement, report

    def _failure(self, code: int) -> LungUDRNetError:
        if code == CancelledError.exit_code:
            return CancelledError("the registration process was interrupted")
        if self._error:
            return LungUDRNetError(self._error)
        last_lines = "\n".join(self.log[-10:])
        return LungUDRNetError(f"the registration process failed (exit status {code}):\n{last_lines}")

    def cancel(self) -> None:
        """Kill the child (and its children) and delete the temporary files."""
        self._child.kill()
        shutil.rmtree(self._folder, ignore_errors=True)
        self.message = "cancelled"
