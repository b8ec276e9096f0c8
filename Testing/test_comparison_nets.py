"""The paper's comparison networks (3D AttUNet, ResUNet, TransUNet) beside UDRNet and VoxelMorph: shapes,
their defining parts, learning, the trainer and the round trip of a checkpoint through ``register``."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LungUDRNetBench.command import add_parser, comparison_checkpoints, selected_methods as bench_methods
from LungUDRNetBench.peers import Options, transunet, udrnet as udrnet_peer
from LungUDRNetLib import cli
from LungUDRNetLib.checkpoint import load_model, read_checkpoint, save_checkpoint
from LungUDRNetLib.comparison_nets import (ARCHITECTURES, AttentionGate, BottleneckTransformer, ComparisonNet,
                                           ComparisonNetConfig, ResidualBlock)
from LungUDRNetLib.errors import InputError, ModelError
from LungUDRNetLib.io import read_displacement_field, read_image
from LungUDRNetLib.losses import registration_loss
from LungUDRNetLib.model import UDRNet
from LungUDRNetLib.networks import config_for, network_from_config, parameter_count
from LungUDRNetLib.preprocess import PreprocessConfig
from LungUDRNetLib.registration import register
from LungUDRNetLib.warp import warp
from LungUDRNetTrainerLib.config import resolve_config
from LungUDRNetTrainerLib.toydata import write_toy_learn2reg
from LungUDRNetTrainerLib.training import train

SMALL = dict(encoder_channels=(4, 8, 8), bottleneck_channels=8, decoder_channels=(8, 8, 4))
MODELS = ("udrnet", "voxelmorph", *ARCHITECTURES)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", [(17, 19, 23), (16, 24, 20)])  # odd and even sizes
def test_every_network_returns_a_field_of_the_input_size(name, shape):
    torch.manual_seed(0)
    network = network_from_config(config_for(name, **SMALL).to_dict())
    flow = network(torch.rand(2, 1, *shape), torch.rand(2, 1, *shape))
    assert flow.shape == (2, 3, *shape)
    assert 0 < flow.abs().max() < 1e-3  # near-zero initial head: training starts from the identity


def test_the_networks_have_the_same_depth_and_comparable_sizes():
    counts = {name: parameter_count(network_from_config(config_for(name, (16, 32, 32, 32), 32, (32, 32, 32, 16))
                                                         .to_dict())) for name in MODELS}
    for name in ARCHITECTURES:
        network = ComparisonNet(ComparisonNetConfig(name))
        assert len(network.encoders) == len(network.decoders) == 4
        # at least the plain VoxelMorph backbone, at most UDRNet (whose scHAF adds the most)
        assert counts["voxelmorph"] <= counts[name] <= counts["udrnet"], name


def test_the_attention_gate_is_the_additive_gate_of_oktay_et_al():
    torch.manual_seed(0)
    gate = AttentionGate(6, 4).requires_grad_(False)
    skip, signal = torch.randn(2, 6, 5, 4, 3), torch.randn(2, 4, 5, 4, 3)
    conv = torch.nn.functional.conv3d
    joint = torch.relu(conv(skip, gate.skip_projection.weight, gate.skip_projection.bias)
                       + conv(signal, gate.signal_projection.weight))
    alpha = torch.sigmoid(conv(joint, gate.weight.weight, gate.weight.bias))
    assert alpha.shape == (2, 1, 5, 4, 3) and 0 < alpha.min().item() and alpha.max().item() < 1
    torch.testing.assert_close(gate(skip, signal), skip * alpha)
    # the decoder's signal steers the weights
    assert not torch.allclose(gate(skip, signal), gate(skip, -signal))


def test_the_attunet_gates_its_skips_with_the_decoder_signal():
    torch.manual_seed(0)
    network = ComparisonNet(ComparisonNetConfig("attunet", **SMALL))
    assert all(isinstance(skip, AttentionGate) for skip in network.skips)
    # skip of the shallowest level (4 channels) is gated by the last decoder level's output (8 channels)
    assert network.skips[0].signal_projection.in_channels == 8 and network.skips[0].skip_projection.in_channels == 4
    seen = {}
    for level, gate in enumerate(network.skips):
        gate.register_forward_hook(lambda module, inputs, output, level=level: seen.__setitem__(level, inputs))
    moving, fixed = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 1, 16, 16, 16)
    network(moving, fixed)
    assert sorted(seen) == [0, 1, 2]
    for level, (skip, signal) in seen.items():  # each gate gets its encoder level's feature and a decoder signal
        assert skip.shape[1] == SMALL["encoder_channels"][level] and skip.shape[2:] == signal.shape[2:]
        assert signal.shape[1] == network.decoders[len(network.decoders) - 1 - level][0].out_channels


def test_the_residual_block_adds_its_shortcut():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 6, 5, 4)
    same, wider = ResidualBlock(4, 4), ResidualBlock(4, 6)
    for block in (same, wider):
        with torch.no_grad():  # without its body, the block is ReLU(shortcut(x))
            block.body[2].weight.zero_()
            block.body[2].bias.zero_()
    torch.testing.assert_close(same(x), torch.relu(x))
    torch.testing.assert_close(wider(x), torch.relu(wider.shortcut(x)))
    network = ComparisonNet(ComparisonNetConfig("resunet", **SMALL))
    assert all(isinstance(block, ResidualBlock) for block in [*network.encoders, *network.decoders, network.head])


def test_the_transformer_bottleneck_relates_distant_voxels():
    torch.manual_seed(0)
    bottleneck = BottleneckTransformer(8, layers=2, heads=4).eval()
    for size in ((3, 4, 5), (2, 2, 2)):  # any grid: the position embedding is resized
        x = torch.randn(1, 8, *size)
        changed = x.clone()
        changed[..., 0, 0, 0] += 5.0 * torch.randn(1, 8)  # not a constant, which layer normalisation removes
        far = (..., size[0] - 1, size[1] - 1, size[2] - 1)
        # a convolution would not see one corner from the other; attention does
        assert (bottleneck(changed)[far] - bottleneck(x)[far]).abs().max() > 1e-3
    network = ComparisonNet(ComparisonNetConfig("transunet", **SMALL))
    assert isinstance(network.bottleneck, BottleneckTransformer)
    with pytest.raises(ValueError, match="do not split into 3 transformer heads"):
        ComparisonNetConfig("transunet", transformer_heads=3, **SMALL)


def _blob(shape, centre, sigma=3.0):
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    return torch.exp(-sum((a - c) ** 2 for a, c in zip(axes, centre)) / (2 * sigma ** 2))[None, None]


@pytest.mark.parametrize("name", MODELS)
def test_training_steps_lower_the_loss_on_a_toy_pair(name):
    torch.manual_seed(0)
    fixed, moving = _blob((16, 16, 16), (8, 8, 8)), _blob((16, 16, 16), (8, 9.5, 7))
    network = network_from_config(config_for(name, **SMALL).to_dict())
    optimiser = torch.optim.Adam(network.parameters(), lr=3e-3)

    def loss():
        flow = network(moving, fixed)
        return registration_loss(fixed, warp(moving, flow), flow, similarity="mse", smoothness_weight=0.01)["total"]

    initial = loss().item()
    for _ in range(30):
        optimiser.zero_grad()
        value = loss()
        value.backward()
        optimiser.step()
    assert loss().item() < 0.5 * initial


@pytest.fixture(scope="module")
def trained_transunet(tmp_path_factory):
    """A 3-epoch smoke run of ``--model transunet`` on the toy Learn2Reg data."""
    toy = write_toy_learn2reg(tmp_path_factory.mktemp("toy"))
    run = tmp_path_factory.mktemp("run")
    config = resolve_config("smoke", overrides={"data": str(toy), "model": "transunet", "epochs": 3})
    return toy, run, train(config, run)


def test_the_trainer_trains_a_comparison_network(trained_transunet):
    _, run, progress = trained_transunet
    assert progress.history[-1]["val_loss"] < progress.history[0]["val_loss"]
    state = read_checkpoint(run / "best.pt")
    assert state["model_config"]["architecture"] == "transunet"
    assert state["metadata"]["name"] == "3D TransUNet" and state["metadata"]["model"] == "transunet"
    network, _, _ = load_model(run)
    assert isinstance(network, ComparisonNet) and isinstance(network.bottleneck, BottleneckTransformer)


def test_a_checkpoint_round_trips_through_register(trained_transunet, tmp_path):
    toy, run, _ = trained_transunet
    fixed_file, moving_file = (toy / "imagesTr" / f"Toy_0006_000{i}.nii.gz" for i in (0, 1))
    out = tmp_path / "result"
    assert cli.main(["register", "--fixed", str(fixed_file), "--moving", str(moving_file), "--model", str(run),
                     "--out", str(out), "--fast", "--no-affine", "--device", "cpu",
                     "--displacement-grid", "fixed"]) == 0
    written = sitk.GetArrayFromImage(read_displacement_field(out / "displacement.nii.gz"))
    # the same network rebuilt in memory from the weights gives the same field
    state = read_checkpoint(run / "best.pt")
    network = ComparisonNet(ComparisonNetConfig.from_dict(state["model_config"]))
    network.load_state_dict(state["state_dict"])
    expected = register(sitk.ReadImage(str(fixed_file)), sitk.ReadImage(str(moving_file)), model=network,
                        preprocess=PreprocessConfig.from_dict(state["preprocess_config"]), device="cpu",
                        fast=True, affine=False)
    assert np.abs(written).max() > 0.1  # the trained network moves the image
    np.testing.assert_allclose(written, sitk.GetArrayFromImage(expected.displacement), atol=1e-3)


def test_a_checkpoint_of_an_unknown_architecture_is_refused(tmp_path):
    network = UDRNet(**SMALL)
    path = save_checkpoint(tmp_path / "odd.pt", network, PreprocessConfig())
    state = torch.load(path, weights_only=True)
    state["model_config"] = {**state["model_config"], "architecture": "swinunet"}
    torch.save(state, path)
    with pytest.raises(ModelError, match="swinunet"):
        load_model(path)


def test_the_trainer_config_names_the_wrong_head_count():
    with pytest.raises(InputError, match="transformer heads"):
        resolve_config("smoke", overrides={"model": "transunet", "encoder_channels": (4, 8, 6),
                                           "decoder_channels": (8, 8, 4)})


def _bench_methods(*flags: str) -> list[str]:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", *flags])
    return bench_methods(args, comparison_checkpoints(args.comparison_weights))


def test_the_bench_runs_the_comparison_networks_it_has_weights_for(trained_transunet, tmp_path):
    _, run, _ = trained_transunet
    assert not set(ARCHITECTURES) & set(_bench_methods())
    methods = _bench_methods("--comparison-weights", str(run / "best.pt"))
    assert "transunet" in methods and "attunet" not in methods
    assert _bench_methods("--methods", "identity,attunet") == ["identity", "attunet"]
    with pytest.raises(InputError, match="a second transunet checkpoint"):
        _bench_methods("--comparison-weights", str(run / "best.pt"), "--comparison-weights", str(run / "last.pt"))
    udrnet = save_checkpoint(tmp_path / "udrnet.pt", UDRNet(**SMALL), PreprocessConfig())
    with pytest.raises(InputError, match="holds udrnet.*--weights"):
        _bench_methods("--comparison-weights", str(udrnet))
    # and the other way round: a comparison network is not taken for UDRNet
    with pytest.raises(ValueError, match="holds 3D TransUNet, not UDRNet.*--comparison-weights"):
        udrnet_peer(None, None, Options(weights=str(run / "best.pt")))


def test_the_bench_peer_is_the_trained_network_alone(trained_transunet):
    toy, run, _ = trained_transunet
    fixed, moving = (read_image(toy / "imagesTr" / f"Toy_0006_000{i}.nii.gz") for i in (0, 1))
    field = transunet(fixed, moving, Options(comparison_weights={"transunet": str(run / "best.pt")})).displacement
    expected = register(fixed, moving, model=load_model(run), device="cpu", fast=True, affine=False,
                        never_worse=False)
    np.testing.assert_allclose(sitk.GetArrayFromImage(field), sitk.GetArrayFromImage(expected.displacement),
                               atol=1e-5)
    # no checkpoint of it: a fresh network, near-zero field
    untrained = transunet(fixed, moving, Options()).displacement
    bundled_widths = load_model(None)[0].config.encoder_channels  # at the widths the udrnet row runs
    assert read_checkpoint(run / "best.pt")["model_config"]["encoder_channels"] != list(bundled_widths)
    assert np.abs(sitk.GetArrayFromImage(untrained)).max() < 0.01 < np.abs(sitk.GetArrayFromImage(field)).max()
