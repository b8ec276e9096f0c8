"""Instance optimisation on MIND-SSC features: the descriptors against a direct implementation, the
optimiser on pairs with a known field, and its settings as a model stores them."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from LungUDRNetLib.checkpoint import DEFAULT_WEIGHTS, load_model, save_checkpoint, untrained_model
from LungUDRNetLib.errors import InputError, ModelError
from LungUDRNetLib.geometry import transform_points, voxel_flow_to_field
from LungUDRNetLib.instance_optimisation import (FOLDING_RETRIES, METADATA_KEY, InstanceOptimisationConfig,
                                                 _channel_mean_of_product, _strided_box_mean, _symmetric_inverse,
                                                 folded_percent, mind_ssc, optimisation_grids, optimise,
                                                 spatial_gradient)
from LungUDRNetLib.phantom import chest_phantom, make_grid
from LungUDRNetLib.preprocess import PreprocessConfig, lung_box_grid, network_grid
from LungUDRNetLib.registration import optimisation_for, register


def _mind_direct(image: torch.Tensor, radius: int, dilation: int, pooling: int) -> torch.Tensor:
    """MIND-SSC written out pair by pair: for each two of the six neighbours sqrt(2) steps apart, the squared
    difference of the image shifted to either neighbour, averaged over boxes of 2 radius + pooling voxels
    every pooling voxels."""
    six = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    pairs = [(a, b) for a in range(6) for b in range(a + 1, 6)
             if np.sum((np.subtract(six[a], six[b])) ** 2) == 2]
    d, shape = dilation, image.shape[2:]
    padded = F.pad(image, (d,) * 6, mode="replicate")

    def shifted(step):
        return padded[..., d + step[0] * d:d + step[0] * d + shape[0], d + step[1] * d:d + step[1] * d + shape[1],
                      d + step[2] * d:d + step[2] * d + shape[2]]

    distances = torch.cat([(shifted(six[a]) - shifted(six[b])) ** 2 for a, b in pairs], dim=1)
    distances = F.avg_pool3d(F.pad(distances, (radius,) * 6, mode="replicate"), 2 * radius + pooling, stride=pooling)
    distances = distances - distances.min(dim=1, keepdim=True).values
    variance = distances.mean(dim=1, keepdim=True)
    mean = float(variance.mean())
    return torch.exp(-distances / variance.clamp(mean * 1e-3 + 1e-12, mean * 1e3 + 1e-12))


@pytest.mark.parametrize("pooling", [1, 2])
def test_mind_ssc_matches_a_direct_implementation_away_from_the_borders(pooling):
    torch.manual_seed(0)
    image = torch.rand(1, 1, 18, 22, 24)
    ours, direct = (mind(image, radius=1, dilation=2, pooling=pooling) for mind in (mind_ssc, _mind_direct))
    assert ours.shape == (1, 12, 18 // pooling, 22 // pooling, 24 // pooling)
    border = 6 // pooling  # the borders are padded differently
    inner = (..., slice(border, -border), slice(border, -border), slice(border, -border))
    torch.testing.assert_close(ours[inner], direct[inner], rtol=1e-5, atol=1e-6)
    assert float(ours.min()) >= 0 and float(ours.max()) <= 1


@pytest.mark.parametrize("size, stride", [(4, 2), (3, 2), (5, 1), (3, 3)])
def test_strided_box_mean_equals_average_pooling(size, stride):
    volume = torch.rand(2, 3, 13, 16, 11, generator=torch.Generator().manual_seed(size * 10 + stride))
    expected = F.avg_pool3d(volume, size, stride=stride)
    torch.testing.assert_close(_strided_box_mean(volume, size, stride), expected, rtol=1e-5, atol=1e-6)


def test_spatial_gradient_equals_torch_gradient():
    volume = torch.rand(2, 7, 5, 9, generator=torch.Generator().manual_seed(3))
    for ours, reference in zip(spatial_gradient(volume), torch.gradient(volume, dim=(1, 2, 3)), strict=True):
        torch.testing.assert_close(ours, reference)
    with pytest.raises(ValueError, match="at least 2 voxels"):
        spatial_gradient(torch.rand(4, 1, 4))


def test_normal_equation_helpers_equal_their_direct_forms():
    generator = torch.Generator().manual_seed(4)
    gradients = torch.randn(3, 12, 4, 5, 6, generator=generator)
    torch.testing.assert_close(_channel_mean_of_product(gradients[0], gradients[1]),
                               (gradients[0] * gradients[1]).mean(dim=0))
    normal = torch.einsum("icdhw,jcdhw->ijdhw", gradients, gradients) / 12 + 0.1 * torch.eye(3).view(3, 3, 1, 1, 1)
    reference = torch.linalg.inv(normal.permute(2, 3, 4, 0, 1)).permute(3, 4, 0, 1, 2)
    torch.testing.assert_close(_symmetric_inverse(normal), reference, rtol=1e-4, atol=1e-5)


def test_mind_ssc_ignores_the_intensity_scale_and_offset():
    torch.manual_seed(1)
    image = F.avg_pool3d(torch.rand(1, 1, 20, 20, 20), 3, stride=1, padding=1)
    torch.testing.assert_close(mind_ssc(3.0 * image - 0.4), mind_ssc(image), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(mind_ssc(image ** 2), mind_ssc(image), atol=1e-3)  # but not a change of contrast


def _breathing_pair(shift_mm: float):
    """A phantom chest as the moving scan and, as the fixed scan, that chest sampled at p + u(p) for a smooth
    field u of at most ``shift_mm`` (craniocaudal, largest at the lung bases): the fixed point p corresponds to
    the moving point p + u(p). Returns the fixed and moving images and u (LPS mm, on their grid)."""
    moving = chest_phantom(make_grid((96, 80, 64), (2.5, 2.5, 3.0)), seed=3)
    z = np.linspace(1.0, 0.0, moving.GetSize()[2])[:, None, None] ** 2
    y = np.linspace(-1.0, 1.0, moving.GetSize()[1])[None, :, None]
    x = np.linspace(-1.0, 1.0, moving.GetSize()[0])[None, None, :]
    vectors = np.zeros((*moving.GetSize()[::-1], 3))
    vectors[..., 2] = shift_mm * z * np.exp(-(x ** 2 + y ** 2))
    field = sitk.GetImageFromArray(vectors, isVector=True)
    field.CopyInformation(moving)
    fixed = sitk.Resample(moving, moving, sitk.DisplacementFieldTransform(sitk.Image(field)), sitk.sitkLinear, -1000.0)
    return fixed, moving, field


def test_optimise_recovers_a_known_breathing_field_without_folding():
    fixed, moving, truth = _breathing_pair(shift_mm=6.0)
    grid = network_grid(fixed, PreprocessConfig(grid_shape=(32, 32, 32)))
    start = np.zeros((3, 32, 32, 32), np.float32)
    config = InstanceOptimisationConfig(iterations=4)
    result = optimise(start, grid, fixed, moving, PreprocessConfig(), config)
    assert result.grid.GetSize() == optimisation_grids(grid, config)[0].GetSize()
    assert result.flow.shape == (3, *result.grid.GetSize()[::-1])
    field = voxel_flow_to_field(result.flow, result.grid)
    points = np.array([[x, y, z] for x in (-30.0, 0.0, 30.0) for y in (-20.0, 0.0, 20.0) for z in (-40.0, -20.0)])
    points += np.asarray(fixed.GetOrigin()) + np.asarray(fixed.GetSize()) * fixed.GetSpacing() / 2
    true_moved, found = transform_points(points, truth), transform_points(points, field)
    error_before = np.linalg.norm(true_moved - points, axis=1).mean()
    error_after = np.linalg.norm(found - true_moved, axis=1).mean()
    assert error_before > 2.0 and error_after < 0.3 * error_before
    assert result.folded_percent == 0.0


def test_optimise_starts_from_the_given_field():
    fixed, moving, _ = _breathing_pair(shift_mm=0.0)  # identical scans: nothing to change
    grid = network_grid(fixed, PreprocessConfig(grid_shape=(32, 32, 32)))
    start = np.zeros((3, 32, 32, 32), np.float32)
    start[0] = 0.5  # half a network voxel along z everywhere
    none = optimise(start, grid, fixed, moving, PreprocessConfig(), InstanceOptimisationConfig(iterations=0))
    start_mm = 0.5 * grid.GetSpacing()[2]
    np.testing.assert_allclose(none.flow[0] * none.grid.GetSpacing()[2], start_mm, rtol=1e-5)
    fitted = optimise(start, grid, fixed, moving, PreprocessConfig(), InstanceOptimisationConfig(iterations=4))
    assert np.abs(fitted.flow[0] * fitted.grid.GetSpacing()[2]).mean() < 0.5 * start_mm  # pulled back to 0


def test_folded_percent_counts_cells_with_a_negative_jacobian():
    flow = torch.zeros(1, 3, 6, 6, 6)
    assert folded_percent(flow) == 0.0
    flow[0, 2, :, :, 3:] = -2.0  # columns 3.. jump back past column 2: the cells between fold
    assert folded_percent(flow) == pytest.approx(100.0 / 5)


def test_the_settings_live_with_the_model(tmp_path):
    model, preprocess, _ = untrained_model(PreprocessConfig(grid_shape=(32, 32, 32)))
    stored = InstanceOptimisationConfig(iterations=7, smoothness_weight=0.2)
    path = save_checkpoint(tmp_path / "model.pt", model, preprocess, {METADATA_KEY: stored.to_dict()})
    info = load_model(path)[2]
    assert optimisation_for(info) == stored
    assert optimisation_for(info, iterations=2) == dataclasses.replace(stored, iterations=2)
    assert optimisation_for(info, fast=True) is None
    assert optimisation_for({}) == InstanceOptimisationConfig()  # a model without settings: the defaults
    with pytest.raises(InputError, match="must not be negative"):
        optimisation_for(info, iterations=-1)
    with pytest.raises(ModelError, match="instance optimisation settings are not valid"):
        optimisation_for({METADATA_KEY: {"iterations": 3, "learning_rate": 0.1}})


def test_register_keeps_the_optimised_field_and_says_so():
    fixed, moving, truth = _breathing_pair(shift_mm=6.0)
    model = untrained_model(PreprocessConfig(grid_shape=(32, 32, 32)))  # near-zero flow: the optimisation does it
    fast = register(fixed, moving, model=model, device="cpu", fast=True, affine=False)
    default = register(fixed, moving, model=model, device="cpu", affine=False)
    start = default.kept_stage.removesuffix(" + instance optimisation")
    assert start in ("identity", "network")  # the untrained network's field is about the identity
    assert default.grid.GetSize() == optimisation_grids(network_grid(fixed, model[1], default.fixed_mask),
                                                        InstanceOptimisationConfig())[0].GetSize()
    scores = {score.stage: score.lung_ncc_percent for score in default.stages}
    assert scores[default.kept_stage] > scores[start] and start != default.kept_stage
    points = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint((32.0, 40.0, 10.0)))[None]
    error = {name: float(np.linalg.norm(transform_points(points, result.displacement)
                                        - transform_points(points, truth)))
             for name, result in (("fast", fast), ("default", default))}
    assert error["default"] < 0.3 * error["fast"]


def test_the_optimisation_starts_from_the_stage_kept_not_from_a_network_field_that_was_worse():
    fixed, moving, truth = _breathing_pair(shift_mm=6.0)
    network, preprocess, info = untrained_model(PreprocessConfig(grid_shape=(32, 32, 32)))
    with torch.no_grad():  # a network whose field is wrong everywhere: 4 voxels against the motion
        network.flow.weight.zero_()
        network.flow.bias.copy_(torch.tensor([-4.0, 4.0, -4.0]))
    result = register(fixed, moving, model=(network, preprocess, info), device="cpu", affine=False)
    assert result.kept_stage == "identity + instance optimisation"
    scores = {score.stage: score.lung_ncc_percent for score in result.stages}
    assert scores["network"] < scores["identity"] < scores["identity + instance optimisation"]
    points = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint((32.0, 40.0, 10.0)))[None]
    moved = np.linalg.norm(transform_points(points, truth) - points)
    error = np.linalg.norm(transform_points(points, result.displacement) - transform_points(points, truth))
    assert error < 0.3 * moved


def test_the_optimisation_covers_the_lung_box_whatever_the_network_grid():
    """A canonical network grid larger than the scan: the optimisation still works over the fixed lungs' box
    plus the margin (its cost does not grow with the network grid), and its field is the one kept."""
    fixed, moving, truth = _breathing_pair(shift_mm=6.0)
    canonical = PreprocessConfig(grid_shape=(32, 32, 32), grid_mode="canonical", grid_spacing_mm=10.0)
    result = register(fixed, moving, model=untrained_model(canonical), device="cpu", affine=False)
    assert result.kept_stage.endswith(" + instance optimisation")
    over_lungs = optimisation_grids(lung_box_grid(fixed, canonical, result.fixed_mask), InstanceOptimisationConfig())[0]
    over_network = optimisation_grids(network_grid(fixed, canonical, result.fixed_mask), InstanceOptimisationConfig())[0]
    assert result.grid.GetSize() == over_lungs.GetSize()
    assert np.allclose(result.grid.GetOrigin(), over_lungs.GetOrigin())
    assert np.prod(over_lungs.GetSize()) < 0.5 * np.prod(over_network.GetSize())


def test_the_bundled_weights_carry_their_settings():
    if not DEFAULT_WEIGHTS.is_file():
        pytest.skip(f"no bundled weights at {DEFAULT_WEIGHTS.name}")
    info = load_model(DEFAULT_WEIGHTS)[2]
    assert InstanceOptimisationConfig(**info[METADATA_KEY]) == optimisation_for(info)
    assert optimisation_for(info).iterations > 0


def test_the_last_steps_run_on_the_finer_grid():
    config = InstanceOptimisationConfig(iterations=3, grid_spacing_mm=4.0, refinement_iterations=1,
                                        refinement_grid_spacing_mm=2.5)
    assert config.levels() == [(4.0, 2), (2.5, 1)]
    assert dataclasses.replace(config, iterations=1).levels() == [(2.5, 1)]
    assert dataclasses.replace(config, iterations=0).levels() == []
    assert dataclasses.replace(config, refinement_iterations=0).levels() == [(4.0, 3)]
    with pytest.raises(ValueError, match="refinement_grid_spacing_mm"):
        InstanceOptimisationConfig(refinement_grid_spacing_mm=0.0)


def test_a_field_that_folds_is_fitted_again_with_more_smoothness():
    fixed, moving, _ = _breathing_pair(shift_mm=6.0)
    grid = network_grid(fixed, PreprocessConfig(grid_shape=(32, 32, 32)))
    start = np.zeros((3, 32, 32, 32), np.float32)
    config = InstanceOptimisationConfig(iterations=3, smoothness_weight=0.01, grid_spacing_mm=6.0,
                                        refinement_grid_spacing_mm=1.5)  # its 1.5 mm step folds this pair
    free = optimise(start, grid, fixed, moving, PreprocessConfig(), config)
    guarded = optimise(start, grid, fixed, moving, PreprocessConfig(), config, max_folded_percent=0.1)
    smoother = optimise(start, grid, fixed, moving, PreprocessConfig(),
                        dataclasses.replace(config, smoothness_weight=0.02))
    assert free.folded_percent > 0.1 and free.smoothness_weight == 0.01
    assert guarded.steps == 3 and guarded.smoothness_weight == 0.02 and guarded.folded_percent <= 0.1
    np.testing.assert_array_equal(guarded.flow, smoother.flow)


def test_a_refinement_step_that_still_folds_falls_back_to_the_coarse_steps():
    fixed, moving, _ = _breathing_pair(shift_mm=6.0)
    grid = network_grid(fixed, PreprocessConfig(grid_shape=(32, 32, 32)))
    start = np.zeros((3, 32, 32, 32), np.float32)
    config = InstanceOptimisationConfig(iterations=3, smoothness_weight=0.0025, grid_spacing_mm=8.0,
                                        refinement_grid_spacing_mm=1.5)  # folds at 1.5 mm even with 4x the weight
    guarded = optimise(start, grid, fixed, moving, PreprocessConfig(), config, max_folded_percent=0.1)
    coarse = optimise(start, grid, fixed, moving, PreprocessConfig(),
                      dataclasses.replace(config, iterations=2, refinement_iterations=0, smoothness_weight=0.01))
    assert guarded.steps == 2 and guarded.dropped_folded_percent > 0.1 >= guarded.folded_percent
    assert guarded.smoothness_weight == 0.01  # the last try's
    assert guarded.grid.GetSize() == coarse.grid.GetSize() and guarded.grid.GetSpacing()[0] == pytest.approx(8.0)
    np.testing.assert_array_equal(guarded.flow, coarse.flow)


def test_instance_optimisation_keeps_the_last_step_that_does_not_fold(caplog):
    fixed, moving, _ = _breathing_pair(shift_mm=6.0)
    model = untrained_model(PreprocessConfig(grid_shape=(32, 32, 32)))
    loose = InstanceOptimisationConfig(iterations=6, smoothness_weight=1e-4, grid_spacing_mm=2.0,
                                       refinement_iterations=0)  # barely regularised, on one grid
    grid = network_grid(fixed, model[1])
    start = np.zeros((3, 32, 32, 32), np.float32)
    free = optimise(start, grid, fixed, moving, model[1], loose)
    assert free.steps == 6 and free.folded_percent > 0.1 and free.start_folded_percent == 0.0
    guarded = optimise(start, grid, fixed, moving, model[1], loose, max_folded_percent=0.1)
    final = dataclasses.replace(loose, smoothness_weight=loose.smoothness_weight * 2 ** FOLDING_RETRIES)  # last try
    assert guarded.steps < 6 and guarded.folded_percent <= 0.1 and guarded.smoothness_weight == final.smoothness_weight
    assert guarded.dropped_folded_percent == optimise(start, grid, fixed, moving, model[1], final).folded_percent
    later = [optimise(start, grid, fixed, moving, model[1], dataclasses.replace(final, iterations=steps))
             for steps in range(guarded.steps, 6)]
    np.testing.assert_array_equal(guarded.flow, later[0].flow)  # its steps, as a shorter run makes them
    assert all(run.folded_percent > 0.1 for run in later[1:])  # and no later step folds less
    result = register(fixed, moving, model=model, device="cpu", affine=False, optimisation=loose)
    messages = [record.getMessage() for record in caplog.records]
    assert any(message.startswith("instance optimisation: its field after 6 steps folded") for message in messages)
    assert result.metrics(fixed, moving)["jacobian"]["folding_percent"] <= 0.1