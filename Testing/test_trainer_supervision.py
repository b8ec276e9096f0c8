"""The trainer's optional supervised term (a pair's known displacement) and fine-tuning from given weights."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LungUDRNetLib.checkpoint import load_model
from LungUDRNetLib.errors import InputError, ModelError
from LungUDRNetLib.io import read_image, write_displacement_field
from LungUDRNetLib.losses import supervised_flow_error
from LungUDRNetLib.preprocess import PreprocessConfig
from LungUDRNetTrainerLib.config import resolve_config
from LungUDRNetTrainerLib.datasets import load_pairs_csv
from LungUDRNetTrainerLib.pair_dataset import PairDataset
from LungUDRNetTrainerLib.training import train

from conftest import smoke

pytestmark = pytest.mark.usefixtures("one_thread")

CONSTANT_MM = (3.0, -2.0, 4.0)  # LPS x, y, z


def constant_field(reference: sitk.Image, vector_mm) -> sitk.Image:
    """A field (LPS mm) on ``reference``'s grid with the same vector everywhere."""
    values = np.broadcast_to(np.asarray(vector_mm, dtype=np.float64), (*reference.GetSize()[::-1], 3)).copy()
    field = sitk.GetImageFromArray(values, isVector=True)
    field.CopyInformation(reference)
    return field


def pairs_csv(toy, folder, vector_mm=CONSTANT_MM, cases=(1, 2, 3, 4, 5), val=(5,)) -> str:
    """A pairs CSV of the toy pairs whose ``true_displacement`` is a constant field; the last case has none."""
    rows = []
    for case in cases:
        fixed, moving = (toy / "imagesTr" / f"Toy_{case:04d}_{phase:04d}.nii.gz" for phase in (0, 1))
        truth = ""
        if case != cases[-1]:
            truth = folder / f"truth_{case}.nii.gz"
            write_displacement_field(constant_field(read_image(fixed), vector_mm), truth)
        rows.append({"fixed": fixed, "moving": moving, "split": "val" if case in val else "train",
                     "true_displacement": truth})
    path = folder / "pairs.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["fixed", "moving", "split", "true_displacement"])
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def test_supervised_error_counts_only_pairs_with_a_known_field():
    flow = torch.zeros((2, 3, 4, 4, 4))
    truth = torch.ones((2, 3, 4, 4, 4))
    truth[1] = 5.0
    assert supervised_flow_error(flow, truth, torch.tensor([True, False])).item() == pytest.approx(1.0)
    assert supervised_flow_error(flow, truth, torch.tensor([True, True])).item() == pytest.approx(13.0)
    assert supervised_flow_error(flow, truth, torch.tensor([False, False])).item() == 0.0


def test_known_field_reaches_the_canonical_grid_as_voxels_in_network_axis_order(toy, tmp_path):
    """The toy images are stored with x and y reversed; the canonical grid is patient-aligned at 8 mm."""
    splits = load_pairs_csv(pairs_csv(toy, tmp_path))
    config = PreprocessConfig(grid_shape=(16, 16, 16), grid_mode="canonical", grid_spacing_mm=8.0)
    items = PairDataset(splits["train"] + splits["val"], config, truth=True)
    with_truth, without = items[0], items[len(items) - 1]
    expected = np.array(CONSTANT_MM[::-1]) / 8.0  # (z, y, x) voxels of 8 mm
    assert bool(with_truth["has_truth"]) and not bool(without["has_truth"])
    np.testing.assert_allclose(with_truth["true_flow"].mean(dim=(1, 2, 3)).numpy(), expected, atol=1e-5)
    assert float(with_truth["true_flow"].std(dim=(1, 2, 3)).max()) < 1e-5
    assert float(without["true_flow"].abs().max()) == 0.0


def test_spacing_jitter_resamples_each_item_at_its_own_drawn_spacing(toy, tmp_path):
    """Scale augmentation: the grid keeps its shape, the spacing of each item and epoch is drawn within
    [8 / 1.5, 8 * 1.5] mm, and the known field (mm) reaches the grid in voxels of that spacing."""
    splits = load_pairs_csv(pairs_csv(toy, tmp_path))
    config = PreprocessConfig(grid_shape=(16, 16, 16), grid_mode="canonical", grid_spacing_mm=8.0)
    items = PairDataset(splits["train"], config, truth=True, spacing_jitter=0.5, seed=3)
    spacings = []
    for epoch in (0, 1):
        items.set_epoch(epoch)
        for index in range(len(items)):
            spacing = items.item_preprocess(index).grid_spacing_mm
            item = items[index]
            assert tuple(item["fixed"].shape) == (1, 16, 16, 16)
            np.testing.assert_allclose(item["true_flow"].mean(dim=(1, 2, 3)).numpy(),
                                       np.array(CONSTANT_MM[::-1]) / spacing, atol=1e-5)
            spacings.append(spacing)
    assert all(8.0 / 1.5 <= spacing <= 8.0 * 1.5 for spacing in spacings)
    assert len(set(np.round(spacings, 6))) == len(spacings)  # a new draw per item and epoch
    items.set_epoch(0)
    assert items.item_preprocess(0).grid_spacing_mm == spacings[0]  # reproducible
    assert PairDataset(splits["train"], config).item_preprocess(0).grid_spacing_mm == 8.0
    with pytest.raises(ValueError, match="canonical"):
        PairDataset(splits["train"], PreprocessConfig(grid_shape=(16, 16, 16), grid_mode="fit"), spacing_jitter=0.5)
    with pytest.raises(InputError, match="spacing_jitter"):
        resolve_config("smoke", overrides={"spacing_jitter": 0.5})
    with pytest.raises(InputError, match="spacing_jitter: must be a finite number"):
        resolve_config("smoke", overrides={"spacing_jitter": float("nan"), "grid_mode": "canonical",
                                           "grid_spacing_mm": 8.0})


def test_supervision_pulls_the_predicted_field_towards_the_known_one(toy, tmp_path):
    """Truth = no motion on pairs that do move: a strong supervised term keeps the flow near zero."""
    pairs = pairs_csv(toy, tmp_path, vector_mm=(0.0, 0.0, 0.0))
    magnitude = {}
    for weight in (0.0, 50.0):
        run = tmp_path / f"weight_{weight}"
        train(resolve_config("smoke", overrides={"pairs": pairs, "epochs": 3, "supervised_weight": weight}), run)
        model, config, _ = load_model(run)
        item = PairDataset(load_pairs_csv(pairs)["val"], config)[0]
        with torch.no_grad():
            magnitude[weight] = float(model(item["moving"][None], item["fixed"][None]).abs().mean())
    assert magnitude[50.0] < 0.5 * magnitude[0.0]


def test_fine_tuning_starts_from_the_given_weights(toy, tmp_path):
    first = train(smoke(toy, epochs=2), tmp_path / "first")
    second = train(smoke(toy, epochs=1, init_weights=str(tmp_path / "first" / "best.pt")), tmp_path / "second")
    assert second.history[0]["val_loss"] == pytest.approx(first.best_val_loss, rel=1e-5)
    scratch = train(smoke(toy, epochs=1), tmp_path / "scratch")
    assert scratch.history[0]["val_loss"] > first.best_val_loss
    with pytest.raises(ModelError, match="architecture differs"):
        train(smoke(toy, epochs=1, encoder_channels=(4, 8, 16), init_weights=str(tmp_path / "first" / "best.pt")),
              tmp_path / "other")


def test_canonical_grid_needs_a_spacing():
    with pytest.raises(InputError, match="grid_spacing_mm"):
        resolve_config("smoke", overrides={"grid_mode": "canonical"})
    assert resolve_config("smoke", overrides={"grid_mode": "canonical", "grid_spacing_mm": 8}).grid_spacing_mm == 8.0
