"""Instance optimisation: the network's field fitted to one pair on MIND-SSC features.

The network predicts a field in one pass; this stage then moves that field,
for this pair only, to where the pair's MIND-SSC features (modality
independent neighbourhood descriptors, self-similarity context; Heinrich et
al. 2012-2013) agree. The features describe local structure, not intensity,
so the denser lungs of an exhale scan do not pull the field the wrong way as
an intensity difference would.

Grids: the *displacement grid* covers a given box, in :func:`.registration.register`
the fixed lungs' box plus the network's ROI margin (:func:`.preprocess.lung_box_grid`;
its outer voxel faces), at about ``grid_spacing_mm``; the features are computed on the
grid ``feature_pooling`` times finer per axis over the same box and averaged
down onto the displacement grid. Each Gauss-Newton step warps the moving
features by the current field, linearises their difference to the fixed
features, and solves the linearised problem with a diffusion regulariser
(weight ``smoothness_weight``) by ``solver_sweeps`` Jacobi sweeps (a
multi-channel Horn-Schunck step). Of the ``iterations`` steps, the last
``refinement_iterations`` run on a finer displacement grid (about
``refinement_grid_spacing_mm``, with its own features): the coarse steps
bring the field close cheaply, the fine ones resolve it. Fields are voxel flows [3, D, H, W] as
in :mod:`.geometry`; arrays (D, H, W).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .geometry import flow_on_grid, resized_grid
from .losses import jacobian_determinant
from .preprocess import PreprocessConfig, normalise_ct, to_grid
from .warp import warp

METADATA_KEY = "instance_optimisation"  # where a checkpoint's metadata holds the settings
FOLDING_RETRIES = 2  # times the steps are repeated, with twice the smoothness weight each time, while the last folds

# The six neighbours of a voxel (unit steps along each axis, scaled by the dilation) and the twelve pairs of
# them that are sqrt(2) steps apart: the self-similarity context of MIND-SSC.
_NEIGHBOURS = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))
_PAIRS = tuple((a, b) for a in range(6) for b in range(a + 1, 6)
               if sum((p - q) ** 2 for p, q in zip(_NEIGHBOURS[a], _NEIGHBOURS[b])) == 2)


@dataclass(frozen=True)
class InstanceOptimisationConfig:
    """Settings of instance optimisation; a model stores its own in its metadata (``METADATA_KEY``).

    ``iterations``: Gauss-Newton steps in all (0: the network's field as it is).
    ``grid_spacing_mm``: target voxel size of the displacement grid.
    ``refinement_iterations``: how many of the last steps run on a finer displacement grid (0: none).
    ``refinement_grid_spacing_mm``: target voxel size of that finer grid.
    ``feature_pooling``: the features are computed on a grid this many times finer per axis.
    ``smoothness_weight``: weight of the diffusion regulariser (displacement-grid voxels).
    ``solver_sweeps``: Jacobi sweeps per Gauss-Newton step.
    ``mind_radius``, ``mind_dilation``: patch radius and neighbour distance of MIND-SSC (feature voxels).
    """

    iterations: int = 3
    grid_spacing_mm: float = 4.0
    refinement_iterations: int = 1
    refinement_grid_spacing_mm: float = 2.5
    feature_pooling: int = 2
    smoothness_weight: float = 0.025
    solver_sweeps: int = 30
    mind_radius: int = 1
    mind_dilation: int = 2

    def __post_init__(self) -> None:
        if min(self.iterations, self.refinement_iterations, self.solver_sweeps) < 0:
            raise ValueError("iterations, refinement_iterations and solver_sweeps must not be negative")
        if not (self.grid_spacing_mm > 0 and self.refinement_grid_spacing_mm > 0 and self.smoothness_weight > 0):
            raise ValueError("grid_spacing_mm, refinement_grid_spacing_mm and smoothness_weight must be > 0")
        if self.feature_pooling < 1 or self.mind_radius < 0 or self.mind_dilation < 1:
            raise ValueError("feature_pooling and mind_dilation must be >= 1, mind_radius >= 0")
        if self.mind_dilation % self.feature_pooling:
            raise ValueError("mind_dilation must be a multiple of feature_pooling")

    def levels(self) -> list[tuple[float, int]]:
        """(displacement grid spacing in mm, Gauss-Newton steps) of each grid in turn, those with steps only."""
        fine = min(self.refinement_iterations, self.iterations)
        return [(spacing, steps) for spacing, steps in ((self.grid_spacing_mm, self.iterations - fine),
                                                        (self.refinement_grid_spacing_mm, fine)) if steps]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_metadata(cls, metadata: dict) -> "InstanceOptimisationConfig":
        """The settings stored in a model's metadata; the defaults for a model without any."""
        stored = metadata.get(METADATA_KEY) or {}
        unknown = set(stored) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown instance optimisation setting(s) {', '.join(sorted(unknown))}")
        return cls(**stored)


@dataclass
class OptimisedField:
    """The result: a voxel flow [3, D, H, W] on ``grid`` after ``steps`` Gauss-Newton steps with diffusion weight
    ``smoothness_weight``, its share of folded cells (det J <= 0, %), that of the field it started from (on the
    first level's grid), and that of the last step when it was left out for folding too much (else None)."""

    flow: np.ndarray
    grid: sitk.Image
    folded_percent: float
    start_folded_percent: float
    steps: int
    smoothness_weight: float
    dropped_folded_percent: float | None = None


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2, pooling: int = 1) -> torch.Tensor:
    """MIND-SSC descriptors [1, 12, D/pooling, H/pooling, W/pooling] of an image [1, 1, D, H, W].

    Channel c: exp(-d_c / v) for the patch distance d_c between the two
    neighbours (``dilation`` voxels from the centre) of pair c, less the
    smallest over the channels; v is the channels' mean distance (clamped to
    [0.001, 1000] times its mean over the image). A patch distance is the mean
    squared difference over a box of (2 radius + pooling)^3 voxels, taken
    every ``pooling`` voxels (the sizes must be multiples of ``pooling``, and so
    must ``dilation``): with ``pooling`` 1 the classic (2 radius + 1)^3 patch.
    Borders repeat the edge voxels. The twelve pairs differ by only six
    offsets (up to sign), so six patch distance volumes are computed and
    shifted into place.
    """
    d, shape = dilation, tuple(image.shape[2:])
    if d % pooling or any(n % pooling for n in shape):
        raise ValueError(f"the image size {shape} and the dilation {d} must be multiples of the pooling {pooling}")
    padded = F.pad(image, (2 * d + radius,) * 6, mode="replicate")
    extended = tuple(n + 2 * (d + radius) for n in shape)  # distances are needed at x + s for |s| <= d + radius
    offsets, placements = [], []  # the distinct offsets; per pair: (its offset, where its distance is read)
    for a, b in _PAIRS:
        offset = tuple((q - p) * d for p, q in zip(_NEIGHBOURS[a], _NEIGHBOURS[b]))
        positive = next(v for v in offset if v) > 0
        canonical = offset if positive else tuple(-v for v in offset)
        if canonical not in offsets:
            offsets.append(canonical)
        shift = _NEIGHBOURS[a] if positive else _NEIGHBOURS[b]
        placements.append((offsets.index(canonical), tuple((d + v * d) // pooling for v in shift)))
    squared = image.new_empty((1, len(offsets), *extended))
    centre = _block(padded, (d,) * 3, extended)
    for channel, offset in enumerate(offsets):
        neighbour = _block(padded, tuple(d + v for v in offset), extended)
        torch.sub(centre, neighbour, out=squared[:, channel:channel + 1]).square_()
    squared = _strided_box_mean(squared, 2 * radius + pooling, pooling)
    size = tuple(n // pooling for n in shape)
    mind = torch.cat([_block(squared[:, [i]], start, size) for i, start in placements], dim=1)
    mind -= mind.min(dim=1, keepdim=True).values
    variance = mind.mean(dim=1, keepdim=True)
    overall = float(variance.mean())
    variance = variance.clamp(min=overall * 1e-3 + 1e-12, max=overall * 1e3 + 1e-12)
    return torch.exp(mind.div_(variance).neg_())


def _strided_box_mean(volume: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """Means over boxes of ``size``^3 voxels every ``stride`` voxels of [B, C, D, H, W] (no padding), as three
    separable passes, each a sum of ``size`` strided views (3x faster than ``avg_pool3d`` on 2 CPU cores)."""
    for axis in range(2, 5):
        count = (volume.shape[axis] - size) // stride + 1
        every_stride = (slice(None),) * axis + (slice(None, None, stride),)
        views = [volume.narrow(axis, offset, (count - 1) * stride + 1)[every_stride] for offset in range(size)]
        total = views[0] + views[1] if size > 1 else views[0].clone()
        for view in views[2:]:
            total += view
        volume = total.div_(size)
    return volume


def _block(volume: torch.Tensor, start: tuple[int, int, int], size: tuple[int, int, int]) -> torch.Tensor:
    """The block of ``size`` voxels from index ``start`` of a volume [B, C, D, H, W]."""
    return volume[..., start[0]:start[0] + size[0], start[1]:start[1] + size[1], start[2]:start[2] + size[2]]


def displacement_shape(extent_mm, spacing_mm: float) -> list[int]:
    """Voxels (x, y, z) of a displacement grid of about ``spacing_mm`` over a box of ``extent_mm`` (mm along x, y,
    z)."""
    return [max(2, math.ceil(float(e) / spacing_mm)) for e in extent_mm]


def feature_voxels(extent_mm, config: InstanceOptimisationConfig) -> int:
    """Voxels of the largest feature grid of ``config``'s levels over a box of ``extent_mm`` (mm along x, y, z)."""
    return max((math.prod(n * config.feature_pooling for n in displacement_shape(extent_mm, spacing))
                for spacing, _ in config.levels()), default=0)


def optimisation_grids(grid: sitk.Image, config: InstanceOptimisationConfig,
                       spacing_mm: float | None = None) -> tuple[sitk.Image, sitk.Image]:
    """The displacement grid of about ``spacing_mm`` (default: that of the last level, where the result lies)
    and its feature grid over ``grid``'s box (see the module docstring)."""
    if spacing_mm is None:
        spacing_mm = (config.levels() or [(config.grid_spacing_mm, 0)])[-1][0]
    shape = displacement_shape(np.asarray(grid.GetSize()) * np.asarray(grid.GetSpacing()), spacing_mm)
    return resized_grid(grid, shape), resized_grid(grid, [n * config.feature_pooling for n in shape])


def _features(image: sitk.Image, feature_grid: sitk.Image, preprocess: PreprocessConfig,
              config: InstanceOptimisationConfig, device: torch.device,
              transform: sitk.Transform | None = None) -> torch.Tensor:
    """MIND-SSC of ``image`` (through ``transform``) sampled on ``feature_grid``, on the displacement grid."""
    values = normalise_ct(to_grid(image, feature_grid, transform=transform), preprocess)
    tensor = torch.from_numpy(values)[None, None].to(device)
    return mind_ssc(tensor, config.mind_radius, config.mind_dilation, config.feature_pooling)


def folded_percent(flow: torch.Tensor) -> float:
    """Share (%) of a voxel flow's [1, 3, D, H, W] cells where x -> x + u(x) folds (det J <= 0)."""
    return 100.0 * float((jacobian_determinant(flow) <= 0).float().mean())


def spatial_gradient(volume: torch.Tensor) -> list[torch.Tensor]:
    """Central differences of a volume [..., D, H, W] along D, H and W (voxel units; one-sided at the
    borders, as ``torch.gradient``, 4x faster on 2 CPU cores), each [..., D, H, W]."""
    gradient = []
    for axis in range(volume.dim() - 3, volume.dim()):
        n = volume.shape[axis]
        if n < 2:
            raise ValueError(f"a gradient needs at least 2 voxels along each axis, not {tuple(volume.shape)}")
        along = torch.empty_like(volume)
        inner = along.narrow(axis, 1, n - 2)
        torch.sub(volume.narrow(axis, 2, n - 2), volume.narrow(axis, 0, n - 2), out=inner).mul_(0.5)
        torch.sub(volume.narrow(axis, 1, 1), volume.narrow(axis, 0, 1), out=along.narrow(axis, 0, 1))
        torch.sub(volume.narrow(axis, n - 1, 1), volume.narrow(axis, n - 2, 1), out=along.narrow(axis, n - 1, 1))
        gradient.append(along)
    return gradient


def _neighbour_mean(flow: torch.Tensor) -> torch.Tensor:
    """Mean of the six face neighbours of every voxel of a field [1, 3, D, H, W] (edges repeated)."""
    padded = F.pad(flow, (1,) * 6, mode="replicate")
    total = padded[:, :, :-2, 1:-1, 1:-1] + padded[:, :, 2:, 1:-1, 1:-1]
    for neighbour in (padded[:, :, 1:-1, :-2, 1:-1], padded[:, :, 1:-1, 2:, 1:-1], padded[:, :, 1:-1, 1:-1, :-2],
                      padded[:, :, 1:-1, 1:-1, 2:]):
        total += neighbour
    return total.div_(6.0)


def _gauss_newton_step(flow: torch.Tensor, fixed_features: torch.Tensor, moving_features: torch.Tensor,
                       smoothness_weight: float, sweeps: int) -> torch.Tensor:
    """One linearisation of the feature difference about ``flow`` [1, 3, D, H, W], solved with the diffusion
    regulariser by Jacobi sweeps: v <- (A + 6 w I)^-1 (A u + b + 6 w mean_of_neighbours(v)), where A and b are
    the normal equations of the linearised difference per voxel and w is ``smoothness_weight``."""
    warped = warp(moving_features, flow)[0]  # [C, D, H, W]
    gradient = spatial_gradient(warped)
    residual = fixed_features[0].sub(warped)
    normal = torch.empty((3, 3, *warped.shape[1:]), dtype=warped.dtype, device=warped.device)  # A, per voxel
    for i in range(3):
        for j in range(i, 3):
            normal[i, j] = normal[j, i] = _channel_mean_of_product(gradient[i], gradient[j])
    rhs = torch.stack([_channel_mean_of_product(g, residual) for g in gradient]) + _times(normal, flow[0])
    weight = 6.0 * smoothness_weight
    for i in range(3):
        normal[i, i] += weight
    inverse = _symmetric_inverse(normal)
    solution = flow
    for _ in range(sweeps):
        solution = _times(inverse, rhs + weight * _neighbour_mean(solution)[0])[None]
    return solution


def _channel_mean_of_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The mean over channels of a * b, for [C, D, H, W] arrays -> [D, H, W] (multiply-adds in place: 2.5x
    faster than ``(a * b).mean(0)`` on 2 CPU cores)."""
    total = torch.mul(a[0], b[0])
    for channel in range(1, len(a)):
        total.addcmul_(a[channel], b[channel])
    return total.div_(len(a))


def _symmetric_inverse(matrices: torch.Tensor) -> torch.Tensor:
    """Per-voxel inverse of symmetric positive definite 3 x 3 matrices [3, 3, D, H, W], from their cofactors
    (3x faster than ``torch.linalg.inv`` on 2 CPU cores)."""
    a, b, c, d, e, f = (matrices[i, j] for i, j in ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)))
    cofactors = {(0, 0): d * f - e * e, (0, 1): c * e - b * f, (0, 2): b * e - c * d,
                 (1, 1): a * f - c * c, (1, 2): b * c - a * e, (2, 2): a * d - b * b}
    inverse = torch.empty_like(matrices)
    for (i, j), cofactor in cofactors.items():
        inverse[i, j] = inverse[j, i] = cofactor
    determinant = a * inverse[0, 0] + b * inverse[0, 1] + c * inverse[0, 2]
    return inverse.div_(determinant)


def _times(matrices: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Per-voxel matrix times vector: [3, 3, D, H, W] x [3, D, H, W] -> [3, D, H, W] (multiply-adds in place:
    7x faster than ``einsum`` on 2 CPU cores)."""
    product = torch.empty_like(vectors)
    for i in range(3):
        torch.mul(matrices[i, 0], vectors[0], out=product[i])
        product[i].addcmul_(matrices[i, 1], vectors[1]).addcmul_(matrices[i, 2], vectors[2])
    return product


def optimise(start_flow: np.ndarray, start_grid: sitk.Image, fixed: sitk.Image, moving: sitk.Image,
             preprocess: PreprocessConfig, config: InstanceOptimisationConfig,
             moving_transform: sitk.Transform | None = None,
             device: torch.device = torch.device("cpu"), box: sitk.Image | None = None,
             max_folded_percent: float | None = None) -> OptimisedField:
    """Fit the voxel flow ``start_flow`` [3, D, H, W] on ``start_grid`` to this pair (HU images).

    ``moving_transform`` (fixed LPS mm -> moving LPS mm, e.g. the affine
    pre-alignment) maps the moving image before the flow, as for the network;
    ``preprocess`` gives the CT window. The optimisation covers the box of the
    image ``box`` (default: ``start_grid``'s). With ``max_folded_percent``,
    while the last step's field folds more than that share of its grid (or
    than the start, if more), the steps are repeated with twice the smoothness
    weight, at most ``FOLDING_RETRIES`` times; if it still does, the result is
    the last step of the final try that does not, the start itself when none
    does (a step may fold where a later one does not). Returns the optimised
    flow on the displacement grid of its last step (:func:`optimisation_grids`).
    """
    box = start_grid if box is None else box
    levels = config.levels()
    grids = [optimisation_grids(box, config, spacing) for spacing, _ in levels] or [optimisation_grids(box, config)]
    features = [None] * len(levels)  # (fixed, moving) features of each level, computed once
    with torch.inference_mode():
        first = torch.from_numpy(flow_on_grid(start_flow, start_grid, grids[0][0]))[None].to(device)
        start_folded = folded_percent(first)
        if not levels:  # no steps: the start, on the displacement grid
            return OptimisedField(first[0].cpu().numpy(), grids[0][0], start_folded, start_folded, 0,
                                  config.smoothness_weight)
        limit = math.inf if max_folded_percent is None else max(max_folded_percent, start_folded)
        for attempt in range(FOLDING_RETRIES + 1):
            weight = config.smoothness_weight * 2 ** attempt
            fields = []  # the field after each step, on its displacement grid
            flow = first
            for level, (_, steps) in enumerate(levels):
                level_grid, feature_grid = grids[level]
                if level:
                    flow = torch.from_numpy(flow_on_grid(flow[0].cpu().numpy(), grids[level - 1][0], level_grid))
                    flow = flow[None].to(device)
                if features[level] is None:
                    features[level] = (_features(fixed, feature_grid, preprocess, config, device),
                                       _features(moving, feature_grid, preprocess, config, device, moving_transform))
                for _ in range(steps):
                    flow = _gauss_newton_step(flow, *features[level], weight, config.solver_sweeps)
                    fields.append((flow, level_grid))
            folded = folded_percent(flow)
            if folded <= limit:
                return OptimisedField(flow[0].cpu().numpy(), fields[-1][1], folded, start_folded, len(fields), weight)
        for count in range(len(fields) - 1, 0, -1):  # rare: the last step folds too much; earlier ones are measured
            step_flow, step_grid = fields[count - 1]
            step_folded = folded_percent(step_flow)
            if step_folded <= limit:
                return OptimisedField(step_flow[0].cpu().numpy(), step_grid, step_folded, start_folded, count, weight,
                                      folded)
        return OptimisedField(first[0].cpu().numpy(), grids[0][0], start_folded, start_folded, 0, weight, folded)
