"""Warping, integration and the training losses against hand-made cases."""

from __future__ import annotations

import torch

from LungUDRNetLib import losses
from LungUDRNetLib.warp import SpatialTransformer, integrate_velocity, warp


def test_zero_flow_is_identity():
    image = torch.rand(2, 1, 7, 8, 9)
    torch.testing.assert_close(warp(image, torch.zeros(2, 3, 7, 8, 9)), image, atol=1e-6, rtol=0)


def test_integer_translation_recovers_the_fixed_image():
    fixed = torch.rand(1, 1, 12, 10, 14)
    moving = torch.roll(fixed, shifts=(2, -1, 3), dims=(2, 3, 4))  # moving(x) = fixed(x - t)
    flow = torch.tensor([2.0, -1.0, 3.0]).view(1, 3, 1, 1, 1).expand(1, 3, 12, 10, 14)
    warped = warp(moving, flow)
    torch.testing.assert_close(warped[..., 2:-2, 1:-1, 3:-3], fixed[..., 2:-2, 1:-1, 3:-3], atol=1e-5, rtol=0)


def test_nearest_mode_keeps_labels():
    labels = torch.randint(0, 4, (1, 1, 8, 8, 8)).float()
    flow = 0.3 * torch.randn(1, 3, 8, 8, 8)
    warped = SpatialTransformer(mode="nearest")(labels, flow)
    assert set(warped.unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}


def test_half_voxel_shift_interpolates_linearly():
    ramp = torch.arange(10, dtype=torch.float32).view(1, 1, 1, 1, 10).expand(1, 1, 3, 3, 10).contiguous()
    flow = torch.zeros(1, 3, 3, 3, 10)
    flow[:, 2] = 0.5
    torch.testing.assert_close(warp(ramp, flow)[0, 0, 1, 1, :-1], torch.arange(9) + 0.5)


def test_scaling_and_squaring_of_zero_is_zero_and_of_constant_is_constant():
    assert integrate_velocity(torch.zeros(1, 3, 6, 6, 6)).abs().max() == 0
    constant = torch.full((1, 3, 6, 6, 6), 0.8)
    torch.testing.assert_close(integrate_velocity(constant)[..., 2:-2, 2:-2, 2:-2],
                               constant[..., 2:-2, 2:-2, 2:-2], atol=1e-5, rtol=0)


def test_similarity_losses_are_minimal_for_identical_images():
    a = torch.rand(1, 1, 12, 12, 12)
    b = torch.rand(1, 1, 12, 12, 12)
    assert losses.mse(a, a) == 0
    torch.testing.assert_close(losses.global_ncc(a, 2 * a + 1), torch.tensor(-1.0), atol=1e-4, rtol=0)
    assert losses.global_ncc(a, b) > -0.2
    assert losses.local_ncc(a, a) < losses.local_ncc(a, b)
    torch.testing.assert_close(losses.mse(torch.zeros(1, 1, 2, 2, 2), torch.ones(1, 1, 2, 2, 2)), torch.tensor(1.0))


def test_box_mean_equals_a_brute_force_window_sum():
    x = torch.rand(1, 1, 9, 10, 11)
    kernel = torch.ones(1, 1, 5, 5, 5) / 125.0
    expected = torch.nn.functional.conv3d(x, kernel, padding=2)
    torch.testing.assert_close(losses.box_mean(x, 5), expected, atol=1e-6, rtol=1e-5)


def test_local_ncc_of_a_scaled_copy_is_minus_one():
    a = torch.rand(1, 1, 12, 12, 12)
    assert losses.local_ncc(a, 3 * a, window=5, eps=1e-9) < -0.999  # zero padding scales like a


def test_smoothness_of_a_linear_ramp_field():
    flow = torch.zeros(1, 3, 5, 5, 5)
    flow[:, 0] = torch.arange(5, dtype=torch.float32).view(5, 1, 1) * 0.5  # du_z/dz = 0.5
    # Squared z-differences are 0.25 for component 0 and 0 for the other two (mean 0.25 / 3);
    # y- and x-differences are all 0; the three axes are averaged: (0.25 / 3) / 3.
    expected = (0.25 / 3) / 3
    torch.testing.assert_close(losses.gradient_smoothness(flow), torch.tensor(expected))
    assert losses.gradient_smoothness(torch.ones(1, 3, 5, 5, 5)) == 0


def test_jacobian_and_folding_penalty():
    flow = torch.zeros(1, 3, 6, 6, 6)
    flow[:, 1] = torch.arange(6, dtype=torch.float32).view(1, 6, 1) * 0.5  # stretch 1.5 along H
    torch.testing.assert_close(losses.jacobian_determinant(flow), torch.full((1, 5, 5, 5), 1.5))
    assert losses.folding_penalty(flow) == 0
    flow[:, 1] = -torch.arange(6, dtype=torch.float32).view(1, 6, 1) * 2.0  # det = -1: folded
    torch.testing.assert_close(losses.folding_penalty(flow), torch.tensor(1.0))


def test_registration_loss_weights_terms():
    fixed, warped = torch.rand(1, 1, 10, 10, 10), torch.rand(1, 1, 10, 10, 10)
    flow = torch.randn(1, 3, 10, 10, 10)
    terms = losses.registration_loss(fixed, warped, flow, similarity="mse", smoothness_weight=2.0, folding_weight=3.0)
    torch.testing.assert_close(terms["total"], terms["similarity"] + 2 * terms["smoothness"] + 3 * terms["folding"])
