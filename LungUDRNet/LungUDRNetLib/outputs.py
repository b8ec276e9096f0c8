"""Writing the result files of a registration together, all or nothing."""

from __future__ import annotations

import contextlib
from pathlib import Path

from .errors import OutputError
from .io import atomic_path, write_displacement_field, write_image, write_json
from .registration import RegistrationResult

RESULT_FILES = ("warped.nii.gz", "displacement.nii.gz", "metrics.json")


def check_output_dir(out_dir: str | Path, inputs: list[str | Path], overwrite: bool) -> Path:
    """Refuse results that exist (unless ``overwrite``) or that would replace an input; creates nothing."""
    out_dir = Path(out_dir)
    targets = [(out_dir / name).resolve() for name in RESULT_FILES]
    for source in inputs:
        if source is not None and Path(source).resolve() in targets:
            raise OutputError(f"output {source}: is also an input; choose another --out folder")
    if not overwrite:
        for target in targets:
            if target.exists():
                raise OutputError(f"output {target}: already exists (use --overwrite to replace it)")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output folder {out_dir}: is a file")
    return out_dir


def write_result(result: RegistrationResult, report: dict, out_dir: Path) -> dict[str, Path]:
    """Write warped image, displacement field and metrics; on failure none of them is left behind."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"output folder {out_dir}: cannot be created ({error.strerror})") from None
    paths = {name: out_dir / name for name in RESULT_FILES}
    with contextlib.ExitStack() as stack:
        staged = {name: stack.enter_context(atomic_path(path)) for name, path in paths.items()}
        write_image(result.warped, staged["warped.nii.gz"])
        write_displacement_field(result.displacement, staged["displacement.nii.gz"])
        write_json(report, staged["metrics.json"])
    return paths
