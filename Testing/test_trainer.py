"""The headless trainer on a tiny generated Learn2Reg dataset: learning, resume, early stopping,
accumulation, Ctrl-C, configuration layers and the command line."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch
import yaml

from LungUDRNetLib import cli
from LungUDRNetLib.checkpoint import load_model, read_checkpoint
from LungUDRNetLib.errors import CancelledError, InputError, OutputError
from LungUDRNetLib.instance_optimisation import InstanceOptimisationConfig
from LungUDRNetTrainerLib.config import resolve_config
from LungUDRNetTrainerLib.training import stop_on_signals, train

from conftest import smoke


pytestmark = pytest.mark.usefixtures("one_thread")


def _history(run_dir) -> list[dict]:
    return read_checkpoint(run_dir / "last.pt")["trainer_state"]["progress"]["history"]


def test_training_lowers_the_validation_loss_and_beats_the_identity(toy, tmp_path):
    progress = train(smoke(toy, epochs=3), tmp_path / "run")
    history = progress.history
    assert [row["epoch"] for row in history] == [0, 1, 2, 3]
    assert history[0]["train_loss"] is None  # row 0: the untrained network, i.e. the identity
    assert history[-1]["val_loss"] < 0.9 * history[0]["val_loss"]
    assert history[-1]["val_ncc_percent"] > history[0]["val_ncc_percent"] + 1.0
    assert progress.best_epoch == 3
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert log[0].startswith("epoch,train_loss,val_loss") and len(log) == 5
    model, preprocess, metadata = load_model(tmp_path / "run")  # the run folder means best.pt
    assert preprocess.grid_shape == (32, 32, 32) and model.config.encoder_channels == (4, 8, 8)
    assert metadata["epoch"] == 3 and metadata["train_config"]["learning_rate"] == 3e-3
    assert metadata["instance_optimisation"] == InstanceOptimisationConfig().to_dict()  # the settings travel with it


def test_resume_after_a_stop_gives_the_uninterrupted_result(toy, tmp_path):
    config = smoke(toy, epochs=2, augment_pairs=1)  # 8 pairs per epoch: 4 steps
    train(config, tmp_path / "straight")
    stop = threading.Event()

    def stop_in_epoch_two(epoch: int, step: int) -> None:
        if (epoch, step) == (2, 1):
            stop.set()

    with pytest.raises(CancelledError, match="--resume"):
        train(config, tmp_path / "resumed", stop=stop, on_step=stop_in_epoch_two)
    state = read_checkpoint(tmp_path / "resumed" / "last.pt")["trainer_state"]["progress"]
    assert (state["epoch"], state["step"]) == (1, 1)
    train(config, tmp_path / "resumed", resume=True)

    straight, resumed = read_checkpoint(tmp_path / "straight" / "last.pt"), read_checkpoint(tmp_path / "resumed" / "last.pt")
    for name, weights in straight["state_dict"].items():
        assert torch.equal(weights, resumed["state_dict"][name]), name
    assert _history(tmp_path / "straight") == [
        {**row, "seconds": a["seconds"]} for row, a in zip(_history(tmp_path / "resumed"), _history(tmp_path / "straight"))]


def test_ctrl_c_finishes_the_step_and_writes_a_checkpoint(toy, tmp_path):
    stop = threading.Event()
    previous = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN in a job started in the background
    with stop_on_signals(stop), pytest.raises(CancelledError, match="stopped in epoch 1 after step 1"):
        train(smoke(toy), tmp_path / "run", stop=stop, on_step=lambda epoch, step: os.kill(os.getpid(), signal.SIGINT))
    assert read_checkpoint(tmp_path / "run" / "last.pt")["trainer_state"]["progress"]["step"] == 1
    assert signal.getsignal(signal.SIGINT) is previous  # handlers restored


def test_early_stopping_after_patience_epochs_without_improvement(toy, tmp_path):
    # A step too small to change float32 weights: the validation loss never improves after epoch 0.
    progress = train(smoke(toy, learning_rate=1e-30, epochs=20, patience=2), tmp_path / "run")
    assert [row["epoch"] for row in progress.history] == [0, 1, 2]
    assert progress.best_epoch == 0 and progress.bad_epochs == 2


def test_gradient_accumulation_matches_the_full_batch(toy, tmp_path):
    full = train(smoke(toy, epochs=1, batch_size=4), tmp_path / "full")
    accumulated = train(smoke(toy, epochs=1, batch_size=4, micro_batch_size=1), tmp_path / "accumulated")
    assert accumulated.history[-1]["train_loss"] == pytest.approx(full.history[-1]["train_loss"], rel=1e-5)
    weights = read_checkpoint(tmp_path / "full" / "last.pt")["state_dict"]
    for name, value in read_checkpoint(tmp_path / "accumulated" / "last.pt")["state_dict"].items():
        torch.testing.assert_close(value, weights[name], rtol=1e-4, atol=1e-6)
    with pytest.raises(InputError, match="micro_batch_size"):
        train(smoke(toy, batch_size=4, micro_batch_size=3), tmp_path / "bad")


def test_configuration_layers_preset_file_flags(tmp_path):
    (tmp_path / "settings.yaml").write_text("preset: fast\nlearning_rate: 3e-4\nencoder-channels: [8, 8, 8]\n"
                                            "decoder_channels: 8,8,8\n")
    config = resolve_config(config_file=tmp_path / "settings.yaml", overrides={"epochs": "7"})
    assert (config.grid_shape, config.learning_rate, config.epochs, config.encoder_channels) == (
        (64, 64, 64), 3e-4, 7, (8, 8, 8))
    assert config.seed == 666 and config.model_config().attention
    (tmp_path / "settings.toml").write_text('model = "voxelmorph"\ngrid_shape = [48, 40, 32]\ncompile = true\n')
    config = resolve_config("paper", tmp_path / "settings.toml", {"grid_shape": ["64"]})
    assert not config.model_config().attention and config.compile and config.grid_shape == (64, 64, 64)
    assert config.preprocess_config().grid_mode == "crop"
    for bad, message in (({"learning_rat": 1}, "unknown setting"), ({"amp": "fp8"}, "not one of"),
                         ({"grid_shape": [1, 2]}, "3 integers"), ({"grid_shape": [8]}, "minimum 16"),
                         ({"decoder_channels": [8, 8]}, "same number of levels")):
        with pytest.raises(InputError, match=message):
            resolve_config(overrides=bad)


def test_command_line_paper_preset_then_register_with_the_run(toy, tmp_path, capsys):
    run_dir = tmp_path / "run"
    small = ["--grid-shape", "32", "--grid-mode", "fit", "--encoder-channels", "4", "8", "8", "--decoder-channels",
             "8", "8", "4", "--bottleneck-channels", "8", "--batch-size", "2", "--num-workers", "0",
             "--epochs", "1", "--similarity", "ncc"]
    assert cli.main(["train", "--preset", "paper", "--data", str(toy), "--out", str(run_dir), *small]) == 0
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (config["learning_rate"], config["seed"], config["patience"], config["model"]) == (1e-5, 666, 5, "udrnet")
    assert config["smoothness_weight"] == 1.0 and config["data"] == str(toy)
    assert cli.main(["train", "--data", str(toy), "--out", str(run_dir)]) == OutputError.exit_code
    assert "already holds a training run" in capsys.readouterr().err

    assert cli.main(["train", "--resume", str(run_dir), "--epochs", "2"]) == 0
    assert [row["epoch"] for row in _history(run_dir)] == [0, 1, 2]

    images = toy / "imagesTr"
    assert cli.main(["register", "--model", str(run_dir), "--fixed", str(images / "Toy_0005_0000.nii.gz"),
                     "--moving", str(images / "Toy_0005_0001.nii.gz"), "--out", str(tmp_path / "registered")]) == 0
    assert (tmp_path / "registered" / "displacement.nii.gz").is_file()
