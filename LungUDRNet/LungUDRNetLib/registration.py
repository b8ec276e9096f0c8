"""Register a moving CT to a fixed CT with UDRNet: images in, physical field out.

Stages: images (any geometry) -> lung masks (given, else automatic:
:mod:`.lung_mask`) -> affine pre-alignment (:mod:`.affine`) -> network grid
(:mod:`.preprocess`) -> UDRNet voxel flow -> instance optimisation on MIND-SSC
features (:mod:`.instance_optimisation`; skipped with ``fast``) -> LPS mm
field, composed with the affine, on its native grid and on the fixed image's
own grid (:mod:`.geometry`) -> warped moving image and transform. After each
stage the result most similar in the lungs is kept (:mod:`.stage_choice`:
never worse than doing nothing), and the next stage starts from it.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from .affine import prealign
from .checkpoint import load_model
from .errors import DeviceError, InputError, ModelError, ResourceError
from .geometry import (affine_points, bounds_overlap, compose_affine, describe_bounds, field_to_transform,
                       flow_on_grid, resample_field, voxel_flow_to_field, warp_image)
from .instance_optimisation import InstanceOptimisationConfig, feature_voxels, optimise
from .io import ImageHeader, check_scalar_3d, read_image, read_image_header, rounded_to_integer
from .lung_mask import lung_mask
from .memory import check_memory, registration_bytes
from .model import RegistrationUNet
from .preprocess import (PreprocessConfig, flow_to_native_field, largest_lung_box_mm, lung_box_grid,
                         mask_on_image_grid, normalise_ct, prepare_pair, read_mask, replace_non_finite, to_grid,
                         warn_if_not_ct)
from .stage_choice import Candidate, StageScore, choose, grid_points
from .warp import warp

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
OPTIMISED = "instance optimisation"  # the stage's name, after the stage it started from
MAX_FOLDED_PERCENT = 0.1  # instance optimisation's field folds no more of its grid (or than its start): see optimise


@dataclass(kw_only=True)
class RegistrationResult:
    """Outputs of :func:`register`, on the fixed image's grid unless said otherwise.

    ``displacement`` is the pull field in LPS mm (VectorFloat32) on the fixed
    grid: the fixed point p corresponds to the moving point p + u(p). It is
    resampled from ``native_displacement`` when first asked for (92 MB for a
    192x192x208 fixed image; ``lungudrnet register`` writes the native field
    and needs none), or given as ``fixed_grid_displacement`` where a result is
    made from a fixed-grid field alone. ``transform`` maps fixed points
    to moving points (``TransformPoint``) and resamples moving onto fixed; it
    holds ``native_displacement`` (the same mapping at every fixed voxel).
    ``native_displacement`` is the same field (LPS mm, VectorFloat32) at the
    resolution it really has: on :func:`.preprocess.native_field_grid`, the
    network grid ``grid`` (fixed image's axes; the displacement grid of instance optimisation)
    extended to cover the fixed image. Interpolated linearly (SimpleITK, ITK,
    Slicer) it is the network's own trilinear field and gives ``displacement``
    at every fixed voxel; between fixed voxels, interpolating ``displacement``
    strays from it a little (0.085 mm at most on a 512x512x300 lung pair). It
    is about 1 % of ``displacement``'s size there (82x113x79 nodes for a 64^3 grid).
    None where a result is made from a fixed-grid field alone.
    ``moved_inside`` (bool (z, y, x) on the fixed grid, from :func:`register`):
    True where p + u(p) lies inside the moving image, i.e. where ``warped``
    holds moving data rather than padding. Fields are given by keyword. A copy
    with another field (``dataclasses.replace``) must reset
    ``fixed_grid_displacement`` and ``moved_inside``, which derive from it.
    """

    warped: sitk.Image
    transform: sitk.DisplacementFieldTransform
    grid: sitk.Image
    preprocess: PreprocessConfig
    device: str
    timings: dict[str, float] = field(default_factory=dict)
    model_info: dict = field(default_factory=dict)
    native_displacement: sitk.Image | None = None
    stages: list[StageScore] = field(default_factory=list)
    kept_stage: str = "network"
    affine: sitk.AffineTransform | None = None
    fixed_mask: sitk.Image | None = None
    moving_mask: sitk.Image | None = None
    mask_sources: dict[str, str | None] = field(default_factory=dict)
    fixed_grid_displacement: sitk.Image | None = field(default=None, repr=False)
    moved_inside: np.ndarray | None = field(default=None, repr=False)

    @property
    def displacement(self) -> sitk.Image:
        """The pull field u (LPS mm, VectorFloat32) on the fixed grid (see the class docstring)."""
        if self.fixed_grid_displacement is None:
            if self.native_displacement is None:
                raise ValueError("this RegistrationResult holds no field: give native_displacement or "
                                 "fixed_grid_displacement")
            self.fixed_grid_displacement = resample_field(self.native_displacement, self.warped,
                                                          sitk.sitkVectorFloat32)
        return self.fixed_grid_displacement

    def metrics(self, fixed, moving, fixed_mask: sitk.Image | None = None, moving_mask: sitk.Image | None = None,
                fixed_points: np.ndarray | None = None, moving_points: np.ndarray | None = None) -> dict:
        """What ``lungudrnet register`` writes as ``metrics.json`` for this result: similarity before and
        after registration, lung Dice, Jacobian statistics, kept stage, runtime and device.

        ``fixed`` and ``moving`` are the scans given to :func:`register` (images
        or file paths). The lung masks (images or files; voxels above 0.5 are
        lung) default to those the registration used; points (N, 3, LPS mm, row i of ``fixed_points``
        corresponding to row i of ``moving_points``) add the TRE. The keys are
        those of :func:`.report.registration_report`.
        """
        from .report import registration_report  # the report module imports this one

        fixed = fixed if isinstance(fixed, sitk.Image) else read_image(fixed, "fixed image")
        moving = moving if isinstance(moving, sitk.Image) else read_image(moving, "moving image")
        fixed_mask, moving_mask = _mask(fixed_mask, fixed, "fixed mask"), _mask(moving_mask, moving, "moving mask")
        return registration_report(fixed, moving, self, fixed_mask, moving_mask, fixed_points, moving_points)

    def save(self, folder: str | os.PathLike, overwrite: bool = False, displacement_grid: str = "native",
             metrics: dict | Future | None = None) -> dict[str, Path]:
        """Write the result files of ``lungudrnet register`` into ``folder`` (created if needed).

        ``warped.nii.gz``: the warped moving scan on the fixed grid.
        ``displacement.nii.gz``: the pull field u (LPS mm, an ITK displacement
        field file; see :func:`.io.read_transform`) on its native grid
        (``native_displacement``), or with ``displacement_grid="fixed"`` on the
        fixed grid.
        ``metrics.json``: ``metrics``, e.g. from :meth:`metrics`, when given (or a
        Future of them, awaited once the images are written).
        Existing files are refused unless ``overwrite``; all files are written
        or none (:class:`.errors.OutputError`). Returns the paths by file name.
        """
        from .outputs import write_result  # the outputs module imports this one

        return write_result(self, metrics, folder, displacement_grid, overwrite)


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available, else Apple MPS, else CPU; an unavailable explicit choice raises."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r}: CUDA is not available on this machine; use --device cpu or auto")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError("device 'mps': Apple MPS is not available on this machine; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise DeviceError(f"device {device!r}: unknown device (use auto, cpu, cuda or mps)") from None


def predict_flow(model: torch.nn.Module, fixed: np.ndarray, moving: np.ndarray, device: torch.device) -> np.ndarray:
    """Run the network on normalised (D, H, W) arrays; returns the voxel flow [3, D, H, W] (float32).

    On out-of-memory on an accelerator the prediction is retried once on the
    CPU with a warning (the model is left on the device it ran on); out of
    memory on the CPU raises :class:`ResourceError`.
    """
    try:
        return _forward(model, fixed, moving, device)
    except torch.OutOfMemoryError:
        if device.type == "cpu":
            raise ResourceError(f"network: ran out of memory on the CPU for a {'x'.join(map(str, fixed.shape))} "
                                "grid; close other programs or use a model with a smaller grid") from None
        log.warning("out of memory on %s; retrying on the CPU (slower)", device)
    torch.cuda.empty_cache()  # here, not in the except block, whose traceback still holds device tensors
    return predict_flow(model, fixed, moving, torch.device("cpu"))


def _forward(model: torch.nn.Module, fixed: np.ndarray, moving: np.ndarray, device: torch.device) -> np.ndarray:
    model = model.to(device)
    with torch.inference_mode():
        fixed_t = torch.from_numpy(fixed)[None, None].to(device)
        moving_t = torch.from_numpy(moving)[None, None].to(device)
        flow = model(moving_t, fixed_t)
    flow = flow[0].float().cpu().numpy()
    if not np.isfinite(flow).all():
        raise ModelError("network: predicted NaN or Inf displacements (its weights or this input make it "
                         "diverge); use another checkpoint, e.g. the bundled weights")
    return flow


def _resolve_model(model, preprocess: PreprocessConfig | None) -> tuple[RegistrationUNet, PreprocessConfig, dict]:
    if isinstance(model, RegistrationUNet):
        return model.eval(), preprocess or PreprocessConfig(), {"path": None}
    if isinstance(model, tuple):
        loaded, stored_preprocess, info = model
    else:
        loaded, stored_preprocess, info = load_model(model)
    return loaded, preprocess or stored_preprocess, info


def _header(value, what: str) -> ImageHeader:
    """The checked header of an image or image file, without reading the file's voxels."""
    if isinstance(value, sitk.Image):
        check_scalar_3d(value, what)
        return ImageHeader.of(value)
    return read_image_header(value, what)


def _ct_image(value, what: str) -> sitk.Image:
    """A CT input as an image with finite voxels; warns when it does not look like CT."""
    image = replace_non_finite(value if isinstance(value, sitk.Image) else read_image(value, what), what)
    warn_if_not_ct(image, what)
    return image


def _mask(value, image: sitk.Image, what: str) -> sitk.Image | None:
    """An optional mask input (image or file) as a 0/1 mask on its image's grid (see :func:`mask_on_image_grid`)."""
    if value is None:
        return None
    if isinstance(value, sitk.Image):
        return mask_on_image_grid(value, image, what)
    return read_mask(value, image, what)


def in_pixel_type_of(image: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """A float image in ``reference``'s integer pixel type (rounded and clipped to the type's range), so a
    warped int16 CT stays an int16 CT (half the size of float32 on disk); float references leave it as is."""
    dtype = sitk.GetArrayViewFromImage(reference).dtype
    return rounded_to_integer(image, dtype) if np.issubdtype(dtype, np.integer) else image


def warp_ct(moving: sitk.Image, fixed: sitk.Image, transform: sitk.Transform) -> tuple[sitk.Image, np.ndarray]:
    """The moving CT resampled onto the fixed grid through ``transform`` (fixed LPS mm -> moving LPS mm;
    linear; in the moving image's integer pixel type, float32 for a float image; the moving minimum where p +
    u(p) falls outside it) and where it does not (bool (z, y, x), ITK's inside-the-buffer rule of the linear
    interpolator)."""
    values = sitk.GetArrayFromImage(warp_image(sitk.Cast(moving, sitk.sitkFloat32), fixed, default_value=np.nan,
                                               transform=transform))
    inside = np.isfinite(values)
    values[~inside] = np.min(sitk.GetArrayViewFromImage(moving))
    warped = sitk.GetImageFromArray(values)
    warped.CopyInformation(fixed)
    return in_pixel_type_of(warped, moving), inside


def _apart_message(fixed: sitk.Image, moving: sitk.Image) -> str | None:
    """A message giving both extents when the scans do not overlap in physical space, else None."""
    if bounds_overlap(fixed, moving):
        return None
    return (f"the scans do not overlap in physical space (fixed image: {describe_bounds(fixed)}; moving image: "
            f"{describe_bounds(moving)})")


def _lung_masks(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image | None,
                moving_mask: sitk.Image | None, moving_needed: bool) -> tuple[sitk.Image | None, sitk.Image | None,
                                                                          dict]:
    """The lung masks to use: the given ones, else automatic ones (:mod:`.lung_mask`; the moving one only
    when ``moving_needed``, for the affine); a scan in which no lungs are found goes on without (a warning
    says so). Also says where each came from. The two automatic masks are found at once, in two threads
    (SimpleITK and SciPy release the GIL: 1.55 -> 0.94 s on a 192x192x208 pair on 2 cores)."""
    masks, sources = {}, {}
    wanted = {}
    for key, image, given in (("fixed", fixed, fixed_mask), ("moving", moving, moving_mask)):
        if given is not None or (key == "moving" and not moving_needed):
            masks[key], sources[key] = given, None if given is None else "given"
        else:
            wanted[key] = image
    with ThreadPoolExecutor(max_workers=2) as pool:
        found = {key: pool.submit(lung_mask, image, f"{key} image") for key, image in wanted.items()}
    for key, future in found.items():
        try:
            masks[key], sources[key] = future.result(), "automatic"
        except InputError as error:
            log.warning("%s; registering without a %s lung mask (no affine pre-alignment, similarity on the "
                        "whole overlap)", error, key)
            masks[key], sources[key] = None, None
    return masks["fixed"], masks["moving"], sources


def _affine_stage(fixed: sitk.Image, moving: sitk.Image, fixed_lungs: sitk.Image,
                  moving_lungs: sitk.Image) -> sitk.AffineTransform | None:
    """The affine pre-alignment (fixed -> moving LPS mm), or None (with a warning) when the masks cannot
    give one."""
    try:
        result = prealign(fixed, moving, fixed_lungs, moving_lungs)
    except InputError as error:
        log.warning("affine pre-alignment skipped: %s", error)
        return None
    for message in result.messages:
        log.info("affine pre-alignment: %s", message)
    return result.transform


@dataclass
class Branch:
    """One way of mapping the moving scan: an optional affine (fixed -> moving LPS mm) then an optional
    network voxel flow [3, D, H, W] on ``grid``; ``moving_net`` is the moving image as the network saw it."""

    name: str
    transform: sitk.AffineTransform | None
    grid: sitk.Image
    moving_net: np.ndarray | None
    flow: np.ndarray | None = None


def _candidate(branch: Branch, points: np.ndarray) -> Candidate:
    """What ``branch`` makes of the moving scan on the network grid (``points``: its voxels, LPS mm)."""
    mapped, moving01 = points, branch.moving_net
    if branch.flow is not None:
        field = voxel_flow_to_field(branch.flow, branch.grid)  # kept alive while its voxels are viewed
        mapped = points + sitk.GetArrayViewFromImage(field)
        moving01 = warp(torch.from_numpy(branch.moving_net)[None, None], torch.from_numpy(branch.flow)[None])[0, 0]
        moving01 = moving01.numpy()
    if branch.transform is not None:
        mapped = affine_points(branch.transform, mapped)
    return Candidate(branch.name, moving01, mapped)


def _after(kept: str, stage: str) -> str:
    """The name of ``stage`` run from the result ``kept``: "network", "affine + network", "affine + network +
    instance optimisation", ..."""
    return stage if kept == "identity" and stage == "network" else f"{kept} + {stage}"


def _choose(fixed_net: np.ndarray, fixed_lungs_net: np.ndarray | None, moving: sitk.Image, branches: list[Branch],
            candidates: list[Candidate], never_worse: bool) -> tuple[Branch, list[StageScore]]:
    """The branch with the best lung NCC on the network grid, later ones winning ties
    (:mod:`.stage_choice`); without ``never_worse``, the last branch whatever its score.
    ``candidates`` are the branches' :func:`_candidate`, in the same order."""
    kept, scores = choose(fixed_net, fixed_lungs_net, moving, candidates)
    if not never_worse:
        kept = branches[-1].name
        scores = [StageScore(score.stage, score.lung_ncc_percent, score.stage == kept) for score in scores]
    return next(branch for branch in branches if branch.name == kept), scores


def _warn_if_dropped(kept: Branch, scores: list[StageScore], optimised: bool) -> None:
    """Say so when the network (or instance optimisation) lowered the similarity and an earlier result was
    kept."""
    dropped = [score for score in scores if "network" in score.stage or OPTIMISED in score.stage]
    if "network" not in kept.name or (optimised and OPTIMISED not in kept.name):
        worst = [f"{score.stage} {score.lung_ncc_percent:.1f}%" for score in dropped
                 if score.lung_ncc_percent is not None and score.stage != kept.name]
        hint = ("this pair may be unlike the training data" if kept.name == "identity"
                else "the network did not improve on it")
        log.warning("kept the %s result (lung NCC %.1f%%): %s lowered the similarity in the lungs; %s", kept.name,
                    _score_of(scores, kept.name), ", ".join(worst), hint)


def _score_of(scores: list[StageScore], name: str) -> float:
    return next((score.lung_ncc_percent for score in scores if score.stage == name), None) or -np.inf


def optimisation_settings(info: dict) -> InstanceOptimisationConfig:
    """The instance optimisation settings stored with a model (its metadata); the defaults without any."""
    try:
        return InstanceOptimisationConfig.from_metadata(info)
    except (TypeError, ValueError) as error:
        raise ModelError(f"model {info.get('path')}: its instance optimisation settings are not valid ({error}); "
                         "use a checkpoint as `lungudrnet train` saved it") from None


def optimisation_for(info: dict, fast: bool = False, iterations: int | None = None
                     ) -> InstanceOptimisationConfig | None:
    """The instance optimisation a registration runs: None with ``fast``, else the model's settings
    (:func:`optimisation_settings`) with ``iterations`` if given (:class:`InputError` if negative)."""
    if fast:
        return None
    if iterations is not None and iterations < 0:
        raise InputError(f"instance optimisation iterations: must not be negative, not {iterations}")
    settings = optimisation_settings(info)
    return settings if iterations is None else replace(settings, iterations=iterations)


def check_register_memory(headers: dict[str, ImageHeader], net: RegistrationUNet, config: PreprocessConfig,
                          max_memory: str | int | None, report: bool = False,
                          optimisation: InstanceOptimisationConfig | None = None) -> None:
    """Refuse (:class:`ResourceError`) a registration whose estimated peak memory exceeds the limit.

    ``headers`` maps "fixed image", "moving image" and any masks to their
    headers; ``report`` adds the report of ``lungudrnet register``,
    ``optimisation`` instance optimisation with these settings (see :mod:`.memory`).
    """
    fixed, moving = headers["fixed image"], headers["moving image"]
    masks = tuple(header for name, header in headers.items() if "mask" in name)
    features = None
    if optimisation is not None and optimisation.levels():
        features = feature_voxels(largest_lung_box_mm(fixed, config), optimisation)
    needed = registration_bytes(fixed, moving, config.grid_shape, net.config, masks, report, features)
    size = "x".join(map(str, fixed.size))
    check_memory(needed, max_memory, f"registration onto the {size}-voxel fixed image")


def register(fixed, moving, model=None, device: str = "auto", fixed_mask=None, moving_mask=None,
             preprocess: PreprocessConfig | None = None, progress: Progress | None = None,
             max_memory: str | int | None = None, fast: bool = False,
             optimisation: InstanceOptimisationConfig | None = None, affine: bool = True,
             never_worse: bool = True) -> RegistrationResult:
    """Deformably register ``moving`` onto ``fixed`` (images or file paths).

    ``model`` is a checkpoint path, a network (:class:`~.model.RegistrationUNet`: UDRNet or a comparison
    network), what :func:`load_model`
    returns, or None for the bundled weights. ``device``: "auto" (a CUDA GPU,
    else Apple MPS, else the CPU), "cpu", "cuda" or "mps". ``preprocess``
    replaces the model's stored preprocessing (:class:`PreprocessConfig`; for
    experiments, e.g. another network grid). ``fixed_mask``, ``moving_mask``:
    lung masks (default: automatic ones; see the module docstring for the
    stages); masks on another grid than their image are resampled onto it.
    ``affine`` adds the affine pre-alignment; ``never_worse`` keeps the stage
    most similar in the lungs (False: the last stage, e.g. to evaluate a
    network as it is).
    ``max_memory`` (bytes or e.g. "8G"; default: the memory available now)
    bounds the estimated peak memory, checked before the voxels are read.
    By default the network's field is then fitted to this pair by instance
    optimisation on MIND-SSC features (:mod:`.instance_optimisation`) with
    the model's stored settings, or ``optimisation`` if given; ``fast=True``
    keeps the network's single forward pass (the paper's method).
    ``progress(fraction, message)`` is called between steps.

    Raises the :mod:`.errors` types: :class:`InputError` (unusable image or
    mask; scans that do not overlap in physical space unless the affine stage
    aligns them), :class:`ModelError`, :class:`DeviceError`, :class:`ResourceError`.
    NaN/Inf voxels, constant images and non-CT intensity ranges give warnings
    (``logging``), and NaN never reaches the outputs.
    """
    report = progress or (lambda fraction, message: None)
    started = time.perf_counter()
    net, config, info = _resolve_model(model, preprocess)
    target = resolve_device(device)
    optimisation = None if fast else optimisation or optimisation_settings(info)
    if min(config.grid_shape) < net.minimum_size:
        raise InputError(f"network grid {config.grid_shape} is smaller than the network's minimum "
                         f"{net.minimum_size} voxels per axis")
    inputs = {"fixed image": fixed, "moving image": moving, "fixed mask": fixed_mask, "moving mask": moving_mask}
    headers = {what: _header(value, what) for what, value in inputs.items() if value is not None}
    check_register_memory(headers, net, config, max_memory, optimisation=optimisation)
    fixed_image = _ct_image(fixed, "fixed image")
    moving_image = _ct_image(moving, "moving image")
    fixed_mask = _mask(fixed_mask, fixed_image, "fixed mask")
    moving_mask = _mask(moving_mask, moving_image, "moving mask")
    apart = _apart_message(fixed_image, moving_image)
    if apart and not affine:
        raise InputError(f"{apart}; check that both scans are of this patient in one coordinate system, or leave "
                         "the affine pre-alignment on: it aligns the lungs first")
    if apart:
        log.warning("%s; the affine pre-alignment aligns them by their lungs", apart)
    timings = {"read": time.perf_counter() - started}

    report(0.1, "finding the lungs")
    step = time.perf_counter()
    fixed_lungs, moving_lungs, mask_sources = _lung_masks(fixed_image, moving_image, fixed_mask, moving_mask, affine)
    timings["lung masks"] = time.perf_counter() - step

    affine_transform = None
    if affine and fixed_lungs is not None and moving_lungs is not None:
        report(0.2, "affine pre-alignment")
        step = time.perf_counter()
        affine_transform = _affine_stage(fixed_image, moving_image, fixed_lungs, moving_lungs)
        timings["affine"] = time.perf_counter() - step

    report(0.25, "resampling both images onto the network grid")
    step = time.perf_counter()
    grid, fixed_net, moving_net = prepare_pair(fixed_image, moving_image, config, fixed_lungs)
    branches = [Branch("identity", None, grid, moving_net)]
    if affine_transform is not None:
        aligned_net = normalise_ct(to_grid(moving_image, grid, transform=affine_transform), config)
        branches.append(Branch("affine", affine_transform, grid, aligned_net))
    fixed_lungs_net = None if fixed_lungs is None else to_grid(fixed_lungs, grid, sitk.sitkNearestNeighbor) > 0
    points = grid_points(grid)
    timings["preprocess"] = time.perf_counter() - step
    step = time.perf_counter()
    candidates = [_candidate(branch, points) for branch in branches]
    kept, scores = _choose(fixed_net, fixed_lungs_net, moving_image, branches, candidates, never_worse)
    timings["choice"] = time.perf_counter() - step

    report(0.3, f"running the network on {target.type}")
    step = time.perf_counter()
    network = Branch(_after(kept.name, "network"), kept.transform, grid, kept.moving_net,
                     predict_flow(net, fixed_net, kept.moving_net, target))  # from the stage kept so far
    used = next(net.parameters()).device  # the CPU if predict_flow fell back to it
    timings["network"] = time.perf_counter() - step

    report(0.45, "keeping the stages that raise the lung similarity")
    step = time.perf_counter()
    branches, candidates = [*branches, network], [*candidates, _candidate(network, points)]
    kept, scores = _choose(fixed_net, fixed_lungs_net, moving_image, branches, candidates, never_worse)
    timings["choice"] += time.perf_counter() - step

    optimising = optimisation is not None and bool(optimisation.levels())
    optimised_scored = False  # whether an optimised field was scored against the earlier stages
    if optimising:
        report(0.5, f"instance optimisation on this pair ({optimisation.iterations} iterations)")
        step = time.perf_counter()
        # from the stage kept so far: a network field that lowered the similarity is not a start
        start_flow = kept.flow if kept.flow is not None else np.zeros((3, *grid.GetSize()[::-1]), np.float32)
        result = optimise(start_flow, grid, fixed_image, moving_image, config, optimisation,
                          kept.transform, used, box=lung_box_grid(fixed_image, config, fixed_lungs),
                          max_folded_percent=MAX_FOLDED_PERCENT)
        optimised = Branch(_after(kept.name, OPTIMISED), kept.transform, grid, kept.moving_net,
                           flow_on_grid(result.flow, result.grid, grid))
        if result.steps < optimisation.iterations:
            log.warning("instance optimisation: its field after %d steps folded %.2f%% of its grid (more than %g%% "
                        "and than the %.2f%% of the field it started from), even with %g times the smoothness "
                        "weight; %s", optimisation.iterations, result.dropped_folded_percent, MAX_FOLDED_PERCENT,
                        result.start_folded_percent, result.smoothness_weight / optimisation.smoothness_weight,
                        f"the field after step {result.steps} is used" if result.steps else "its field is not used")
        elif result.smoothness_weight > optimisation.smoothness_weight:
            log.info("instance optimisation: smoothness weight raised to %g, the field folded more than %g%% of its "
                     "grid with %g", result.smoothness_weight, MAX_FOLDED_PERCENT, optimisation.smoothness_weight)
        if result.steps:
            optimised_scored = True
            kept, scores = _choose(fixed_net, fixed_lungs_net, moving_image, [*branches, optimised],
                                   [*candidates, _candidate(optimised, points)], never_worse)
        if kept is optimised:
            kept = Branch(optimised.name, optimised.transform, result.grid, None, result.flow)
        timings["instance optimisation"] = time.perf_counter() - step
    if apart and kept.transform is None:
        raise InputError(f"{apart}, and the affine pre-alignment could not align them (lungs not found in both, "
                         "or its result was not kept); pass lung masks, or check that both scans are of this patient")
    if never_worse:
        _warn_if_dropped(kept, scores, optimised=optimised_scored)

    report(0.7, "composing the displacement field")
    step = time.perf_counter()
    flow = kept.flow if kept.flow is not None else np.zeros((3, *kept.grid.GetSize()[::-1]), np.float32)
    native_displacement = flow_to_native_field(flow, kept.grid, fixed_image)
    if kept.transform is not None:
        native_displacement = compose_affine(kept.transform, native_displacement)
    transform = field_to_transform(native_displacement)  # the same mapping, without a float64 per-voxel copy
    timings["field"] = time.perf_counter() - step

    report(0.85, "warping the moving image")
    step = time.perf_counter()
    warped, moved_inside = warp_ct(moving_image, fixed_image, transform)
    timings["warp"] = time.perf_counter() - step
    timings["total"] = time.perf_counter() - started
    log.debug("network grid %s on %s; seconds: %s", "x".join(map(str, config.grid_shape)), used,
              ", ".join(f"{step} {seconds:.2f}" for step, seconds in timings.items()))
    report(1.0, "done")
    return RegistrationResult(
        warped=warped,
        transform=transform,
        grid=kept.grid,
        preprocess=config,
        device=str(used),
        timings=timings,
        model_info=info,
        native_displacement=native_displacement,
        stages=scores,
        kept_stage=kept.name,
        affine=kept.transform,
        fixed_mask=fixed_lungs,
        moving_mask=moving_lungs,
        mask_sources=mask_sources,
        moved_inside=moved_inside,
    )
