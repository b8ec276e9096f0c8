"""Bad input and faults in the trainer: missing dataset files, mismatched pairs, a NaN loss and a corrupt
checkpoint each give a clear message and a documented error, keep the good checkpoints and never touch
the inputs."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from LungUDRNetLib import cli
from LungUDRNetLib.checkpoint import load_model, read_checkpoint
from LungUDRNetLib.errors import InputError, ModelError, TrainingError
from LungUDRNetLib.io import write_image
from LungUDRNetTrainerLib import training
from LungUDRNetTrainerLib.config import resolve_config
from LungUDRNetTrainerLib.training import PREVIOUS_LAST, train

from conftest import smoke
from robustness_cases import checksums, fixed_phantom, moving_phantom

pytestmark = pytest.mark.usefixtures("one_thread")


def _partial_files(folder: Path) -> list[Path]:
    """Temporary files of interrupted atomic writes under ``folder``."""
    return sorted(folder.rglob("*.part*"))


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(path)["state_dict"]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# --- the dataset ------------------------------------------------------------------------------------

def test_a_dataset_json_listing_missing_files_is_refused_before_training(toy, tmp_path):
    data = shutil.copytree(toy, tmp_path / "data")
    moving = data / "imagesTr" / "Toy_0002_0001.nii.gz"
    mask = data / "masksTr" / "Toy_0005_0000.nii.gz"
    moving.unlink()
    mask.unlink()
    before = checksums(data)
    with pytest.raises(InputError) as caught:
        train(smoke(data), tmp_path / "run")
    message = str(caught.value)
    assert message.startswith(f"dataset {data / 'Toy_dataset.json'}: ")
    assert f"train pair Toy_0002: moving image {moving} not found" in message
    assert f"val pair Toy_0005: fixed mask {mask} not found" in message
    assert message.endswith("restore the files or correct their paths")
    assert not (tmp_path / "run").exists()  # refused before the run folder was made
    assert checksums(data) == before


def test_a_pairs_csv_naming_a_missing_file_is_refused(toy, tmp_path, capsys):
    images = toy / "imagesTr"
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"fixed,moving,split\n{images / 'Toy_0001_0000.nii.gz'},absent.nii.gz,train\n"
                     f"{images / 'Toy_0005_0000.nii.gz'},{images / 'Toy_0005_0001.nii.gz'},val\n")
    before = checksums(toy), pairs.read_bytes()
    code = cli.main(["train", "--preset", "smoke", "--pairs", str(pairs), "--out", str(tmp_path / "run")])
    assert code == InputError.exit_code
    error = capsys.readouterr().err
    assert f"dataset {pairs}: train pair Toy_0001_0000__absent: moving image {tmp_path / 'absent.nii.gz'} " \
           "not found" in error
    assert not (tmp_path / "run").exists()
    assert (checksums(toy), pairs.read_bytes()) == before


def test_a_pair_of_different_size_spacing_direction_and_type_trains(toy, tmp_path):
    """Both images of a pair go through the physical-space pipeline onto one network grid."""
    (tmp_path / "pair").mkdir()
    fixed = write_image(fixed_phantom(), tmp_path / "pair" / "fixed.nrrd")
    moving = write_image(moving_phantom(), tmp_path / "pair" / "moving.mha")
    headers = [sitk.ReadImage(str(path)) for path in (fixed, moving)]
    assert len({(image.GetSize(), image.GetSpacing(), image.GetDirection(), image.GetPixelID())
                for image in headers}) == 2
    images = toy / "imagesTr"
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"fixed,moving,split\n{fixed},{moving},train\n"  # batched with a toy pair of another size
                     f"{images / 'Toy_0001_0000.nii.gz'},{images / 'Toy_0001_0001.nii.gz'},train\n"
                     f"{images / 'Toy_0005_0000.nii.gz'},{images / 'Toy_0005_0001.nii.gz'},val\n")
    before = checksums(tmp_path / "pair"), checksums(toy)

    progress = train(resolve_config("smoke", overrides={"pairs": str(pairs), "epochs": 1}), tmp_path / "run")

    assert [row["epoch"] for row in progress.history] == [0, 1]
    assert math.isfinite(progress.history[1]["train_loss"]) and math.isfinite(progress.history[1]["val_loss"])
    assert all(torch.isfinite(w).all() for w in _weights(tmp_path / "run" / "best.pt").values())
    assert not _partial_files(tmp_path / "run")
    assert (checksums(tmp_path / "pair"), checksums(toy)) == before


# --- a diverging loss -------------------------------------------------------------------------------

def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoints(toy, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    kept = ("last.pt", PREVIOUS_LAST, "best.pt", "log.csv")
    before_nan = {}
    training_steps = 0
    loss = training.registration_loss

    def nan_in_epoch_two(*args, **kwargs):
        """The real loss, NaN in the first training step of epoch 2 (smoke: 2 steps of 2 pairs per epoch)."""
        nonlocal training_steps
        terms = loss(*args, **kwargs)
        training_steps += torch.is_grad_enabled()
        if training_steps == 3 and torch.is_grad_enabled():
            files = checksums(run_dir)
            before_nan.update(files={name: files[name] for name in kept},
                              weights=_weights(run_dir / "last.pt"))
            terms["total"] = terms["total"] * math.nan
        return terms

    inputs = checksums(toy)
    monkeypatch.setattr(training, "registration_loss", nan_in_epoch_two)
    code = cli.main(["train", "--preset", "smoke", "--data", str(toy), "--out", str(run_dir), "--epochs", "3"])

    assert code == TrainingError.exit_code
    error = capsys.readouterr().err
    assert "the loss is not finite (NaN or Inf) in epoch 2, step 1" in error
    assert f"Lower the learning rate (now 0.003), then continue with: lungudrnet train --resume {run_dir} " \
           "--learning-rate 0.0003" in error
    files = checksums(run_dir)
    assert {name: files[name] for name in kept} == before_nan["files"]
    weights = _weights(run_dir / "last.pt")
    assert read_checkpoint(run_dir / "last.pt")["trainer_state"]["progress"]["epoch"] == 1
    for name, value in before_nan["weights"].items():
        assert torch.isfinite(weights[name]).all() and torch.equal(weights[name], value), name
    model = load_model(run_dir / "best.pt")[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not _partial_files(run_dir)
    assert checksums(toy) == inputs

    monkeypatch.undo()  # the advice works: resume with a lower learning rate
    assert cli.main(["train", "--resume", str(run_dir), "--epochs", "2", "--learning-rate", "0.0003"]) == 0
    assert read_checkpoint(run_dir / "last.pt")["trainer_state"]["progress"]["epoch"] == 2


# --- a corrupt checkpoint ---------------------------------------------------------------------------

def test_resume_from_a_truncated_last_pt_falls_back_to_the_previous_one(toy, tmp_path, caplog):
    run_dir = tmp_path / "run"
    train(smoke(toy, epochs=2), run_dir)
    finished = _weights(run_dir / "last.pt")
    assert read_checkpoint(run_dir / PREVIOUS_LAST)["trainer_state"]["progress"]["epoch"] == 1
    _truncate(run_dir / "last.pt")
    inputs = checksums(toy)

    with caplog.at_level(logging.WARNING, logger=training.__name__):
        progress = train(smoke(toy, epochs=2), run_dir, resume=True)

    assert f"model {run_dir / 'last.pt'}: not a loadable LungUDRNet checkpoint" in caplog.text
    assert f"resuming from the previous checkpoint {run_dir / PREVIOUS_LAST} instead" in caplog.text
    assert [row["epoch"] for row in progress.history] == [0, 1, 2]
    for name, value in _weights(run_dir / "last.pt").items():  # epoch 2 again, exactly as before
        assert torch.equal(value, finished[name]), name
    assert read_checkpoint(run_dir / PREVIOUS_LAST)["trainer_state"]["progress"]["epoch"] == 1
    assert not _partial_files(run_dir)
    assert checksums(toy) == inputs


def test_resume_without_a_loadable_checkpoint_is_a_clear_error(toy, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(smoke(toy, epochs=1), run_dir)
    _truncate(run_dir / "last.pt")
    (run_dir / PREVIOUS_LAST).write_bytes(b"not a checkpoint")
    before = checksums(run_dir)

    assert cli.main(["train", "--resume", str(run_dir)]) == ModelError.exit_code

    error = capsys.readouterr().err
    assert f"model {run_dir / 'last.pt'}: not a loadable LungUDRNet checkpoint" in error
    assert f"there is no loadable {PREVIOUS_LAST} to resume from either" in error
    assert "start a new run with another --out" in error
    assert checksums(run_dir) == before  # nothing rewritten, not even config.yaml


def test_init_weights_holding_nan_are_refused_before_the_run_folder_is_made(toy, tmp_path):
    from LungUDRNetLib.checkpoint import save_checkpoint
    from LungUDRNetTrainerLib.training import build_network

    config = smoke(toy)
    net = build_network(config.model_config())
    with torch.no_grad():
        next(net.parameters()).fill_(float("nan"))
    weights = save_checkpoint(tmp_path / "diverged.pt", net, config.preprocess_config())
    with pytest.raises(ModelError, match=rf"^init weights {weights}: its weights hold NaN or Inf values \(1 of "):
        train(smoke(toy, init_weights=str(weights)), tmp_path / "run")
    assert not (tmp_path / "run").exists()
