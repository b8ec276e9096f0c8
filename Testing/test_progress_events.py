"""The child jobs' event channel (JSON lines on standard output), and the child jobs where POSIX-only
modules are missing, as on Windows."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk

from LungUDRNetLib.background import RegistrationProcess
from LungUDRNetLib.progress_events import emit_progress, channel_on, parse_event
from LungUDRNetTrainerLib.process import TrainingProcess, train_arguments

POSIX_ONLY = ("resource", "fcntl", "pwd", "grp", "termios")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "LungUDRNetLib.cli", "--progress-json", *args],
                          capture_output=True, text=True, timeout=300)


def events_of(stdout: str) -> list[dict]:
    """Every line of ``stdout`` as an event; fails on a line that is not one."""
    events = [parse_event(line) for line in stdout.splitlines()]
    assert None not in events, f"non-event lines on stdout: {stdout!r}"
    return events


def test_register_reports_progress_and_result_paths_as_events(phantom_files, tmp_path):
    out = tmp_path / "out"
    completed = run_cli("register", "--fixed", str(phantom_files["fixed"]), "--moving", str(phantom_files["moving"]),
                        "--model", str(phantom_files["model"]), "--device", "cpu", "--out", str(out))
    assert completed.returncode == 0, completed.stderr
    events = events_of(completed.stdout)
    fractions = [event["fraction"] for event in events if event["event"] == "progress"]
    assert len(fractions) >= 4 and fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {event["stage"] for event in events if event["event"] == "progress"} == {"registration"}
    result = [event for event in events if event["event"] == "result"]
    assert len(result) == 1
    assert {Path(path) for path in result[0]["paths"].values()} == {out / "warped.nii.gz", out / "displacement.nii.gz",
                                                                     out / "metrics.json"}
    assert "results in" in completed.stderr  # the human summary goes to stderr, not into the channel


def test_an_error_is_one_event_with_the_exit_status(phantom_files, tmp_path):
    completed = run_cli("register", "--fixed", str(tmp_path / "absent.nii.gz"), "--moving",
                        str(phantom_files["moving"]), "--out", str(tmp_path / "out"))
    events = events_of(completed.stdout)
    assert completed.returncode == 2
    assert [event["event"] for event in events] == ["error"]
    assert events[0]["exit_code"] == 2 and "absent.nii.gz" in events[0]["message"]
    assert "\n" not in events[0]["message"]


def test_warnings_are_events(phantom_files, tmp_path):
    constant = sitk.Image(sitk.ReadImage(str(phantom_files["fixed"])).GetSize(), sitk.sitkInt16)
    constant.CopyInformation(sitk.ReadImage(str(phantom_files["fixed"])))
    sitk.WriteImage(constant, str(tmp_path / "constant.nrrd"))
    completed = run_cli("register", "--fixed", str(tmp_path / "constant.nrrd"), "--moving",
                        str(phantom_files["moving"]), "--model", str(phantom_files["model"]), "--device", "cpu",
                        "--out", str(tmp_path / "out"))
    warnings = [event["message"] for event in events_of(completed.stdout) if event["event"] == "warning"]
    assert any("constant" in message for message in warnings), (warnings, completed.stderr)


def test_progress_fractions_are_finite_and_clipped(capsys):
    with channel_on(sys.stdout):
        emit_progress(float("nan"), "a", stage="s")
        emit_progress(1.7, "b", stage="s")
        emit_progress(-0.2, "c", stage="s")
    emit_progress(0.5, "no channel: nothing written", stage="s")
    events = events_of(capsys.readouterr().out)
    assert [event["fraction"] for event in events] == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("line", ["", "[ 30%] running", "{}", '{"event": "unknown"}', "[1, 2]", "not json {"])
def test_lines_that_are_not_events_are_not_taken_for_events(line):
    assert parse_event(line) is None


# --- the child jobs without POSIX-only modules (as on Windows) --------------------------------------

def block_in_children(names: tuple[str, ...], folder: Path, monkeypatch) -> None:
    """Child Python processes started from now on fail to import ``names`` (a ``sitecustomize`` blocks them).

    psutil is imported first: its Linux backend needs ``resource``, as its Windows backend needs Windows
    modules; what is checked is that no code of this project imports a blocked module.
    """
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(f"import sys, psutil\nsys.modules.update(dict.fromkeys({names!r}))\n")
    check = subprocess.run([sys.executable, "-c", f"import {names[0]}"], capture_output=True, text=True,
                           env={"PYTHONPATH": str(folder), "PATH": ""})
    assert "ModuleNotFoundError" in check.stderr or "ImportError" in check.stderr  # the block works
    monkeypatch.setenv("PYTHONPATH", str(folder))


@pytest.fixture
def without_posix_modules(tmp_path, monkeypatch):
    block_in_children(POSIX_ONLY, tmp_path / "site", monkeypatch)


def poll_until_done(job, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not job.poll():
        assert time.monotonic() < deadline, job.log[-5:]
        time.sleep(0.05)


def test_the_registration_job_runs_without_posix_only_modules(without_posix_modules, phantom_files):
    images = {"fixed": sitk.ReadImage(str(phantom_files["fixed"])), "moving": sitk.ReadImage(str(phantom_files["moving"])),
              "fixed_mask": None, "moving_mask": None}
    job = RegistrationProcess(images, model=phantom_files["model"], device="cpu")
    poll_until_done(job)
    warped, displacement, report = job.results()
    assert warped.GetSize() == images["fixed"].GetSize()
    assert report["device"] == "cpu" and job.fraction == 1.0


def test_registration_needs_none_of_the_trainers_or_demos_packages(tmp_path, monkeypatch, phantom_files):
    """The Slicer panel installs only nibabel, scipy and psutil for registration: the child process must not
    import tqdm, matplotlib or yaml."""
    block_in_children(("tqdm", "matplotlib", "yaml"), tmp_path / "site", monkeypatch)
    images = {"fixed": sitk.ReadImage(str(phantom_files["fixed"])), "moving": sitk.ReadImage(str(phantom_files["moving"])),
              "fixed_mask": None, "moving_mask": None}
    job = RegistrationProcess(images, model=phantom_files["model"], device="cpu")
    poll_until_done(job)
    assert job.results()[0].GetSize() == images["fixed"].GetSize()


def test_the_training_job_runs_without_posix_only_modules(without_posix_modules, toy, tmp_path):
    job = TrainingProcess(tmp_path / "run", train_arguments(tmp_path / "run", toy, preset="smoke", device="cpu",
                                                            extra=["--epochs", "1"]))
    poll_until_done(job)
    assert job.returncode == 0, job.log[-10:]
    assert job.fraction == 1.0 and job.summary.startswith("epoch 1:")
    assert (tmp_path / "run" / "best.pt").is_file()


def test_every_subcommand_is_there_without_posix_only_modules(without_posix_modules):
    completed = subprocess.run([sys.executable, "-m", "LungUDRNetLib.cli", "--help"], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    for command in ("register", "demo", "train", "evaluate", "bench"):
        assert command in completed.stdout.split("{", 1)[1].split("}", 1)[0].split(","), command
