"""A torch ``Dataset`` of registration pairs on the network grid, with optional synthetic pairs.

Each item is preprocessed exactly as :func:`LungUDRNetLib.registration.register`
does at inference (the paper's windowing, min-max and crop/fit onto the
network grid, the fixed lung mask as region of interest), so the network
trains on what it will see.

With ``truth``, items also carry the pair's known displacement as a voxel flow
on the network grid (``true_flow``, zeros and ``has_truth`` False when the
pair has none) for the trainer's supervised term.

Augmentation (``extra_pairs`` > 0): each real pair also yields ``extra_pairs``
synthetic ones whose moving image is the fixed image warped by a random smooth
field; the field depends only on (seed, epoch, index), so a run is
reproducible with any number of loader workers and after ``--resume``.

Scale augmentation (``spacing_jitter`` > 0, grid mode "canonical"): each
training item is resampled at the grid spacing times a factor drawn
log-uniformly in [1 / (1 + jitter), 1 + jitter], again from (seed, epoch,
index), so that the lungs of one patient appear at many sizes in grid voxels.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from LungUDRNetLib.geometry import field_to_voxel_flow, resample_field
from LungUDRNetLib.io import read_displacement_field, read_image, read_image_header
from LungUDRNetLib.preprocess import PreprocessConfig, prepare_pair, read_mask, to_grid
from LungUDRNetLib.warp import warp

from .datasets import PairRecord

CONTROL_POINTS = 4  # per axis, of the random field before it is upsampled to the grid


def random_smooth_flow(shape: tuple[int, int, int], amplitude: float, rng: np.random.Generator) -> torch.Tensor:
    """A random smooth voxel flow [1, 3, D, H, W]: normal values (std ``amplitude`` voxels) on a
    coarse 4x4x4 lattice, interpolated trilinearly to ``shape``."""
    coarse = rng.normal(0.0, amplitude, (1, 3, CONTROL_POINTS, CONTROL_POINTS, CONTROL_POINTS))
    return F.interpolate(torch.from_numpy(coarse.astype(np.float32)), size=shape, mode="trilinear",
                         align_corners=True)


class PairDataset(Dataset):
    """Items: ``fixed``, ``moving`` [1, D, H, W] in [0, 1]; with ``masks``, also ``fixed_mask``,
    ``moving_mask`` (0/1, zeros when absent) and ``has_masks``; with ``truth``, ``true_flow``
    [3, D, H, W] (network-grid voxels) and ``has_truth``."""

    def __init__(self, pairs: list[PairRecord], preprocess: PreprocessConfig, masks: bool = False,
                 extra_pairs: int = 0, amplitude: float = 4.0, seed: int = 0, truth: bool = False,
                 spacing_jitter: float = 0.0) -> None:
        if spacing_jitter and preprocess.grid_mode != "canonical":
            raise ValueError(f"spacing jitter needs grid mode 'canonical', not {preprocess.grid_mode!r}")
        self.pairs = pairs
        self.spacing_jitter = spacing_jitter
        self.preprocess = preprocess
        self.masks = masks
        self.truth = truth
        self.extra_pairs = extra_pairs
        self.amplitude = amplitude
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the random fields of the synthetic pairs for ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs) * (1 + self.extra_pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        pair = self.pairs[index % len(self.pairs)]
        item = self._load(pair, self.item_preprocess(index))
        if index >= len(self.pairs):
            rng = np.random.default_rng([self.seed, self.epoch, index])
            flow = random_smooth_flow(tuple(item["fixed"].shape[1:]), self.amplitude, rng)
            item["moving"] = warp(item["fixed"][None], flow)[0]
            if self.truth:
                item["true_flow"], item["has_truth"] = flow[0], torch.tensor(True)
            if self.masks:
                item["moving_mask"] = warp(item["fixed_mask"][None], flow, mode="nearest")[0]
        return item

    def item_preprocess(self, index: int) -> PreprocessConfig:
        """The preprocessing of item ``index`` in this epoch: the run's, at a jittered grid spacing when
        ``spacing_jitter`` is on."""
        if not self.spacing_jitter:
            return self.preprocess
        bound = np.log1p(self.spacing_jitter)
        factor = float(np.exp(np.random.default_rng([self.seed, self.epoch, index, 1]).uniform(-bound, bound)))
        return replace(self.preprocess, grid_spacing_mm=self.preprocess.grid_spacing_mm * factor)

    def _load(self, pair: PairRecord, preprocess: PreprocessConfig) -> dict[str, torch.Tensor]:
        fixed = read_image(pair.fixed, f"pair {pair.name}: fixed image")
        moving = read_image(pair.moving, f"pair {pair.name}: moving image")
        fixed_mask = read_mask(pair.fixed_mask, fixed, f"pair {pair.name}: fixed mask") if pair.fixed_mask else None
        grid, fixed01, moving01 = prepare_pair(fixed, moving, preprocess, roi_mask=fixed_mask)
        item = {"fixed": torch.from_numpy(fixed01)[None], "moving": torch.from_numpy(moving01)[None]}
        if self.masks:
            has_masks = pair.fixed_mask is not None and pair.moving_mask is not None
            item["has_masks"] = torch.tensor(has_masks)
            item["fixed_mask"] = _mask_on_grid(fixed_mask if has_masks else None, grid)
            moving_mask = read_mask(pair.moving_mask, moving, f"pair {pair.name}: moving mask") if has_masks else None
            item["moving_mask"] = _mask_on_grid(moving_mask, grid)
        if self.truth:
            item["has_truth"] = torch.tensor(pair.true_displacement is not None)
            item["true_flow"] = _flow_on_grid(pair.true_displacement, grid)
        return item


def check_pairs(pairs: list[PairRecord]) -> None:
    """Read the header of every image and mask of ``pairs``, so that a file that cannot be used (not a
    regular file, not a 3D real scalar image, a grid that cannot be written back) stops a run before it starts."""
    for pair in pairs:
        files = {"fixed image": pair.fixed, "moving image": pair.moving, "fixed mask": pair.fixed_mask,
                 "moving mask": pair.moving_mask}
        for what, path in files.items():
            if path is not None:
                read_image_header(path, f"pair {pair.name}: {what}")


def _flow_on_grid(path, grid: sitk.Image) -> torch.Tensor:
    """A pull field file (LPS mm) resampled onto ``grid`` as voxel flow [3, D, H, W]; zeros without one."""
    if path is None:
        return torch.zeros((3, *grid.GetSize()[::-1]))
    return torch.from_numpy(field_to_voxel_flow(resample_field(read_displacement_field(path), grid)))


def _mask_on_grid(mask: sitk.Image | None, grid: sitk.Image) -> torch.Tensor:
    """A mask resampled (nearest neighbour) onto ``grid`` as a float 0/1 tensor [1, D, H, W]."""
    if mask is None:
        return torch.zeros((1, *grid.GetSize()[::-1]))
    return torch.from_numpy((to_grid(mask, grid, sitk.sitkNearestNeighbor) > 0.5).astype(np.float32))[None]
