"""Outputs that cannot be written, a full disk, Ctrl-C and SIGTERM: ``lungudrnet register`` exits with the
documented status, keeps no partial or temporary file and leaves the inputs unchanged.

(Existing results without ``--overwrite``: ``test_register_cli.py``.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import pytest
import SimpleITK as sitk

from LungUDRNetLib import checkpoint, io
from LungUDRNetLib.cli import main
from LungUDRNetLib.errors import CancelledError, OutputError
from LungUDRNetLib.io import write_image
from LungUDRNetLib.phantom import chest_phantom

from robustness_cases import as_unprivileged_user, centred_grid, checksums, register_args, write_case


def _cli(args: list[str]) -> tuple[int, str]:
    """``lungudrnet ARGS``: exit status and standard error."""
    with contextlib.redirect_stderr(StringIO()) as stderr:
        status = main(args)
    return status, stderr.getvalue()


def _locked_folder(root: Path, mode: int) -> Path:
    folder = root / "locked"
    folder.mkdir()
    folder.chmod(mode)
    return folder / "results"


def _under_a_file(root: Path) -> Path:
    (root / "notes.txt").write_text("not a folder")
    return root / "notes.txt" / "results"


@pytest.mark.parametrize("make, expected", [
    (lambda root: _locked_folder(root, 0o555),
     r"output folder (.*)/locked/results: \1/locked is not writable \(permission denied\); choose another --out "
     "folder"),
    (lambda root: _locked_folder(root, 0o000),
     r"output folder (.*)/locked/results: permission denied \(\1/locked/results\); choose another --out folder"),
    (_under_a_file, r"output folder (.*)/notes.txt/results: is under \1/notes.txt, which is a file, not a folder; "
                    "choose another --out folder"),
], ids=["read-only-folder", "folder-not-enterable", "under-a-file"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_the_work(world_dir, make, expected):
    files = write_case(world_dir / "case")
    out = make(world_dir)
    before = checksums(world_dir)
    outcome = as_unprivileged_user(lambda: _cli(register_args(files, out)))
    if (world_dir / "locked").exists():
        (world_dir / "locked").chmod(0o755)  # for the clean-up
    assert outcome.startswith(f"({OutputError.exit_code}, 'lungudrnet: error: ")
    assert re.search(expected, outcome), outcome
    assert not os.path.lexists(out) and checksums(world_dir) == before


def test_a_full_disk_while_writing_leaves_no_partial_result(tmp_path, monkeypatch):
    files = write_case(tmp_path / "case")
    before = checksums(tmp_path)
    written = []

    def fill_the_disk(field, path: Path, compress: bool) -> None:
        """The displacement field's writer: part of the file is written, then the disk is full; once the warped
        scan's writer, in the other thread, has started (the real field writer, which does not compress, is
        the quicker one)."""
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline and not any(p.name.startswith(".warped") and p.stat().st_size
                                                      for p in path.parent.iterdir()):
            time.sleep(0.005)
        path.write_bytes(b"\0" * 4096)
        written.extend(sorted(p.name for p in path.parent.iterdir() if p.stat().st_size))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io, "_save_nifti_field", fill_the_disk)
    out = tmp_path / "results" / "run1"
    status, error = _cli(register_args(files, out))
    assert status == OutputError.exit_code == 3
    assert error == (f"lungudrnet: error: output {out}: write failed (No space left on device); check free disk "
                     "space and permissions\n")
    assert [name.split(".")[1] for name in written] == ["displacement", "warped"]  # partial files were there
    assert not (tmp_path / "results").exists()  # nor the folders the run created
    assert checksums(tmp_path) == before


@pytest.fixture(scope="module")
def large_case(tmp_path_factory) -> dict[str, Path]:
    """A case whose 2.6-million-voxel fixed image takes the result files a second or so to write."""
    files = write_case(tmp_path_factory.mktemp("large"))
    fixed = sitk.Cast(chest_phantom(centred_grid((160, 160, 100), (0.6, 0.55, 1.0))), sitk.sitkInt16)
    files["fixed"] = write_image(fixed, files["fixed"])
    return files


SIGTERM_MESSAGE = "lungudrnet: error: interrupted by signal SIGTERM; no partial output was kept"


def _writing_run(files: dict[str, Path], out: Path) -> subprocess.Popen:
    """``lungudrnet register`` in a child process, returned once it is writing its temporary result files."""
    command = [sys.executable, "-m", "LungUDRNetLib.cli", *register_args(files, out)]
    # Ctrl-C acts as in a terminal even where the tests run in the background (which ignores SIGINT).
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (out.is_dir() and any(out.glob("*.part*"))):  # the temporary result files are being written
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the run ended or stalled before writing its results: {process.communicate()[1]}")
        time.sleep(0.005)
    return process


@pytest.mark.parametrize("signum, message", [
    (signal.SIGTERM, SIGTERM_MESSAGE),
    (signal.SIGINT, "lungudrnet: interrupted; no partial output was kept"),
], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_while_the_results_are_written_leaves_nothing(large_case, tmp_path, signum, message):
    inputs = large_case["fixed"].parent
    before = checksums(inputs)
    out = tmp_path / "results"
    process = _writing_run(large_case, out)
    process.send_signal(signum)
    _, error = process.communicate(timeout=60)
    assert process.returncode == CancelledError.exit_code == 130, error
    assert error.strip().splitlines()[-1] == message
    assert not out.exists()
    assert checksums(inputs) == before


def test_temporaries_left_by_sigkill_are_removed_by_the_next_run(large_case, tmp_path):
    out = tmp_path / "results"
    process = _writing_run(large_case, out)
    process.kill()  # SIGKILL cannot be caught: the temporary files stay
    process.communicate(timeout=60)
    assert list(out.glob(".*.part*"))
    status, error = _cli(register_args(large_case, out))
    assert status == 0, error
    assert sorted(p.name for p in out.iterdir()) == ["displacement.nii.gz", "metrics.json", "warped.nii.gz"]


def test_sigterm_while_the_model_loads_is_an_interruption_not_a_bad_model(tmp_path, monkeypatch, capsys):
    files = write_case(tmp_path / "case")
    before = checksums(tmp_path)
    load = checkpoint.torch.load

    def terminated_while_loading(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)  # the handler of ``main`` runs before this returns
        return load(*args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "load", terminated_while_loading)
    assert main(register_args(files, tmp_path / "out")) == CancelledError.exit_code
    assert capsys.readouterr().err == f"{SIGTERM_MESSAGE}\n"
    assert not (tmp_path / "out").exists() and checksums(tmp_path) == before
