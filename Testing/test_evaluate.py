"""``lungudrnet evaluate``: per-pair and mean +- std tables, the ablation layout and the TRE definition."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LungUDRNetLib import cli, metrics
from LungUDRNetLib.checkpoint import load_model, save_checkpoint
from LungUDRNetLib.geometry import field_to_voxel_flow
from LungUDRNetLib.model import UDRNet, UDRNetConfig
from LungUDRNetLib.preprocess import PreprocessConfig
from LungUDRNetLib.registration import register
from LungUDRNetTrainerLib.datasets import load_learn2reg
from LungUDRNetTrainerLib.evaluate import evaluate_pair
from LungUDRNetTrainerLib.toydata import write_toy_learn2reg

TINY = dict(encoder_channels=(4, 8, 8), bottleneck_channels=8, decoder_channels=(8, 8, 4))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_learn2reg(tmp_path_factory.mktemp("toy"), cases=3, val_cases=2)


def _checkpoint(path, attention: bool, flow_voxels=(0.0, 0.0, 0.0)):
    """A tiny network whose output is (almost exactly) the constant voxel flow ``flow_voxels`` (D, H, W)."""
    torch.manual_seed(0)
    net = UDRNet(UDRNetConfig(attention=attention, **TINY))
    with torch.no_grad():
        net.flow.bias.copy_(torch.tensor(flow_voxels))
    return save_checkpoint(path, net, PreprocessConfig(grid_shape=(32, 32, 32), grid_mode="fit"))


def _rows(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_two_checkpoints_give_per_pair_tables_and_the_ablation_table(toy, tmp_path, capsys):
    udrnet = _checkpoint(tmp_path / "udrnet.pt", attention=True, flow_voxels=(0.5, 0.0, 0.0))
    baseline = _checkpoint(tmp_path / "voxelmorph.pt", attention=False)
    out = tmp_path / "evaluation"
    assert cli.main(["evaluate", "--model", str(udrnet), "--model", str(baseline), "--data", str(toy),
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| Method | 1-MSE (%) | NCC (%) | Dice (%) | TRE keypoints (mm) | SDlogJ | Folded (%)")
    assert [line.split(" | ")[0] for line in table[1:]] == [
        "| Before registration (identity)", "| 3D VoxelMorph", "| UDRNet (3D VoxelMorph + scHAF)"]
    assert " ± " in table[1]

    pairs = _rows(out / "pairs_udrnet.csv")
    assert [row["pair"] for row in pairs] == ["Toy_0002", "Toy_0003"]
    baseline_pairs = _rows(out / "pairs_voxelmorph.csv")
    for ours, theirs in zip(pairs, baseline_pairs):  # the identity does not depend on the model
        assert ours["before_ncc_percent"] == theirs["before_ncc_percent"]
        assert float(ours["after_tre_keypoints_mm"]) != float(ours["before_tre_keypoints_mm"])
        assert float(theirs["after_folding_percent"]) == 0.0
    summary = {row["method"]: row for row in _rows(out / "summary.csv")}
    values = [float(row["after_ncc_percent"]) for row in pairs]
    assert float(summary["UDRNet (3D VoxelMorph + scHAF)"]["after_ncc_percent_mean"]) == pytest.approx(np.mean(values))
    assert float(summary["UDRNet (3D VoxelMorph + scHAF)"]["after_ncc_percent_std"]) == pytest.approx(np.std(values))
    report = (out / "evaluation.md").read_text()
    assert "## UDRNet (3D VoxelMorph + scHAF): per pair" in report and "| Toy_0003 |" in report

    assert cli.main(["evaluate", "--model", str(udrnet), "--data", str(toy), "--out", str(out)]) == 3
    assert "already exists" in capsys.readouterr().err


def test_tre_is_the_learn2reg_definition_on_a_shared_grid(toy, tmp_path):
    net, preprocess, _ = load_model(_checkpoint(tmp_path / "shift.pt", True, flow_voxels=(1.0, -0.5, 0.7)))
    pair = load_learn2reg(toy)["val"][0]
    row = evaluate_pair(net, preprocess, pair, device="cpu")

    fixed, moving = sitk.ReadImage(str(pair.fixed)), sitk.ReadImage(str(pair.moving))
    fixed_voxels, moving_voxels = (np.loadtxt(p, delimiter=",") for p in pair.points["keypoints"])
    spacing = np.asarray(moving.GetSpacing())
    before = np.linalg.norm((moving_voxels - fixed_voxels) * spacing, axis=1).mean()
    assert row["before_tre_keypoints_mm"] == pytest.approx(before)

    result = register(fixed, moving, model=net, device="cpu", fixed_mask=sitk.ReadImage(str(pair.fixed_mask)),
                      moving_mask=sitk.ReadImage(str(pair.moving_mask)), preprocess=preprocess, affine=False,
                      never_worse=False)  # the network as it is, as evaluate measures it
    flow_xyz = field_to_voxel_flow(result.displacement)[::-1].transpose(0, 3, 2, 1)  # (x, y, z components, X, Y, Z)
    assert np.abs(flow_xyz).max() > 0.3  # the field really moves the points
    after = metrics.learn2reg_tre(fixed_voxels, moving_voxels, flow_xyz, spacing).mean()
    assert row["after_tre_keypoints_mm"] == pytest.approx(after, rel=1e-4)
    assert row["after_tre_keypoints_mm"] != pytest.approx(before, rel=1e-3)
