"""What the modules need from their host: Python packages and the interpreter of their child processes.

Registration needs only what its child process imports; the trainer needs a
little more. numpy and SimpleITK come with Slicer, torch with the PyTorch
extension. Nothing here installs anything: the panels ask the user first
(:func:`LungUDRNetSlicerLib.panel.ensureRequirements`), and never in a test.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
from pathlib import Path

TORCH_REQUIREMENT = "torch>=2.1"
# Beyond torch, numpy and SimpleITK; the same bounds as in pyproject.toml.
REGISTRATION_REQUIREMENTS = ["nibabel>=5.0", "scipy>=1.10", "psutil>=5.9"]
TRAINING_REQUIREMENTS = [*REGISTRATION_REQUIREMENTS, "tqdm>=4.60", "pyyaml>=6.0"]


def unmet(requirements: list[str]) -> list[str]:
    """The requirements (e.g. ``"torch>=2.1"``) that are not installed, or installed at a version outside the
    range (then the message names the version found)."""
    from packaging.requirements import Requirement

    problems = []
    for text in requirements:
        requirement = Requirement(text)
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(text)
            continue
        if not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{text} (found {version})")
    return problems


def python_slicer() -> str:
    """The ``PythonSlicer`` interpreter of the running Slicer application, for child processes.

    The application's own executable is Slicer itself, not Python, so there is
    no fallback: a missing ``PythonSlicer`` is an error that says where it was looked for.
    """
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    beside = Path(sys.executable).with_name(name)
    found = shutil.which("PythonSlicer") or (str(beside) if beside.is_file() else None)
    if found is None:
        raise RuntimeError(f"PythonSlicer was not found on the PATH nor beside {sys.executable}; it runs the "
                           "registration and training in the background. Reinstall 3D Slicer.")
    return found


def self_test_skip_reason(requirements: list[str]) -> str | None:
    """Why a module's self-test cannot run here (e.g. on the extension build server, which has no torch),
    or None when it can. The self-tests skip with this message: they never install packages."""
    problems = unmet([TORCH_REQUIREMENT, *requirements])
    if not problems:
        try:
            import torch  # noqa: F401  (installed but broken counts as missing)
        except ImportError as error:
            problems = [f"torch ({error})"]
    if not problems:
        return None
    return f"self-test skipped: not installed: {', '.join(problems)} (tests never install packages)"
