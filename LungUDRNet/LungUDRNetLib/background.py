"""``lungudrnet register`` in a child Python process, followed through its event channel; Cancel kills it.

The Slicer module registers this way so that the application stays responsive
while the network runs and Cancel stops the work at once. Nothing here needs
Qt: the caller polls (from a GUI timer or a loop). Inputs and results pass
through a private temporary folder, deleted when the results have been read,
on failure and on cancel.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import SimpleITK as sitk

from .child_job import ChildJob
from .errors import CancelledError, LungUDRNetError
from .io import read_displacement_field


class RegistrationProcess(ChildJob):
    """``lungudrnet register`` on in-memory images (LPS), run by a child process.

    ``fraction``, ``message``, ``warnings`` and ``log`` are those of
    :class:`.ChildJob`, up to date after each :meth:`poll`.
    """

    def __init__(self, images: dict[str, sitk.Image | None], model: str | os.PathLike | None = None,
                 device: str = "auto", python: str | None = None, fast: bool = False) -> None:
        fixed = images["fixed"]
        self._geometry = (fixed.GetOrigin(), fixed.GetSpacing(), fixed.GetDirection())
        self._folder = Path(tempfile.mkdtemp(prefix="LungUDRNet-"))
        try:
            args = ["-m", "LungUDRNetLib.cli", "--progress-json", "register", "--out", str(self._folder / "out"),
                    "--device", device, "--displacement-grid", "native", *(["--fast"] if fast else [])]
            for key, image in images.items():
                if image is not None:
                    path = self._folder / f"{key}.nrrd"
                    sitk.WriteImage(image, str(path))
                    args += [f"--{key.replace('_', '-')}", str(path)]
            if model is not None:
                args += ["--model", str(model)]
            super().__init__(args, python=python, message="starting the registration process")
        except BaseException:
            shutil.rmtree(self._folder, ignore_errors=True)
            raise

    def results(self) -> tuple[sitk.Image, sitk.Image, dict]:
        """Warped image, displacement field (LPS mm) and metrics of the ended child; deletes the files.

        The field is on its native grid (the resolution it really has, covering
        the fixed image; see ``lungudrnet register --displacement-grid``).
        Raises the child's error as a :class:`LungUDRNetError`. The warped image
        gets the fixed image's exact geometry (NIfTI stores it in single precision).
        """
        try:
            code = self.returncode
            if code is None:
                raise RuntimeError("results() called while the registration process is running")
            if code != 0:
                raise self._failure(code)
            paths = self.paths
            warped = sitk.ReadImage(paths["warped.nii.gz"])
            displacement = read_displacement_field(paths["displacement.nii.gz"])
            report = json.loads(Path(paths["metrics.json"]).read_text())
        finally:
            shutil.rmtree(self._folder, ignore_errors=True)
        origin, spacing, direction = self._geometry
        warped.SetOrigin(origin)
        warped.SetSpacing(spacing)
        warped.SetDirection(direction)
        return warped, displacement, report

    def _failure(self, code: int) -> LungUDRNetError:
        if code == CancelledError.exit_code:
            return CancelledError("the registration process was interrupted")
        return LungUDRNetError(self.failure_message("the registration process"))

    def cancel(self) -> None:
        """Kill the child (and its children) and delete the temporary files."""
        self.kill()
        shutil.rmtree(self._folder, ignore_errors=True)
