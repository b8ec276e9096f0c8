"""One pair of files through ``register``, as ``lungudrnet register`` and each pair of ``--pairs`` run it.

The order guards large work: every input's header is checked and the peak
memory estimated (with the report of ``metrics.json``) before any voxels are
read; masks on another grid than their image are resampled onto it.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import SimpleITK as sitk

if TYPE_CHECKING:  # imported where used: they load torch
    from .instance_optimisation import InstanceOptimisationConfig
    from .registration import Progress, RegistrationResult

InputPath = str | os.PathLike


@dataclass(frozen=True)
class Options:
    """The ``register`` options of the command line (see :func:`.registration.register`)."""

    model: str | None = None
    device: str = "auto"
    max_memory: str | None = None
    fast: bool = False
    iterations: int | None = None
    affine: bool = True
    displacement_grid: str = "native"


@dataclass
class Inputs:
    """A pair as read for registration: the images, their masks on the images' grids (or None), the model
    (what :func:`.checkpoint.load_model` returns) and the instance optimisation it runs (None: ``--fast``)."""

    fixed: sitk.Image
    moving: sitk.Image
    fixed_mask: sitk.Image | None
    moving_mask: sitk.Image | None
    model: tuple
    optimisation: InstanceOptimisationConfig | None

    def register(self, options: Options, progress: Progress | None = None) -> RegistrationResult:
        """:func:`.registration.register` on this pair with ``options``."""
        from .registration import register

        return register(self.fixed, self.moving, model=self.model, device=options.device,
                        fixed_mask=self.fixed_mask, moving_mask=self.moving_mask, progress=progress,
                        max_memory=options.max_memory, fast=options.fast, optimisation=self.optimisation,
                        affine=options.affine)

    def metrics(self, result: RegistrationResult, fixed_points=None, moving_points=None) -> dict:
        """What ``metrics.json`` holds for ``result`` of this pair (points: N x 3 LPS mm, or None)."""
        return result.metrics(self.fixed, self.moving, self.fixed_mask, self.moving_mask, fixed_points,
                              moving_points)

    def save(self, result: RegistrationResult, folder: InputPath, options: Options, overwrite: bool,
             points: tuple = (None, None), extra: dict | None = None) -> tuple[dict, dict]:
        """Write ``result``'s files with its :meth:`metrics` (plus ``extra`` keys) into ``folder``; returns the
        metrics and the paths by file name. The metrics are computed in a thread while the images are
        written (the image writers release the GIL)."""
        with ThreadPoolExecutor(max_workers=1) as pool:
            report = pool.submit(lambda: {**self.metrics(result, *points), **(extra or {})})
            written = result.save(folder, overwrite=overwrite, displacement_grid=options.displacement_grid,
                                  metrics=report)
        return report.result(), written


def read_inputs(paths: dict[str, InputPath | None], options: Options, model: tuple | None = None,
                series: dict[str, str | None] | None = None) -> Inputs:
    """Check, estimate and read the files of one pair.

    ``paths`` maps "fixed image", "moving image" and optionally "fixed mask"
    and "moving mask" to files (None: not given); ``series`` the images to
    DICOM SeriesInstanceUIDs. ``model``: what :func:`.checkpoint.load_model`
    returns, or None to load ``options.model`` after the headers are checked.
    """
    from .checkpoint import load_model
    from .io import read_image, read_image_header
    from .preprocess import mask_on_image_grid
    from .registration import check_register_memory, optimisation_for

    series = series or {}
    paths = {what: path for what, path in paths.items() if path is not None}
    headers = {what: read_image_header(path, what, series.get(what)) for what, path in paths.items()}
    model = model or load_model(options.model)
    optimisation = optimisation_for(model[2], options.fast, options.iterations)
    check_register_memory(headers, model[0], model[1], options.max_memory, report=True, optimisation=optimisation)
    folders = any(os.path.isdir(path) for path in paths.values())  # GDCM is not known to be thread-safe
    with ThreadPoolExecutor(max_workers=1 if folders else 2) as pool:  # file readers release the GIL
        reading = {what: pool.submit(read_image, path, what, series.get(what)) for what, path in paths.items()}
    images = {what: future.result() for what, future in reading.items()}
    fixed, moving = images["fixed image"], images["moving image"]
    masks = {what: mask_on_image_grid(images[what], image, f"{what} {paths[what]}")
             for what, image in (("fixed mask", fixed), ("moving mask", moving)) if what in images}
    return Inputs(fixed, moving, masks.get("fixed mask"), masks.get("moving mask"), model, optimisation)
