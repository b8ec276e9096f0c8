"""The trainer in a background process, as the Slicer panel runs it: progress, Stop, resume."""

from __future__ import annotations

import sys
import time

import pytest

from LungUDRNetLib.checkpoint import read_checkpoint
from LungUDRNetLib.errors import CancelledError
from LungUDRNetTrainerLib.process import TrainingProcess, train_arguments
from LungUDRNetTrainerLib.toydata import write_toy_learn2reg


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """One thread per training process: tiny networks, and a busy machine must not slow them down."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_learn2reg(tmp_path_factory.mktemp("toy"), cases=3, val_cases=1)


def _wait(job: TrainingProcess, until=lambda job: False, timeout: float = 300.0) -> bool:
    """Poll ``job`` until it ends (True) or ``until(job)`` holds (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job.poll():
            return True
        if until(job):
            return False
        time.sleep(0.1)
    job.kill()
    raise AssertionError(f"the training process did not get there in {timeout} s: {job.log[-5:]}")


def test_stop_writes_a_checkpoint_and_resume_finishes_the_run(toy, tmp_path):
    run_dir = tmp_path / "run"
    arguments = train_arguments(run_dir, toy, preset="smoke", device="cpu", extra=["--epochs", "50"])
    job = TrainingProcess(run_dir, arguments, python=sys.executable)
    assert not _wait(job, until=lambda job: job.summary.startswith("epoch 1:"))
    job.stop()
    assert _wait(job)
    assert job.returncode == CancelledError.exit_code, job.log[-5:]
    assert "stopped" in job.message and 0.0 < job.fraction < 1.0
    done = read_checkpoint(run_dir / "last.pt")["trainer_state"]["progress"]["epoch"]
    assert done >= 1

    arguments = train_arguments(run_dir, device="cpu", resume=True, extra=["--epochs", str(done + 1)])
    job = TrainingProcess(run_dir, arguments, python=sys.executable)
    assert _wait(job)
    assert job.returncode == 0, job.log[-5:]
    assert job.fraction == 1.0 and job.summary.startswith(f"epoch {done + 1}:") and "best.pt" in job.message


def test_an_error_of_the_trainer_is_reported_in_one_line(tmp_path):
    job = TrainingProcess(tmp_path / "run", train_arguments(tmp_path / "run", tmp_path / "absent"),
                          python=sys.executable)
    assert _wait(job)
    assert job.returncode == 2 and job.message.startswith("dataset ") and "folder not found" in job.message
