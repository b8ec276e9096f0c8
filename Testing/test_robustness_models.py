"""Bad model files: ``load_model`` raises one ModelError naming the file and the problem, ``lungudrnet register``
exits with its status and writes nothing, and a checkpoint that tries to run code never does."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from LungUDRNetLib import register
from LungUDRNetLib.checkpoint import FORMAT_VERSION, load_model, untrained_model
from LungUDRNetLib.cli import main
from LungUDRNetLib.errors import ModelError
from LungUDRNetLib.io import write_json
from LungUDRNetLib.preprocess import PreprocessConfig

from robustness_cases import TINY_GRID, checksums, register_args, write_case


class RunsCode:
    """Unpickling this object runs ``os.system(command)``: what a malicious checkpoint can do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _edited(model: Path, name: str, edit) -> Path:
    """A copy of the checkpoint ``model``, its dictionary changed by ``edit(state)``."""
    state = torch.load(model, weights_only=True)
    edit(state)
    torch.save(state, model.with_name(name))
    return model.with_name(name)


def _truncated(model: Path) -> Path:
    data = model.read_bytes()
    path = model.with_name("truncated.pt")
    path.write_bytes(data[: len(data) // 2])
    return path


def _other_architecture(model: Path) -> Path:
    def halve_widths(state):
        state["model_config"]["encoder_channels"] = [c // 2 for c in state["model_config"]["encoder_channels"]]
    return _edited(model, "edited.pt", halve_widths)


def _preprocessing(**settings):
    def edited(model: Path) -> Path:
        return _edited(model, "edited.pt", lambda state: state["preprocess_config"].update(settings))
    return edited


def _nan_weights(model: Path) -> Path:
    def poison(state):
        next(v for k, v in state["state_dict"].items() if k.endswith("weight"))[0].fill_(float("nan"))
    return _edited(model, "diverged.pt", poison)


def _newer_format(model: Path) -> Path:
    return _edited(model, "newer.pt", lambda state: state.update(format_version=FORMAT_VERSION + 1))


def _malicious(model: Path) -> Path:
    marker = model.with_name("payload-ran")
    return _edited(model, "malicious.pt", lambda state: state["metadata"].update(note=RunsCode(f"touch '{marker}'")))


def _refused(files: dict[str, Path], tmp_path: Path, capsys, expected: str) -> None:
    """Assert that ``load_model`` and ``lungudrnet register`` refuse ``files["model"]`` with ``expected``, and that
    nothing under ``tmp_path`` was written or changed."""
    before = checksums(tmp_path)
    with pytest.raises(ModelError, match=expected):
        load_model(files["model"])
    assert main(register_args(files, tmp_path / "out")) == ModelError.exit_code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and re.match(f"lungudrnet: error: {expected}", error), error
    assert not (tmp_path / "out").exists()
    assert checksums(tmp_path) == before


@pytest.mark.parametrize("make, expected", [
    (lambda model: model.with_name("absent.pt"), "model .*absent.pt: file not found"),
    (_truncated, r"model .*truncated.pt: not a loadable LungUDRNet checkpoint: the file is truncated, corrupt or not "
                 r"a PyTorch file \(PytorchStreamReader failed reading zip archive.*\); copy or download it again"),
    (_other_architecture, r"model .*edited.pt: weights do not match its architecture config \(size mismatch for "
                          r"encoders\.0\.0\.weight: .*\); the file was edited or mixes two models"),
    (_newer_format, rf"model .*newer.pt: checkpoint format {FORMAT_VERSION + 1} is newer than this LungUDRNet "
                    rf"supports \({FORMAT_VERSION}\); update LungUDRNet"),
    (_preprocessing(window_width=0.0), r"model .*edited.pt: its preprocessing settings are not valid \(window_width "
                                       r"must be > 0 HU \(got 0.0\)\); the file was edited"),
    (_preprocessing(grid_mode="stretch"), r"model .*edited.pt: its preprocessing settings are not valid \(unknown grid "
                                          r"mode 'stretch'"),
    (_nan_weights, r"model .*diverged.pt: its weights hold NaN or Inf values \(1 of \d+ tensors, e.g. encoders\.0\.0\."
                   r"weight\): the training diverged or the file is damaged; use another checkpoint"),
], ids=["missing", "truncated", "other-architecture", "newer-format", "zero-window", "unknown-grid-mode",
        "nan-weights"])
def test_a_bad_model_file_is_refused_by_the_api_and_the_cli(tmp_path, capsys, make, expected):
    files = write_case(tmp_path / "case")
    files["model"] = make(files["model"])
    _refused(files, tmp_path, capsys, expected)


def test_a_checkpoint_with_a_malicious_pickle_is_refused_without_running_it(tmp_path, capsys):
    files = write_case(tmp_path / "case")
    files["model"] = _malicious(files["model"])
    marker = tmp_path / "case" / "payload-ran"
    _refused(files, tmp_path, capsys, r"model .*malicious.pt: not a loadable LungUDRNet checkpoint: it holds Python "
             r"objects other than weights \(here \w+\.system\), which could run code when "
             r"loaded, so it was refused and nothing in it was run")
    assert not marker.exists()
    # The payload is real: unpickling the file without weights_only runs it.
    torch.load(files["model"], weights_only=False)
    assert marker.exists()


def test_a_network_that_predicts_nan_is_refused_and_nothing_is_written(tmp_path):
    """A network whose weights are not numbers (passed in memory, so never checked as a file) must not give a
    NaN field: the prediction itself is checked."""
    files = write_case(tmp_path / "case")
    net = untrained_model()[0]
    with torch.no_grad():
        next(net.parameters()).fill_(float("nan"))
    with pytest.raises(ModelError, match=r"^network: predicted NaN or Inf displacements"):
        register(files["fixed"], files["moving"], model=net, preprocess=PreprocessConfig(grid_shape=TINY_GRID),
                 device="cpu")


def test_metrics_json_is_strict_json_even_with_nan_values(tmp_path):
    path = write_json({"after": {"ncc_percent": float("nan"), "tre_mm": [1.0, float("inf")], "n": np.int64(3)},
                       "scores": (np.float32(-np.inf), np.float64(2.5))}, tmp_path / "metrics.json")
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"after": {"ncc_percent": None, "tre_mm": [1.0, None], "n": 3}, "scores": [None, 2.5]}
