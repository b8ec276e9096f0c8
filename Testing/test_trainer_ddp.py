"""Multi-process training under ``torchrun`` with the gloo backend (CPU): DistributedDataParallel
with a DistributedSampler, only rank 0 writing, and the same result as one process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from LungUDRNetLib.checkpoint import read_checkpoint


def _failure(stderr: str) -> str:
    """A failed run's stderr for the assertion message: from the first report of a failing rank (a Python
    traceback, or C++'s or Python's abort message) on, then torchrun's summary at the end."""
    marks = ("Traceback (most recent call last)", "terminate called", "Fatal Python error")
    starts = [stderr.find(mark) for mark in marks]
    start = min((i for i in starts if i >= 0), default=0)
    head, tail = stderr[start:start + 4000], stderr[max(start + 4000, len(stderr) - 2000):]
    return head + ("\n[...]\n" + tail if tail else "")


def _train(launcher: list[str], toy, run_dir) -> subprocess.CompletedProcess:
    """``launcher -m LungUDRNetTrainerLib train`` with the smoke preset for one epoch, one thread per process."""
    command = [*launcher, "-m", "LungUDRNetTrainerLib", "train", "--preset", "smoke", "--epochs", "1",
               "--device", "cpu", "--data", str(toy), "--out", str(run_dir)]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, encoding="utf-8",
                            timeout=600)
    assert result.returncode == 0, _failure(result.stderr)
    return result


def test_two_gloo_processes_write_one_run_equal_to_a_single_process_run(toy, tmp_path):
    run_dir = tmp_path / "ddp"
    result = _train([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], toy, run_dir)
    assert "2 pairs per step = 1 per pass x 1 accumulated x 2 processes" in result.stderr
    assert result.stdout.count("training finished") == 1  # rank 0 only
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt", "config.yaml", "last.prev.pt", "last.pt", "log.csv"]

    _train([sys.executable], toy, tmp_path / "single")
    ddp, single = read_checkpoint(run_dir / "last.pt"), read_checkpoint(tmp_path / "single" / "last.pt")
    history = ddp["trainer_state"]["progress"]["history"]
    assert [row["epoch"] for row in history] == [0, 1]
    for ours, theirs in zip(history, single["trainer_state"]["progress"]["history"]):
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-4)
    weights = single["state_dict"]
    for name, value in ddp["state_dict"].items():
        torch.testing.assert_close(value, weights[name], rtol=1e-3, atol=1e-5)
