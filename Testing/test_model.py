"""UDRNet, scHAF and the VoxelMorph baseline: shapes, initial output, and learning."""

from __future__ import annotations

import pytest
import torch

from LungUDRNetLib.model import SCHAF, UDRNet, UDRNetConfig

SMALL = dict(encoder_channels=(4, 8, 8), bottleneck_channels=8, decoder_channels=(8, 8, 4))


@pytest.mark.parametrize("attention", [True, False])
@pytest.mark.parametrize("shape", [(16, 16, 16), (17, 19, 23), (24, 20, 18)])
def test_output_is_a_three_channel_field_of_the_input_size(attention, shape):
    model = UDRNet(UDRNetConfig(attention=attention, **SMALL))
    moving, fixed = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
    flow = model(moving, fixed)
    assert flow.shape == (2, 3, *shape)
    assert flow.abs().max() < 1e-3  # near-zero initial head: training starts from the identity


def test_baseline_has_identity_skips_and_schaf_adds_parameters():
    plain = UDRNet(UDRNetConfig(attention=False, **SMALL))
    attended = UDRNet(UDRNetConfig(attention=True, **SMALL))
    assert all(isinstance(skip, torch.nn.Identity) for skip in plain.skips)
    assert all(isinstance(skip, SCHAF) for skip in attended.skips)
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(attended) > count(plain)


def test_schaf_follows_the_paper_equation():
    """Recompute Eq. 4 by hand from the module's own weights."""
    torch.manual_seed(0)
    module = SCHAF(6, reduction=3)
    feature = torch.randn(2, 6, 5, 4, 3)
    spatial = feature * torch.sigmoid(module.voxel_gate(feature))
    pooled = torch.cat([feature.flatten(2).max(dim=2).values, feature.flatten(2).mean(dim=2)], dim=1)
    hidden = torch.relu(pooled @ module.channel_mlp[0].weight.T + module.channel_mlp[0].bias)
    weights = torch.sigmoid(hidden @ module.channel_mlp[2].weight.T + module.channel_mlp[2].bias)
    channel = feature * weights[:, :, None, None, None]
    fused = torch.cat([spatial * channel, spatial + channel, torch.maximum(spatial, channel)], dim=1)
    expected = torch.nn.functional.conv3d(fused, module.fuse.weight, module.fuse.bias, padding=1)
    assert module.channel_mlp[0].in_features == 12 and module.channel_mlp[0].out_features == 4
    torch.testing.assert_close(module(feature), expected)


def test_diffeomorphic_variant_integrates_the_velocity():
    model = UDRNet(UDRNetConfig(integration_steps=5, **SMALL))
    with torch.no_grad():
        model.flow.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
        model.flow.weight.zero_()
    flow = model(torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16))
    # A constant velocity integrates to the same constant displacement.
    torch.testing.assert_close(flow[0, :, 8, 8, 8], torch.tensor([0.5, -1.0, 2.0]), atol=1e-4, rtol=0)
