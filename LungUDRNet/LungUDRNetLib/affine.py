"""Affine pre-alignment of two chest CTs from their lung masks, at a coarse resolution.

The result is a transform ``T`` mapping **fixed** LPS mm points to **moving**
LPS mm points (the resampling direction): ``sitk.Resample(moving, fixed, T)``
aligns the moving CT onto the fixed one, and ``u(p) = T(p) - p`` is a pull
field in the project's convention (see :mod:`.geometry`).

Stages (images and masks are box-averaged to about ``spacing_mm`` first; the
optimisation runs in physical space, so any storage direction, flipped or
oblique, is handled):

1. **moments**: a translation that matches the lung centroids;
2. **rigid**: rotation about the fixed lung centroid and translation, by
   gradient descent with a line search on the mean squared difference of the lung
   masks averaged once more to ``mask_factor * spacing_mm`` (about 12 mm: a
   wide capture range; the moving lungs count as absent beyond the moving
   image, so that the fit cannot push the lungs out of view);
3. **affine**: the correlation of the CTs (clipped to ``HU_RANGE``) inside the
   fixed lungs dilated by ``dilation_mm``, on a fixed-seed random sample of
   ``sample_fraction`` of those voxels; the singular values (scales) of the
   result are clamped to ``1 +- max_scale_change``.

After each stage the lung overlap (Dice of the fixed lungs and the moving lungs
pulled through ``T``, on the coarse fixed grid) is measured; a stage that
lowers it by more than ``overlap_tolerance`` is dropped, and a result whose
overlap is below the identity's by more than ``identity_margin``, or whose CT
correlation in the lungs is not above the identity's, is replaced by the identity
(:class:`AffineResult` says which and why).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import index_to_points
from .lung_mask import working_grid

HU_RANGE = (-1000.0, 200.0)  # CT values are clipped to this before the image metric
LINE_SEARCH_RANGE = 4.0  # the line search of each iteration tries steps up to this many times the first one


@dataclass(frozen=True)
class AffineConfig:
    """Parameters of :func:`prealign` (lengths in mm)."""

    spacing_mm: float = 6.0  # images are box-averaged to about this spacing (whole voxels per bin)
    mask_factor: int = 2  # the rigid stage averages the masks once more by this (about 12 mm)
    margin_mm: float = 20.0  # the fixed images are cropped to the lungs' bounding box plus this
    pad_mm: float = 80.0  # the moving lungs count as absent this far beyond the moving image (rigid stage)
    dilation_mm: float = 12.0  # the image metric counts the fixed lungs dilated by this
    sample_fraction: float = 0.25  # of the image metric's voxels, drawn once with ``seed``
    seed: int = 20240611
    rigid_step_mm: float = 12.0  # largest shift of a lung point by the rigid stage's first gradient step
    image_step_mm: float = 3.0  # the same for the affine stage
    # The iteration counts bound the time; there is no wall-clock budget, so that the result does not depend on
    # how busy the machine is. A stage stops earlier when ITK's convergence value (minus the slope of the metric
    # fitted over the last 5 iterations) is at most ``convergence`` (-inf: never): on 16 lung1 training pairs
    # 1e-5 stopped the affine stage after 8-22 iterations instead of all 40, 0.51 s instead of 1.01 s on 2
    # cores, with the same landmark error to 0.05 mm.
    rigid_iterations: int = 80
    affine_iterations: int = 40
    convergence: float = 1e-5
    max_scale_change: float = 0.15  # singular values of the affine matrix stay within 1 +- this
    overlap_tolerance: float = 0.01  # Dice a stage may lose against the previous one and still be kept
    identity_margin: float = 0.01  # Dice the result may lose against the identity and still be kept
    threads: int = 2


@dataclass
class AffineResult:
    """Outcome of :func:`prealign`.

    ``transform`` maps fixed LPS mm points to moving LPS mm points (centre: the
    fixed lung centroid). ``stage`` is the last stage kept: "identity",
    "moments", "rigid" or "affine". ``overlap`` holds the lung Dice on the
    coarse fixed grid before ("identity") and after each stage tried;
    ``correlation`` the CT correlation inside the dilated fixed lungs before
    ("identity") and after ("result"). ``iterations`` counts the
    optimiser's iterations per stage, ``timings`` its seconds ("coarse":
    averaging the inputs; "total": the whole call); ``messages`` say which
    stage was dropped and why.
    """

    transform: sitk.AffineTransform
    stage: str
    overlap: dict[str, float] = field(default_factory=dict)
    correlation: dict[str, float] = field(default_factory=dict)
    iterations: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    @property
    def overlap_before(self) -> float:
        return self.overlap["identity"]

    @property
    def overlap_after(self) -> float:
        return self.overlap[self.stage]


@dataclass
class _Coarse:
    """The inputs box-averaged: CTs (float32, clipped to HU_RANGE) and lungs (0/1 float32)."""

    fixed: sitk.Image  # cropped to the fixed lungs' bounding box plus margin
    fixed_lungs: sitk.Image  # on the same grid
    fixed_region: sitk.Image  # uint8 on the same grid: the dilated fixed lungs, where the image metric counts
    moving: sitk.Image
    moving_lungs: sitk.Image
    fixed_lungs_rigid: sitk.Image  # fixed_lungs averaged by ``mask_factor``
    moving_lungs_rigid: sitk.Image  # moving_lungs averaged by ``mask_factor`` and padded with ``pad_mm`` of 0


def prealign(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image, moving_mask: sitk.Image,
             config: AffineConfig = AffineConfig()) -> AffineResult:
    """Affine transform (fixed LPS mm -> moving LPS mm) that aligns ``moving`` onto ``fixed``.

    ``fixed``, ``moving``: CTs in HU, on any grid and direction. ``fixed_mask``,
    ``moving_mask``: their lung masks (lung > 0, one label value), each on any
    grid in its CT's physical space. Deterministic for a given ``config``, whatever the machine's load;
    runs on ``config.threads`` threads. Raises :class:`.InputError` for an
    empty mask.
    """
    start = time.perf_counter()
    fixed, fixed_mask = _patient_aligned(fixed, fixed_mask)
    moving, moving_mask = _patient_aligned(moving, moving_mask)
    coarse = _coarse_inputs(fixed, moving, fixed_mask, moving_mask, config)
    run = _Prealignment(coarse, config, start)
    run.timings["coarse"] = time.perf_counter() - start
    run.moments()
    run.rigid()
    run.affine()
    return run.finish()


class _Prealignment:
    """The stages of one :func:`prealign` call, each measured and kept only if it does not lower the overlap."""

    def __init__(self, coarse: _Coarse, config: AffineConfig, start: float):
        self.coarse, self.config, self.start = coarse, config, start
        self.fixed_centre = _centroid(coarse.fixed_lungs)
        self.result = AffineResult(transform=_identity(self.fixed_centre), stage="identity")
        self.result.overlap["identity"] = self.overlap(self.result.transform)
        self.result.correlation["identity"] = self.correlation(self.result.transform)
        self.timings = self.result.timings

    def moments(self) -> None:
        """Translation that matches the lung centroids."""
        clock = time.perf_counter()
        moving_centre = _centroid(self.coarse.moving_lungs)
        self.keep_if_not_worse("moments", _affine(self.fixed_centre, np.eye(3), moving_centre - self.fixed_centre))
        self.timings["moments"] = time.perf_counter() - clock

    def rigid(self) -> None:
        """Rigid fit of the lung masks (mean squared difference of the averaged masks), started from the
        translation kept so far (moments or identity)."""
        clock = time.perf_counter()
        rigid = sitk.Euler3DTransform()
        start = self.result.transform
        rigid.SetCenter(start.GetCenter())
        rigid.SetTranslation(start.GetTranslation())
        registration = self.registration()
        registration.SetMetricAsMeanSquares()
        registration.SetMetricSamplingStrategy(registration.NONE)
        self.optimise(registration, rigid, self.coarse.fixed_lungs_rigid, self.coarse.moving_lungs_rigid,
                      self.config.rigid_step_mm, self.config.rigid_iterations, "rigid")
        self.keep_if_not_worse("rigid", _affine(rigid.GetCenter(), rigid.GetMatrix(), rigid.GetTranslation()))
        self.timings["rigid"] = time.perf_counter() - clock

    def affine(self) -> None:
        """Affine fit of the CTs in the dilated fixed lungs, its scales clamped to 1 +- max_scale_change."""
        clock = time.perf_counter()
        affine = self.optimise(self.image_registration(), sitk.AffineTransform(self.result.transform),
                               self.coarse.fixed, self.coarse.moving, self.config.image_step_mm,
                               self.config.affine_iterations, "affine")
        left, scales, right = np.linalg.svd(np.asarray(affine.GetMatrix()).reshape(3, 3))
        limit = self.config.max_scale_change
        if np.linalg.det(left @ right) < 0:
            self.result.messages.append("affine stage dropped: it mirrors the lungs")
        else:
            if np.any(np.abs(scales - 1.0) > limit):
                self.result.messages.append(f"affine stage: scales {np.round(scales, 3).tolist()} clamped to "
                                            f"1 +- {limit}")
                affine.SetMatrix(tuple((left @ np.diag(np.clip(scales, 1.0 - limit, 1.0 + limit)) @ right).ravel()))
            self.keep_if_not_worse("affine", affine)
        self.timings["affine"] = time.perf_counter() - clock

    def finish(self) -> AffineResult:
        """The identity instead of a result that overlaps the lungs less than it (beyond the tolerance: lung
        masks of two breathing phases differ in volume, so an alignment that halves the landmark error can
        lower their Dice by a little) or whose CT correlation in the lungs is not higher; final measures."""
        result = self.result
        correlation = self.correlation(result.transform)
        before = result.correlation["identity"]  # NaN where the moving CT covers none of the fixed lungs
        better = correlation > before if np.isfinite(before) else np.isfinite(correlation)
        if result.stage != "identity":
            reason = None
            if result.overlap_after < result.overlap_before - self.config.identity_margin:
                reason = (f"lung overlap {result.overlap_after:.3f} after the {result.stage} stage is below "
                          f"{result.overlap_before:.3f} before")
            elif not better:
                reason = (f"CT correlation in the lungs {correlation:.3f} after the {result.stage} stage is not "
                          f"above {before:.3f} before")
            if reason:
                result.messages.append(f"kept the identity: {reason}")
                result.transform, result.stage = _identity(self.fixed_centre), "identity"
                correlation = before
        result.correlation["result"] = correlation
        self.timings["total"] = time.perf_counter() - self.start
        return result

    def keep_if_not_worse(self, stage: str, transform: sitk.AffineTransform) -> None:
        """Make ``transform`` the result unless it lowers the overlap by more than the tolerance."""
        overlap = self.overlap(transform)
        self.result.overlap[stage] = overlap
        if overlap < self.result.overlap_after - self.config.overlap_tolerance:
            self.result.messages.append(f"{stage} stage dropped: lung overlap {overlap:.3f} < "
                                        f"{self.result.overlap_after:.3f} after the {self.result.stage} stage")
            return
        self.result.transform, self.result.stage = transform, stage

    def registration(self) -> sitk.ImageRegistrationMethod:
        registration = sitk.ImageRegistrationMethod()
        registration.SetNumberOfThreads(self.config.threads)
        registration.SetInterpolator(sitk.sitkLinear)
        registration.SetShrinkFactorsPerLevel([1])
        registration.SetSmoothingSigmasPerLevel([0.0])
        return registration

    def image_registration(self) -> sitk.ImageRegistrationMethod:
        """Correlation of the clipped CTs in the dilated fixed lungs, on a fixed-seed sample of voxels."""
        registration = self.registration()
        registration.SetMetricAsCorrelation()
        registration.SetMetricFixedMask(self.coarse.fixed_region)
        registration.SetMetricSamplingStrategy(registration.RANDOM)
        registration.SetMetricSamplingPercentage(self.config.sample_fraction, self.config.seed)
        return registration

    def optimise(self, registration: sitk.ImageRegistrationMethod, transform: sitk.Transform, fixed: sitk.Image,
                 moving: sitk.Image, step_mm: float, iterations: int, stage: str) -> sitk.Transform:
        """Gradient descent with a line search, of ``transform`` in place (also returned).

        Parameter scales come from the physical shift each parameter causes, and
        the learning rate is set once so that the first step moves no point of the
        fixed region by more than ``step_mm``; the line search then takes up to
        ``LINE_SEARCH_RANGE`` times that step. (ITK's regular-step optimiser
        measures its step in parameter units: a step of 12 turned the lungs by
        radians.) On an ITK error the transform keeps its start parameters, and
        the error is told.
        """
        registration.SetOptimizerScalesFromPhysicalShift()
        registration.SetOptimizerAsGradientDescentLineSearch(
            1.0, iterations, convergenceMinimumValue=self.config.convergence, convergenceWindowSize=5,
            lineSearchLowerLimit=0.0, lineSearchUpperLimit=LINE_SEARCH_RANGE, lineSearchEpsilon=0.05,
            lineSearchMaximumIterations=10, estimateLearningRate=registration.Once,
            maximumStepSizeInPhysicalUnits=step_mm)
        start = transform.GetParameters()
        registration.SetInitialTransform(transform, inPlace=True)
        try:
            registration.Execute(fixed, moving)
        except RuntimeError as error:
            transform.SetParameters(start)
            self.result.messages.append(f"{stage} stage failed ({str(error).strip().splitlines()[-1]})")
        else:
            self.result.iterations[stage] = registration.GetOptimizerIteration()
        return transform

    def overlap(self, transform: sitk.Transform) -> float:
        """Dice of the fixed lungs and the moving lungs pulled through ``transform`` (coarse fixed grid)."""
        fixed = sitk.GetArrayViewFromImage(self.coarse.fixed_lungs)
        moving = np.nan_to_num(sitk.GetArrayFromImage(
            _resample(self.coarse.moving_lungs, self.coarse.fixed_lungs, transform, self.config.threads)))
        return float(2.0 * np.sum(fixed * moving) / (np.sum(fixed) + np.sum(moving)))

    def correlation(self, transform: sitk.Transform) -> float:
        """Correlation of the clipped CTs in the dilated fixed lungs, where the moving CT is defined."""
        warped = sitk.GetArrayFromImage(_resample(self.coarse.moving, self.coarse.fixed, transform,
                                                  self.config.threads))
        inside = (sitk.GetArrayViewFromImage(self.coarse.fixed_region) > 0) & np.isfinite(warped)
        if inside.sum() < 2:
            return float("nan")
        return float(np.corrcoef(sitk.GetArrayViewFromImage(self.coarse.fixed)[inside], warped[inside])[0, 1])


# ----------------------------------------------------------------------------- coarse inputs


def _patient_aligned(ct: sitk.Image, mask: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """The CT (float32, HU) and its mask (uint8) on the CT's axis-aligned working grid of at least 2 mm
    (:func:`.lung_mask.working_grid`), so that the coarse images, and so the result, do not depend on how
    the files store their axes."""
    grid = working_grid(ct)
    return (sitk.Resample(ct, grid, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32),
            sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))


def _coarse_inputs(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image, moving_mask: sitk.Image,
                   config: AffineConfig) -> _Coarse:
    threads = config.threads
    coarse_fixed = _coarse_ct(fixed, config.spacing_mm, threads)
    fixed_lungs = _on_grid(_coarse_mask(fixed_mask, config.spacing_mm, threads, "fixed"), coarse_fixed, threads)
    moving_lungs = _coarse_mask(moving_mask, config.spacing_mm, threads, "moving")
    crop = _bounding_box(fixed_lungs, config.margin_mm)
    fixed_lungs = crop(fixed_lungs)
    return _Coarse(
        fixed=crop(coarse_fixed), fixed_lungs=fixed_lungs,
        fixed_region=_dilate(fixed_lungs, config.dilation_mm, threads),
        moving=_coarse_ct(moving, config.spacing_mm, threads), moving_lungs=moving_lungs,
        fixed_lungs_rigid=_shrink(fixed_lungs, [config.mask_factor] * 3, threads),
        moving_lungs_rigid=_pad(_shrink(moving_lungs, [config.mask_factor] * 3, threads), config.pad_mm, threads),
    )


def _run(process: sitk.ProcessObject, threads: int, *inputs: sitk.Image) -> sitk.Image:
    process.SetNumberOfThreads(threads)
    return process.Execute(*inputs)


def _dilate(lungs: sitk.Image, radius_mm: float, threads: int) -> sitk.Image:
    """uint8 mask of the 0/1 ``lungs`` dilated by a box of about ``radius_mm`` (at least one voxel)."""
    cast = sitk.CastImageFilter()
    cast.SetOutputPixelType(sitk.sitkUInt8)
    dilate = sitk.BinaryDilateImageFilter()
    dilate.SetKernelRadius([max(1, int(round(radius_mm / s))) for s in lungs.GetSpacing()])
    dilate.SetKernelType(sitk.sitkBox)
    dilate.SetForegroundValue(1)
    return _run(dilate, threads, _run(cast, threads, lungs))


def _pad(image: sitk.Image, margin_mm: float, threads: int) -> sitk.Image:
    """``image`` with about ``margin_mm`` of zeros added on every side."""
    pad = sitk.ConstantPadImageFilter()
    width = [int(np.ceil(margin_mm / s)) for s in image.GetSpacing()]
    pad.SetPadLowerBound(width)
    pad.SetPadUpperBound(width)
    pad.SetConstant(0.0)
    return _run(pad, threads, image)


def _bin_factors(image: sitk.Image, spacing_mm: float) -> list[int]:
    """Whole voxels per bin along each index axis so that bins are about ``spacing_mm`` wide."""
    return [int(min(size, max(1, round(spacing_mm / s)))) for s, size in zip(image.GetSpacing(), image.GetSize())]


def _shrink(image: sitk.Image, factors: list[int], threads: int) -> sitk.Image:
    """Box average over bins of ``factors`` voxels (integer types are rounded)."""
    shrink = sitk.BinShrinkImageFilter()
    shrink.SetShrinkFactors([int(min(f, n)) for f, n in zip(factors, image.GetSize())])
    return _run(shrink, threads, image)


def _coarse_ct(ct: sitk.Image, spacing_mm: float, threads: int) -> sitk.Image:
    """The CT averaged to about ``spacing_mm`` and clipped to HU_RANGE, float32."""
    cast = sitk.CastImageFilter()
    cast.SetOutputPixelType(sitk.sitkFloat32)
    clamp = sitk.ClampImageFilter()
    clamp.SetLowerBound(HU_RANGE[0])
    clamp.SetUpperBound(HU_RANGE[1])
    return _run(clamp, threads, _run(cast, threads, _shrink(ct, _bin_factors(ct, spacing_mm), threads)))


def _coarse_mask(mask: sitk.Image, spacing_mm: float, threads: int, what: str) -> sitk.Image:
    """The mask averaged to about ``spacing_mm`` and thresholded at half its label: 0/1 float32."""
    label = float(np.max(sitk.GetArrayViewFromImage(mask)))
    if label <= 0:
        raise InputError(f"prealign: the {what} lung mask is empty")
    coarse = _shrink(mask, _bin_factors(mask, spacing_mm), threads)
    lungs = sitk.GetImageFromArray((sitk.GetArrayViewFromImage(coarse) >= label / 2).astype(np.float32))
    lungs.CopyInformation(coarse)
    if not sitk.GetArrayViewFromImage(lungs).any():
        raise InputError(f"prealign: the {what} lung mask is smaller than one {spacing_mm:g} mm voxel")
    return lungs


def _on_grid(lungs: sitk.Image, reference: sitk.Image, threads: int) -> sitk.Image:
    """0/1 ``lungs`` on ``reference``'s grid (linear interpolation, then a threshold at 1/2; 0 outside)."""
    if (lungs.GetSize() == reference.GetSize()
            and np.allclose(lungs.GetOrigin(), reference.GetOrigin(), atol=1e-3)
            and np.allclose(lungs.GetSpacing(), reference.GetSpacing(), atol=1e-6)
            and np.allclose(lungs.GetDirection(), reference.GetDirection(), atol=1e-6)):
        return lungs
    fraction = sitk.GetArrayFromImage(_resample(lungs, reference, sitk.Transform(), threads))
    on_grid = sitk.GetImageFromArray((np.nan_to_num(fraction) >= 0.5).astype(np.float32))
    on_grid.CopyInformation(reference)
    if not sitk.GetArrayViewFromImage(on_grid).any():
        raise InputError("prealign: the fixed lung mask lies outside the fixed CT")
    return on_grid


def _bounding_box(lungs: sitk.Image, margin_mm: float):
    """A function that crops an image on ``lungs``' grid to the lungs' bounding box plus ``margin_mm``."""
    inside = np.nonzero(sitk.GetArrayViewFromImage(lungs))
    margin = np.ceil(margin_mm / np.asarray(lungs.GetSpacing())[::-1]).astype(int)
    shape = sitk.GetArrayViewFromImage(lungs).shape
    low = [max(0, int(axis.min()) - m) for axis, m in zip(inside, margin)]
    high = [min(n, int(axis.max()) + 1 + m) for axis, n, m in zip(inside, shape, margin)]
    return lambda image: image[low[2]:high[2], low[1]:high[1], low[0]:high[0]]


def _centroid(lungs: sitk.Image) -> np.ndarray:
    """Centroid (LPS mm) of a 0/1 lung image."""
    k, j, i = np.nonzero(sitk.GetArrayViewFromImage(lungs))
    return index_to_points(np.stack([i, j, k], axis=1).astype(float), lungs).mean(axis=0)


# ----------------------------------------------------------------------------- transforms


def _identity(centre: np.ndarray) -> sitk.AffineTransform:
    return _affine(centre, np.eye(3), np.zeros(3))


def _affine(centre, matrix, translation) -> sitk.AffineTransform:
    """``p -> matrix (p - centre) + centre + translation`` (LPS mm) as an AffineTransform."""
    affine = sitk.AffineTransform(3)
    affine.SetCenter(tuple(float(v) for v in centre))
    affine.SetMatrix(tuple(float(v) for v in np.ravel(matrix)))
    affine.SetTranslation(tuple(float(v) for v in translation))
    return affine


def _resample(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform, threads: int) -> sitk.Image:
    resample = sitk.ResampleImageFilter()
    resample.SetReferenceImage(reference)
    resample.SetTransform(transform)
    resample.SetInterpolator(sitk.sitkLinear)
    resample.SetDefaultPixelValue(np.nan)
    return _run(resample, threads, image)
