"""Writing the result files of a registration together, all or nothing (:meth:`RegistrationResult.save`)."""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .errors import OutputError
from .input_files import NAME_MAX
from .io import atomic_paths, save_displacement_field, save_image, save_json
from .output_folder import output_lock
from .registration import RegistrationResult

IMAGE_FILES = ("warped.nii.gz", "displacement.nii.gz")
RESULT_FILES = (*IMAGE_FILES, "metrics.json")
DISPLACEMENT_GRIDS = ("fixed", "native")


def check_output_dir(out_dir: str | Path, inputs: list[str | Path], overwrite: bool,
                     names: tuple[str, ...] = RESULT_FILES) -> Path:
    """Refuse result files ``names`` that exist (unless ``overwrite``), that would replace an input, or that
    cannot be written (the folder, or its nearest existing parent, is not writable); creates nothing."""
    out_dir = Path(out_dir)
    targets = [Path(os.path.realpath(out_dir / name)) for name in names]
    for source in inputs:
        if source is not None and Path(os.path.realpath(source)) in targets:
            raise OutputError(f"output {source}: is also an input; choose another --out folder")
    try:
        existing = next(folder for folder in (out_dir, *out_dir.absolute().parents) if folder.exists())
        taken = [target for target in targets if target.exists()]
    except PermissionError as error:  # a folder on the way cannot be entered
        raise OutputError(f"output folder {out_dir}: permission denied ({error.filename}); "
                          "choose another --out folder") from None
    except OSError as error:
        longest = max(len(part.encode()) for part in out_dir.parts)
        reason = (f"a name is too long ({longest} bytes; file systems allow {NAME_MAX})" if longest > NAME_MAX
                  else error.strerror or str(error))
        raise OutputError(f"output folder {out_dir}: cannot be used: {reason}; choose another --out folder") from None
    if taken and not overwrite:
        raise OutputError(f"output {taken[0]}: already exists (use --overwrite to replace it)")
    if not existing.is_dir():
        where = "is a file" if existing == out_dir else f"is under {existing}, which is a file"
        raise OutputError(f"output folder {out_dir}: {where}, not a folder; choose another --out folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {out_dir}: {existing} is not writable (permission denied); "
                          "choose another --out folder")
    return out_dir


def write_result(result: RegistrationResult, report: dict | Future | None, out_dir: str | Path,
                 displacement_grid: str = "native", overwrite: bool = False) -> dict[str, Path]:
    """Write warped image, displacement field and (unless ``report`` is None) metrics; on failure none of
    them is left behind, nor the folders this call created. ``report`` may be a Future of the metrics,
    computed meanwhile (e.g. in a thread: the image writers release the GIL); it is awaited after the
    images are written. Existing files are refused unless ``overwrite``
    (see :func:`check_output_dir`), also those another run wrote meanwhile: the folder is locked while
    writing (:func:`.output_folder.output_lock`; a run writing there at the same time is refused).

    ``displacement_grid``: ``"native"`` writes ``result.native_displacement``
    (the field's own resolution, covering the fixed image; see
    :class:`RegistrationResult`), ``"fixed"`` ``result.displacement`` (the
    fixed image's grid, e.g. for tools that need it there).
    """
    if displacement_grid not in DISPLACEMENT_GRIDS:
        raise ValueError(f"displacement grid {displacement_grid!r}: use one of {', '.join(DISPLACEMENT_GRIDS)}")
    field = result.native_displacement if displacement_grid == "native" else result.displacement
    if field is None:
        raise OutputError("displacement: this result has no field on its native grid; write the fixed grid's")
    names = IMAGE_FILES if report is None else RESULT_FILES
    out_dir = check_output_dir(out_dir, [], overwrite, names)
    created = [folder for folder in (out_dir, *out_dir.absolute().parents) if not folder.exists()]
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"output folder {out_dir}: cannot be created ({error.strerror})") from None
    paths = {name: out_dir / name for name in names}
    try:
        with output_lock(out_dir):
            check_output_dir(out_dir, [], overwrite, names)  # again: another run may have finished meanwhile
            with atomic_paths(list(paths.values())) as (warped, displacement, *metrics):
                with ThreadPoolExecutor(max_workers=1) as pool:  # both writers release the GIL while compressing
                    field_written = pool.submit(save_displacement_field, field, displacement)
                    save_image(result.warped, warped)
                    field_written.result()
                if metrics:
                    save_json(report.result() if isinstance(report, Future) else report, metrics[0])
    except BaseException:
        for folder in created:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return paths
