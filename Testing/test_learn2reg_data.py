"""Finding pairs in the Learn2Reg layout and in pairs CSVs, and loading them onto the network grid."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import shared_data

from LungUDRNetLib.errors import InputError
from LungUDRNetLib.preprocess import PreprocessConfig
from LungUDRNetLib.warp import warp
from LungUDRNetLib.pairs_csv import read_points_lps
from LungUDRNetTrainerLib.datasets import load_learn2reg, load_pairs_csv, load_splits
from LungUDRNetTrainerLib.pair_dataset import PairDataset, random_smooth_flow
from LungUDRNetTrainerLib.toydata import write_toy_learn2reg

SMALL_GRID = PreprocessConfig(grid_shape=(16, 16, 16), grid_mode="fit")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_learn2reg(tmp_path_factory.mktemp("toy"), cases=4, val_cases=1, size=(20, 18, 16))


def _rewrite_json(root, **changes):
    path = root / "Toy_dataset.json"
    info = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in info.items() if v is not None}))


def test_registration_val_pairs_are_held_out_and_companions_found(toy):
    splits = load_learn2reg(toy)
    assert [p.name for p in splits["train"]] == ["Toy_0001", "Toy_0002", "Toy_0003"]
    assert [p.name for p in splits["val"]] == ["Toy_0004"]
    assert splits["test"] == []
    pair = splits["train"][0]
    # The challenge's direction: fixed = _0000 (inspiration), moving = _0001 (expiration).
    assert pair.fixed.name == "Toy_0001_0000.nii.gz" and pair.moving.name == "Toy_0001_0001.nii.gz"
    assert pair.fixed_mask == toy / "masksTr" / "Toy_0001_0000.nii.gz"
    assert pair.points == {"keypoints": (toy / "keypointsTr" / "Toy_0001_0000.csv",
                                         toy / "keypointsTr" / "Toy_0001_0001.csv")}


def test_listed_training_pairs_win_and_without_validation_pairs_some_are_held_out(tmp_path):
    root = write_toy_learn2reg(tmp_path, cases=4, val_cases=1, size=(20, 18, 16))
    listed = [{"fixed": "./imagesTr/Toy_0002_0001.nii.gz", "moving": "./imagesTr/Toy_0002_0000.nii.gz"},
              {"fixed": "./imagesTr/Toy_0003_0000.nii.gz", "moving": "./imagesTr/Toy_0003_0001.nii.gz"}]
    _rewrite_json(root, training_paired_images=listed, registration_val=None)
    splits = load_learn2reg(root, val_fraction=0.5)
    assert [(p.fixed.name, p.moving.name) for p in splits["train"]] == [("Toy_0002_0001.nii.gz", "Toy_0002_0000.nii.gz")]
    assert [p.name for p in splits["val"]] == ["Toy_0003"]

    (root / "Toy_dataset.json").unlink()  # no JSON at all: imagesTr is paired by case name
    splits = load_learn2reg(root, val_fraction=0.25)
    assert [p.name for p in splits["train"]] == ["Toy_0001", "Toy_0002", "Toy_0003"]
    assert [p.name for p in splits["val"]] == ["Toy_0004"]


def test_missing_files_are_named(tmp_path):
    root = write_toy_learn2reg(tmp_path, cases=2, val_cases=1, size=(20, 18, 16))
    (root / "imagesTr" / "Toy_0002_0001.nii.gz").unlink()
    with pytest.raises(InputError, match=r"val pair Toy_0002: moving image .*Toy_0002_0001.nii.gz not found"):
        load_splits(data=root)
    _rewrite_json(root, registration_test=[{"fixed": "./imagesTs/Toy_0003_0000.nii.gz",
                                            "moving": "./imagesTs/Toy_0003_0001.nii.gz"}],
                  registration_val=[{"fixed": "./imagesTr/Toy_0001_0000.nii.gz",
                                     "moving": "./imagesTr/Toy_0001_0001.nii.gz"}])
    shutil.copy(root / "imagesTr" / "Toy_0002_0000.nii.gz", root / "imagesTr" / "Toy_0002_0001.nii.gz")
    assert [p.name for p in load_splits(data=root)["test"]] == ["Toy_0003"]  # test images not needed to train
    with pytest.raises(InputError, match=r"test pair Toy_0003: fixed image .*imagesTs"):
        load_splits(data=root, needed=("test",))
    with pytest.raises(InputError, match="folder not found"):
        load_learn2reg(tmp_path / "absent")


def test_pairs_csv_with_header_relative_paths_and_splits(toy, tmp_path):
    images = os.path.relpath(toy / "imagesTr", tmp_path)
    masks = os.path.relpath(toy / "masksTr", tmp_path)
    points = os.path.relpath(toy / "keypointsTr", tmp_path)
    lines = ["fixed,moving,fixed_mask,moving_mask,fixed_points,moving_points,split"]
    for case, split in ((1, "train"), (2, "train"), (3, "val"), (4, "test")):
        stem = f"Toy_{case:04d}"
        lines.append(f"{images}/{stem}_0000.nii.gz,{images}/{stem}_0001.nii.gz,{masks}/{stem}_0000.nii.gz,"
                     f"{masks}/{stem}_0001.nii.gz,{points}/{stem}_0000.csv,{points}/{stem}_0001.csv,{split}")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    splits = load_pairs_csv(tmp_path / "pairs.csv")
    assert {k: [p.name for p in v] for k, v in splits.items()} == {
        "train": ["Toy_0001", "Toy_0002"], "val": ["Toy_0003"], "test": ["Toy_0004"]}
    assert splits["val"][0].fixed_mask.samefile(toy / "masksTr" / "Toy_0003_0000.nii.gz")
    assert set(splits["val"][0].points) == {"points"}

    # No header, images only, no split column: the last pair becomes the validation pair.
    (tmp_path / "plain.csv").write_text("".join(f"{images}/Toy_{c:04d}_0000.nii.gz,{images}/Toy_{c:04d}_0001.nii.gz\n"
                                                for c in (1, 2, 3)))
    splits = load_pairs_csv(tmp_path / "plain.csv")
    assert [p.name for p in splits["train"]] == ["Toy_0001", "Toy_0002"] and [p.name for p in splits["val"]] == ["Toy_0003"]
    assert splits["train"][0].fixed_mask is None and splits["train"][0].points == {}

    (tmp_path / "bad.csv").write_text("fixed,moving,weight\na.nii.gz,b.nii.gz,1\n")
    with pytest.raises(InputError, match="unknown columns"):
        load_pairs_csv(tmp_path / "bad.csv")


def test_items_are_normalised_on_the_grid_and_synthetic_pairs_are_reproducible(toy):
    pairs = load_learn2reg(toy)["train"]
    dataset = PairDataset(pairs, SMALL_GRID, masks=True, extra_pairs=1, amplitude=2.0, seed=3)
    assert len(dataset) == 2 * len(pairs)
    real = dataset[0]
    assert real["fixed"].shape == real["moving"].shape == real["fixed_mask"].shape == (1, 16, 16, 16)
    assert real["fixed"].min() == 0 and real["fixed"].max() == 1 and bool(real["has_masks"])
    assert set(np.unique(real["moving_mask"].numpy())) == {0.0, 1.0}

    synthetic = dataset[len(pairs)]  # built from pair 0's fixed image
    torch.testing.assert_close(synthetic["fixed"], real["fixed"])
    assert not torch.equal(synthetic["moving"], real["fixed"])
    flow = random_smooth_flow((16, 16, 16), 2.0, np.random.default_rng([3, 0, len(pairs)]))
    torch.testing.assert_close(synthetic["moving"], warp(real["fixed"][None], flow)[0])
    torch.testing.assert_close(dataset[len(pairs)]["moving"], synthetic["moving"])
    dataset.set_epoch(1)
    assert not torch.equal(dataset[len(pairs)]["moving"], synthetic["moving"])


# -- the real Learn2Reg LungCT files (masks, keypoints, landmarks, evaluation config) ------------

def _learn2reg_folder_with_real_files(tmp_path):
    """The shared LungCT files linked into a Learn2Reg folder, with stand-in CTs made from the masks
    (the real CTs are not available here): lungs -850 HU, elsewhere 40 HU, same geometry."""
    source = shared_data("learn2reg_lungct")
    for folder in ("masksTr", "keypointsTr", "landmarksTr"):
        (tmp_path / folder).symlink_to(source / folder, target_is_directory=True)
    (tmp_path / "LungCT_VAL_evaluation_config.json").symlink_to(source / "LungCT_VAL_evaluation_config.json")
    (tmp_path / "imagesTr").mkdir()
    for mask_file in sorted((source / "masksTr").glob("*.nii.gz")):
        mask = sitk.ReadImage(str(mask_file))
        ct = sitk.GetImageFromArray(np.where(sitk.GetArrayViewFromImage(mask) > 0, -850, 40).astype(np.int16))
        ct.CopyInformation(mask)
        sitk.WriteImage(ct, str(tmp_path / "imagesTr" / mask_file.name))
    return tmp_path, json.loads((source / "LungCT_VAL_evaluation_config.json").read_text())


def test_reads_the_real_learn2reg_masks_points_and_evaluation_pairs(tmp_path):
    root, evaluation = _learn2reg_folder_with_real_files(tmp_path)
    splits = load_learn2reg(root)
    assert [p.name for p in splits["val"]] == ["LungCT_0001", "LungCT_0002", "LungCT_0003"]
    assert [(p.fixed.name, p.moving.name) for p in splits["val"]] == [
        (e["fixed"].split("/")[-1], e["moving"].split("/")[-1]) for e in evaluation["eval_pairs"]]
    assert splits["train"] == []  # every available case is an evaluation pair
    for pair in splits["val"]:
        assert set(pair.points) == {"keypoints", "landmarks"}
        for side, image_file, mask_file in ((0, pair.fixed, pair.fixed_mask), (1, pair.moving, pair.moving_mask)):
            mask = sitk.ReadImage(str(mask_file))
            assert list(mask.GetSize()) == evaluation["expected_shape"][:3]  # x, y, z = 192, 192, 208
            lung = sitk.GetArrayViewFromImage(mask) > 0
            for kind in ("keypoints", "landmarks"):
                points = read_points_lps(pair.points[kind][side], sitk.ReadImage(str(image_file)))
                # Voxel x, y, z through the image geometry: the points lie in the lungs.
                index = np.array([mask.TransformPhysicalPointToIndex(tuple(p)) for p in points])
                inside = lung[index[:, 2], index[:, 1], index[:, 0]].mean()
                assert inside > 0.9, (pair.name, kind, side, inside)
        fixed_count = len(read_points_lps(pair.points["landmarks"][0], sitk.ReadImage(str(pair.fixed_mask))))
        assert fixed_count == len(read_points_lps(pair.points["landmarks"][1], sitk.ReadImage(str(pair.moving_mask))))


def test_the_paper_crop_takes_the_central_192_slices_of_the_real_masks(tmp_path):
    root, _ = _learn2reg_folder_with_real_files(tmp_path)
    pair = load_learn2reg(root)["val"][0]
    item = PairDataset([pair], PreprocessConfig(grid_shape=(192, 192, 192), grid_mode="crop"), masks=True)[0]
    assert item["fixed"].shape == (1, 192, 192, 192)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(pair.fixed_mask)))  # (z, y, x) = (208, 192, 192)
    np.testing.assert_array_equal(item["fixed_mask"][0].numpy(), mask[8:200] > 0)
