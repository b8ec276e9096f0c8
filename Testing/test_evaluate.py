"""``lungudrnet evaluate``: per-pair tables, the paper's Tables 1-3 and the TRE definition."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LungUDRNetLib import cli, metrics
from LungUDRNetLib.checkpoint import load_model, save_checkpoint
from LungUDRNetLib.comparison_nets import ComparisonNet, ComparisonNetConfig
from LungUDRNetLib.geometry import field_to_voxel_flow
from LungUDRNetLib.model import UDRNet, UDRNetConfig
from LungUDRNetLib.preprocess import PreprocessConfig
from LungUDRNetLib.registration import register
from LungUDRNetTrainerLib.datasets import load_learn2reg
from LungUDRNetTrainerLib.evaluate import best_pairs_mean, evaluate_pair
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


def _tables(printed: str) -> dict[str, list[list[str]]]:
    """The printed Markdown tables by title line ("Table 1: ..."), each as rows of cells (header first)."""
    tables, title = {}, None
    for line in printed.splitlines():
        if line.startswith("Table "):
            title = line.split(":")[0]
            tables[title] = []
        elif line.startswith("| ") and title:
            tables[title].append([cell.strip() for cell in line.strip("|").split(" | ")])
    return tables


def test_checkpoints_give_per_pair_tables_and_the_papers_three_tables(toy, tmp_path, capsys):
    udrnet = _checkpoint(tmp_path / "udrnet.pt", attention=True, flow_voxels=(0.5, 0.0, 0.0))
    baseline = _checkpoint(tmp_path / "voxelmorph.pt", attention=False)
    torch.manual_seed(0)
    attunet = save_checkpoint(tmp_path / "attunet.pt", ComparisonNet(ComparisonNetConfig("attunet", **TINY)),
                              PreprocessConfig(grid_shape=(32, 32, 32), grid_mode="fit"))
    out = tmp_path / "evaluation"
    assert cli.main(["evaluate", "--model", str(udrnet), "--model", str(baseline), "--model", str(attunet),
                     "--data", str(toy), "--out", str(out)]) == 0
    tables = _tables(capsys.readouterr().out)
    assert list(tables) == ["Table 1", "Table 2", "Table 3"]
    header, *body = tables["Table 1"]
    assert header[:7] == ["Method", "1-MSE (%)", "NCC (%)", "Dice (%)", "TRE keypoints (mm)", "SDlogJ", "Folded (%)"]
    assert header[-1].startswith("Paper: 1-MSE / NCC / Dice")
    # the paper's row order, each with the paper's own figures beside ours
    assert [(row[0], row[-1]) for row in body] == [
        ("Before registration (identity)", "-"), ("3D AttUNet", "88.91 / 89.72 / 54.13"),
        ("3D VoxelMorph", "89.72 / 91.36 / 54.67"), ("UDRNet (3D VoxelMorph + scHAF)", "89.90 / 91.49 / 54.92")]
    assert " ± " in body[1][1]
    assert [row[-1] for row in tables["Table 2"][1:]] == [
        "-", "90.86 / 90.54 / 58.34", "91.65 / 92.04 / 58.99", "91.82 / 92.27 / 59.27"]
    assert [row[0] for row in tables["Table 3"][1:]] == [
        "Before registration (identity)", "3D VoxelMorph", "UDRNet (3D VoxelMorph + scHAF)"]
    assert tables["Table 3"][1] == tables["Table 1"][1]  # one identity row in every table

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
    udrnet_row = next(row for row in body if row[0].startswith("UDRNet"))
    assert udrnet_row[2] == f"{np.mean(values):.2f} ± {np.std(values):.2f}"
    report = (out / "evaluation.md").read_text(encoding="utf-8")
    assert "## UDRNet (3D VoxelMorph + scHAF): per pair" in report and "| Toy_0003 |" in report
    assert "## 3D AttUNet: per pair" in report

    assert cli.main(["evaluate", "--model", str(udrnet), "--data", str(toy), "--out", str(out)]) == 3
    assert "already exists" in capsys.readouterr().err


def test_without_both_ablation_models_there_is_no_table_3(toy, tmp_path, capsys):
    assert cli.main(["evaluate", "--model", str(_checkpoint(tmp_path / "udrnet.pt", attention=True)),
                     "--data", str(toy), "--out", str(tmp_path / "evaluation")]) == 0
    assert list(_tables(capsys.readouterr().out)) == ["Table 1", "Table 2"]


def test_table_2_ranks_each_metric_on_its_own():
    # seven pairs; the pair best in NCC is the worst in TRE, so one ranking for all columns would differ
    ncc = [90.0, 80.0, 85.0, 70.0, 95.0, 60.0, 75.0]
    tre = [3.0, 1.0, 2.0, 4.0, 9.0, 0.5, 7.0]
    rows = [{"pair": f"p{i}", "after_ncc_percent": n, "after_tre_points_mm": t, "seconds": 1.0 + i}
            for i, (n, t) in enumerate(zip(ncc, tre))]
    best = best_pairs_mean(rows)
    assert best["after_ncc_percent"] == pytest.approx(np.mean([95, 90, 85, 80, 75]))
    assert best["after_tre_points_mm"] == pytest.approx(np.mean([0.5, 1, 2, 3, 4]))
    assert "seconds" not in best  # not a metric of the tables
    assert best_pairs_mean(rows[:2])["after_ncc_percent"] == pytest.approx(85.0)  # fewer pairs than five: all


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
                      fast=True, never_worse=False)  # the network as it is, as evaluate measures it
    flow_xyz = field_to_voxel_flow(result.displacement)[::-1].transpose(0, 3, 2, 1)  # (x, y, z components, X, Y, Z)
    assert np.abs(flow_xyz).max() > 0.3  # the field really moves the points
    after = metrics.learn2reg_tre(fixed_voxels, moving_voxels, flow_xyz, spacing).mean()
    assert row["after_tre_keypoints_mm"] == pytest.approx(after, rel=1e-4)
    assert row["after_tre_keypoints_mm"] != pytest.approx(before, rel=1e-3)
