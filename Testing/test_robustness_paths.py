"""Paths that are not plain files, and output folders shared or left dirty: a named pipe, a symbolic link loop,
a 300-character name (as an input or as --out), a folder locked by another run, temporary files of a killed
run. Every input path (register, the Python API, register --pairs, train, evaluate) gives one line naming the
file, writes nothing and never hangs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from LungUDRNetLib import register
from LungUDRNetLib.cli import main
from LungUDRNetLib.cohort import read_summary
from LungUDRNetLib.errors import InputError, ModelError, OutputError
from LungUDRNetLib.output_folder import LOCK_FILE, output_lock, temporary_path

from robustness_cases import (checksums, edited_metaimage, moving_phantom, named_pipe, register_args,
                              write_case)

PIPE = r"is a named pipe \(FIFO\), not a regular file{}; pass the file itself \(a pipe or device would be read for ever\)"
LOOP = r"is a symbolic link loop \(a link that points back to itself\); point it at the real file"
LONG = r"file name too long \(307 bytes in one name, \d+ characters in all; file systems allow 255 per name\)"


def _loop(path: Path) -> Path:
    os.symlink(path.name, path)
    return path


def _one_line(capsys, expected: str) -> None:
    error = capsys.readouterr().err
    assert len(error.splitlines()) == 1 and re.fullmatch(f"lungudrnet: error: {expected}.*\n", error), error


# --- inputs that are not plain files -------------------------------------------------------------------------

@pytest.mark.parametrize("key, what, folder", [("fixed", "fixed image", True), ("fixed_mask", "fixed mask", True),
                                               ("model", "model", True)])
def test_a_named_pipe_as_input_is_refused_at_once(tmp_path, capsys, key, what, folder):
    files = write_case(tmp_path / "case")
    with named_pipe(tmp_path / "pipe.nii.gz") as pipe:
        files[key] = pipe
        extra = ("--fixed-mask", str(files["fixed_mask"])) if key == "fixed_mask" else ()
        assert main(register_args(files, tmp_path / "out", *extra)) == 2
        _one_line(capsys, f"{what} {re.escape(str(pipe))}: " + PIPE.format(" or a folder" if folder else ""))
        if key != "model":
            with pytest.raises(InputError, match=PIPE.format(" or a folder")):
                register(files["fixed"], files["moving"], model=files["model"], device="cpu",
                         fixed_mask=files["fixed_mask"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, what, expected", [("fixed", "fixed image", LOOP), ("model", "model", LOOP),
                                                 ("moving", "moving image", LONG)], ids=["loop", "loop", "long"])
def test_a_symbolic_link_loop_or_an_overlong_name_as_input_is_one_line(tmp_path, capsys, key, what, expected):
    files = write_case(tmp_path / "case")
    files[key] = _loop(tmp_path / "loop.nii.gz") if expected == LOOP else tmp_path / ("a" * 300 + ".nii.gz")
    assert main(register_args(files, tmp_path / "out")) == (ModelError if key == "model" else InputError).exit_code
    _one_line(capsys, f"{what} {re.escape(str(files[key]))}: {expected}")
    assert not (tmp_path / "out").exists()


def test_an_overlong_out_folder_is_refused_by_register_train_and_evaluate(tmp_path, capsys, toy):
    files = write_case(tmp_path / "case")
    out = tmp_path / ("b" * 300)
    expected = (f"output folder {re.escape(str(out))}: cannot be used: a name is too long \\(300 bytes; file systems "
                r"allow 255\); choose another --out folder")
    for args in (register_args(files, out), ["train", "--preset", "smoke", "--data", str(toy), "--out", str(out)],
                 ["evaluate", "--model", str(files["model"]), "--data", str(toy), "--out", str(out)]):
        assert main(args) == OutputError.exit_code, args[0]
        _one_line(capsys, expected)


def test_a_cohort_names_each_pairs_bad_file_in_its_summary(tmp_path, capsys):
    files = write_case(tmp_path / "case")
    pipe = tmp_path / "pipe.mha"
    loop = _loop(tmp_path / "loop.mha")
    skewed = edited_metaimage(tmp_path / "skewed.mha", moving_phantom(), TransformMatrix="1 0 0 0.5 1 0 0 0 1")
    points = tmp_path / "points.csv"
    points.write_text("1,2,3\n")
    fixed, moving = files["fixed"], files["moving"]
    rows = [f"pipe,{pipe},{moving},,", f"loop,{fixed},{loop},,", f"skewed,{fixed},{skewed},,",
            f"points,{fixed},{moving},{pipe},{points}"]
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("name,fixed,moving,fixed_points,moving_points\n" + "\n".join(rows) + "\n")
    with named_pipe(pipe):
        assert main(["register", "--pairs", str(pairs), "--out", str(tmp_path / "out"), "--model",
                     str(files["model"]), "--device", "cpu", "--no-affine"]) == 1
    errors = {row["pair"]: row["error"] for row in read_summary(tmp_path / "out" / "summary.csv")}
    assert re.match(f"fixed image {re.escape(str(pipe))}: " + PIPE.format(" or a folder"), errors["pipe"])
    assert re.match(f"moving image {re.escape(str(loop))}: {LOOP}", errors["loop"])
    assert errors["skewed"].startswith(f"moving image {skewed}: has a direction matrix whose axes are not orthonormal")
    assert re.match(f"point file {re.escape(str(pipe))}: " + PIPE.format(""), errors["points"])
    assert not any((tmp_path / "out" / name / "warped.nii.gz").exists() for name in errors)
    capsys.readouterr()
    with named_pipe(tmp_path / "pairs_pipe.csv") as pairs_pipe:
        assert main(["register", "--pairs", str(pairs_pipe), "--out", str(tmp_path / "out2")]) == 2
    _one_line(capsys, f"pairs file {re.escape(str(pairs_pipe))}: " + PIPE.format(""))
    assert not (tmp_path / "out2").exists()


def test_train_and_evaluate_refuse_a_named_pipe_in_the_pairs_before_making_anything(tmp_path, capsys, toy):
    images = toy / "imagesTr"
    pairs = tmp_path / "pairs.csv"
    with named_pipe(tmp_path / "pipe.nii.gz") as pipe:
        pairs.write_text(f"fixed,moving,split\n{images / 'Toy_0001_0000.nii.gz'},{pipe},train\n"
                         f"{images / 'Toy_0005_0000.nii.gz'},{images / 'Toy_0005_0001.nii.gz'},val\n"
                         f"{pipe},{images / 'Toy_0005_0001.nii.gz'},val\n")
        model = write_case(tmp_path / "case")["model"]
        for args in (["train", "--preset", "smoke", "--pairs", str(pairs), "--out", str(tmp_path / "run")],
                     ["evaluate", "--model", str(model), "--pairs", str(pairs), "--out", str(tmp_path / "eval")]):
            assert main(args) == InputError.exit_code
            _one_line(capsys, f"pair .*: (fixed|moving) image {re.escape(str(pipe))}: " + PIPE.format(" or a folder"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "eval").exists()


# --- train --out and evaluate --out -------------------------------------------------------------------------

def test_train_out_naming_a_file_is_refused_clearly(tmp_path, capsys, toy):
    (tmp_path / "notes.txt").write_text("keep me")
    assert main(["train", "--preset", "smoke", "--data", str(toy), "--out", str(tmp_path / "notes.txt")]) == 3
    _one_line(capsys, f"output folder {re.escape(str(tmp_path / 'notes.txt'))}: is a file, not a folder; choose "
                      "another --out folder")
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_evaluate_checks_every_model_before_it_makes_the_out_folder(tmp_path, capsys, toy):
    good = write_case(tmp_path / "case")["model"]
    state = torch.load(good, weights_only=True)
    next(iter(state["state_dict"].values())).fill_(float("nan"))
    torch.save(state, tmp_path / "diverged.pt")
    for bad, expected in ((tmp_path / "absent.pt", "file not found"),
                          (tmp_path / "diverged.pt", "its weights hold NaN or Inf values")):
        assert main(["evaluate", "--model", str(good), "--model", str(bad), "--data", str(toy), "--out",
                     str(tmp_path / "evaluation")]) == ModelError.exit_code
        _one_line(capsys, f"model {re.escape(str(bad))}: {expected}")
        assert not (tmp_path / "evaluation").exists()


# --- one run per output folder ---------------------------------------------------------------------------------

def test_a_second_run_into_a_locked_out_folder_is_refused_and_changes_nothing(tmp_path, capsys):
    files = write_case(tmp_path / "case")
    out = tmp_path / "out"
    out.mkdir()
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"fixed,moving\n{files['fixed']},{files['moving']}\n")
    with output_lock(out):  # another run is writing into it
        before = checksums(out)
        for args in (register_args(files, out), ["register", "--pairs", str(pairs), "--out", str(out), "--model",
                                                 str(files["model"]), "--device", "cpu"]):
            assert main(args) == OutputError.exit_code
            _one_line(capsys, f"output folder {re.escape(str(out))}: another lungudrnet run is writing into it; wait "
                              "for it to end or choose another --out folder")
            assert checksums(out) == before
    assert not (out / LOCK_FILE).exists()
    assert main(register_args(files, out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["displacement.nii.gz", "metrics.json", "warped.nii.gz"]


def test_results_another_run_wrote_meanwhile_are_not_replaced(tmp_path, capsys, monkeypatch):
    """Both runs found the folder empty when they started; the one that finishes second must not replace the
    first one's results."""
    from LungUDRNetLib import registration

    files = write_case(tmp_path / "case")
    out = tmp_path / "out"
    original = registration.register
    written = {}

    def first_run_finishes_meanwhile(*args, **kwargs):
        monkeypatch.setattr(registration, "register", original)
        result = original(*args, **kwargs)
        assert main(register_args(files, out, "--no-affine")) == 0  # the other run, started later, is faster
        written.update(checksums(out))
        return result

    monkeypatch.setattr(registration, "register", first_run_finishes_meanwhile)
    assert main(register_args(files, out)) == OutputError.exit_code
    assert capsys.readouterr().err.endswith(f"output {out / 'warped.nii.gz'}: already exists (use --overwrite to "
                                            "replace it)\n")
    assert checksums(out) == written and len(written) == 3


# --- temporaries of a killed run -------------------------------------------------------------------------------

def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temporaries_of_a_killed_run_are_removed_and_nothing_else(tmp_path):
    files = write_case(tmp_path / "case")
    out = tmp_path / "out"
    out.mkdir()
    target = out / "warped.nii.gz"
    stale = temporary_path(target, ".nii.gz").name.replace(f".{os.getpid()}-", f".{_dead_pid()}-")
    (out / stale).write_bytes(b"partial")
    live = temporary_path(target, ".nii.gz").name.replace(f".{os.getpid()}-", f".{os.getppid()}-")  # a live writer
    (out / live).write_bytes(b"being written")
    for name in (".notes.part", "user.1234-0123456789ab.part.nii.gz"):  # not this tool's temporaries
        (out / name).write_text("mine")
    assert main(register_args(files, out)) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([live, ".notes.part", "user.1234-0123456789ab.part.nii.gz",
                                                            "displacement.nii.gz", "metrics.json", "warped.nii.gz"])


def test_library_warnings_stay_off_the_screen_unless_verbose(tmp_path, capfd):
    skewed = moving_phantom()
    skewed.SetDirection((1.0, 0.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    try:
        for verbose, shown in ((["-v"], True), ([], False)):
            main([*verbose, "register", "--fixed", str(tmp_path / "absent.nrrd"), "--moving", "x", "--out",
                  str(tmp_path / "out")])
            capfd.readouterr()
            sitk.WriteImage(skewed, str(tmp_path / "skewed.nii.gz"))  # ITK's NIfTI writer warns about this grid
            assert ("Non-orthogonal direction matrix" in capfd.readouterr().err) == shown
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(True)
