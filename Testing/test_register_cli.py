"""`register()` and `lungudrnet register` end to end on generated phantom pairs; the command line's options
and help of every subcommand."""

from __future__ import annotations

import argparse
import gc
import json
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LungUDRNetLib import register
from LungUDRNetLib.cli import CORE_COMMANDS, build_parser, main, program
from LungUDRNetLib.errors import InputError
from LungUDRNetLib.registration import MAX_FOLDED_PERCENT

from robustness_cases import checksums


def test_register_returns_fields_on_the_fixed_grid(phantom_files):
    result = register(phantom_files["fixed"], phantom_files["moving"], model=phantom_files["model"], device="cpu",
                      fast=True)
    fixed = sitk.ReadImage(str(phantom_files["fixed"]))
    for image in (result.warped, result.displacement):
        assert image.GetSize() == fixed.GetSize()
        np.testing.assert_allclose(image.GetOrigin(), fixed.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(image.GetDirection(), fixed.GetDirection(), atol=1e-6)
    assert result.displacement.GetNumberOfComponentsPerPixel() == 3
    # An untrained network predicts (almost) no motion: the warped image is the moving one on the fixed grid.
    assert np.abs(sitk.GetArrayViewFromImage(result.displacement)).max() < 0.01
    identity = sitk.Resample(sitk.ReadImage(str(phantom_files["moving"])), fixed, sitk.Transform(), sitk.sitkLinear,
                             -1000.0, sitk.sitkFloat32)
    inside = sitk.GetArrayViewFromImage(identity) > -999
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(result.warped)[inside],
                               sitk.GetArrayViewFromImage(identity)[inside], atol=2.0)
    assert result.device == "cpu" and result.timings["total"] > 0


def test_negative_iterations_are_refused(phantom_files, tmp_path, capsys):
    out = tmp_path / "out"
    status = main(["register", "--fixed", str(phantom_files["fixed"]), "--moving", str(phantom_files["moving"]),
                   "--out", str(out), "--model", str(phantom_files["model"]), "--iterations", "-1"])
    assert status == InputError.exit_code and not out.exists()
    assert "instance optimisation iterations: must not be negative, not -1" in capsys.readouterr().err


def test_cli_register_writes_the_three_results(phantom_files, tmp_path, capsys):
    out = tmp_path / "out"
    status = main(["register", "--fixed", str(phantom_files["fixed"]), "--moving", str(phantom_files["moving"]),
                   "--out", str(out), "--model", str(phantom_files["model"]), "--device", "cpu",
                   "--fixed-mask", str(phantom_files["fixed_mask"]), "--moving-mask", str(phantom_files["fixed_mask"])])
    assert status == 0
    assert sorted(p.name for p in out.iterdir()) == ["displacement.nii.gz", "metrics.json", "warped.nii.gz"]
    report = json.loads((out / "metrics.json").read_text())
    assert report["device"] == "cpu"
    assert 0 < report["before"]["ncc_percent"] <= 100 and "dice_percent" in report["after"]
    assert report["jacobian"]["folding_percent"] < MAX_FOLDED_PERCENT
    field = sitk.ReadImage(str(out / "displacement.nii.gz"))
    assert field.GetNumberOfComponentsPerPixel() == 3
    assert sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64)) is not None
    assert "results in" in capsys.readouterr().out


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("problem, expected", [
    ("missing", "fixed image .*nope.nii.gz: file not found"),
    ("corrupt", "fixed image .*corrupt.nii.gz: cannot be read as an image"),
    ("2d", "fixed image .*flat.nrrd: is 2D"),
    ("model", "model .*absent.pt: file not found"),
])
def test_cli_bad_input_gives_one_clear_line_and_writes_nothing(phantom_files, tmp_path, capsys, problem, expected):
    fixed = phantom_files["fixed"]
    model = phantom_files["model"]
    if problem == "missing":
        fixed = tmp_path / "nope.nii.gz"
    elif problem == "corrupt":
        fixed = tmp_path / "corrupt.nii.gz"
        fixed.write_bytes(b"garbage")
    elif problem == "2d":
        fixed = tmp_path / "flat.nrrd"
        sitk.WriteImage(sitk.Image(16, 16, sitk.sitkInt16), str(fixed))
    else:
        model = tmp_path / "absent.pt"
    before = _snapshot(tmp_path)
    status = main(["register", "--fixed", str(fixed), "--moving", str(phantom_files["moving"]),
                   "--out", str(tmp_path / "out"), "--model", str(model), "--device", "cpu"])
    error = capsys.readouterr().err.strip()
    assert status == 2
    assert len(error.splitlines()) == 1 and error.startswith("lungudrnet: error:")
    assert re.search(expected, error), error
    assert _snapshot(tmp_path) == before  # no output folder, inputs unchanged


def test_cli_refuses_existing_results_without_overwrite(phantom_files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "warped.nii.gz").write_bytes(b"keep me")
    before = checksums(tmp_path)
    args = ["register", "--fixed", str(phantom_files["fixed"]), "--moving", str(phantom_files["moving"]),
            "--out", str(out), "--model", str(phantom_files["model"]), "--device", "cpu"]
    assert main(args) == 3
    assert capsys.readouterr().err == (f"lungudrnet: error: output {out.resolve() / 'warped.nii.gz'}: already exists "
                                       "(use --overwrite to replace it)\n")
    assert checksums(tmp_path) == before  # the existing result and the inputs unchanged, nothing added
    assert main(args + ["--overwrite"]) == 0
    assert (out / "warped.nii.gz").read_bytes() != b"keep me"


def test_console_script_exit_status(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "LungUDRNetLib.cli", "register", "--fixed", "a.nii",
                                "--moving", "b.nii", "--out", str(tmp_path / "o")],
                               capture_output=True, text=True, encoding="utf-8", cwd=tmp_path)
    assert completed.returncode == 2
    assert "fixed image a.nii: file not found" in completed.stderr


def test_the_program_returns_the_exit_status_and_freezes_the_objects_left(monkeypatch):
    """The console script ends the process faster: after the command, the objects left are frozen out of the
    garbage collector's final passes."""
    monkeypatch.setattr(sys, "argv", ["lungudrnet", "register", "--fixed", "a.nii", "--moving", "b.nii",
                                      "--out", "o"])
    try:
        assert program() == 2
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


OFFLINE_CLI = """
import socket, sys
def refuse(*args, **kwargs):
    raise RuntimeError("network access attempted")
socket.socket.connect = socket.socket.connect_ex = socket.getaddrinfo = socket.create_connection = refuse
try:
    socket.create_connection(("127.0.0.1", 9))
    sys.exit("the network was not blocked")
except RuntimeError:
    pass
from LungUDRNetLib.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("flag, shown, hidden", [
    ("--quiet", [], ["INFO", "DEBUG"]),
    (None, [r"INFO LungUDRNetLib: \[100%\] done"], ["DEBUG"]),
    ("--verbose", [r"INFO LungUDRNetLib: \[100%\] done",
                   r"DEBUG LungUDRNetLib.registration: network grid 32x32x32 on cpu; seconds: read [\d.]+, "],
     []),
])
def test_cli_register_runs_offline_and_logs_at_the_chosen_level(phantom_files, tmp_path, flag, shown, hidden):
    args = ["register", "--fixed", str(phantom_files["fixed"]), "--moving", str(phantom_files["moving"]),
            "--model", str(phantom_files["model"]), "--device", "cpu", "--out", str(tmp_path / "out")]
    completed = subprocess.run([sys.executable, "-c", OFFLINE_CLI, *([flag] if flag else []), *args],
                               capture_output=True, text=True, encoding="utf-8", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert f"results in {tmp_path / 'out'}" in completed.stdout
    for pattern in shown:
        assert re.search(pattern, completed.stderr), completed.stderr
    for level in hidden:
        assert level not in completed.stderr, completed.stderr


REGISTER_ARGS = ["--fixed", "f.nii", "--moving", "m.nii", "--out", "out"]


@pytest.mark.parametrize("argv, verbose, quiet", [
    (["register", "--verbose", *REGISTER_ARGS], True, False),
    (["-q", "register", *REGISTER_ARGS], False, True),
    (["register", *REGISTER_ARGS], False, False),
    (["demo", "-q"], False, True),
    (["lung-mask", "--image", "ct.nii", "--out", "mask.nii.gz", "-v"], True, False),
    (["train", "--quiet"], False, True),
    (["evaluate", "--model", "m.pt", "--data", "data", "--verbose"], True, False),
    (["-v", "bench"], True, False),
    (["bench", "-q"], False, True),
])
def test_verbosity_goes_before_or_after_every_subcommand(argv, verbose, quiet):
    args = build_parser().parse_args(argv)
    assert (args.verbose, args.quiet) == (verbose, quiet)


def test_core_commands_are_the_parsers_without_plugins():
    """CORE_COMMANDS, which decides when the plugins are imported, names exactly the core's own parsers."""
    subparsers = next(action for action in build_parser(plugins=False)._actions
                      if isinstance(action, argparse._SubParsersAction))
    assert sorted(subparsers.choices) == sorted(CORE_COMMANDS)


@pytest.mark.parametrize("argv, imported", [
    (["-v", "register", "--help"], False),
    (["demo", "--help"], False),
    (["lung-mask", "--help"], False),
    (["bench", "--help"], True),
    (["--progress-json", "evaluate", "--help"], True),
])
def test_plugins_are_imported_only_for_their_commands(argv, imported):
    """A core command does not pay for importing the bench and the trainer (a fresh interpreter each)."""
    code = (f"import sys\nfrom LungUDRNetLib.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            "print([name in sys.modules for name in ('LungUDRNetBench.command', 'LungUDRNetTrainerLib.commands')],"
            " file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stderr.strip().splitlines()[-1] == str([imported, imported])


def test_verbose_after_register_reaches_the_input_check(tmp_path, capsys):
    status = main(["register", "--verbose", "--fixed", str(tmp_path / "nope.nii.gz"), "--moving",
                   str(tmp_path / "nope.nii.gz"), "--out", str(tmp_path / "out")])
    assert status == 2
    assert capsys.readouterr().err == f"lungudrnet: error: fixed image {tmp_path / 'nope.nii.gz'}: file not found\n"


def test_verbose_and_quiet_exclude_each_other_across_levels(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["-v", "bench", "-q"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.endswith("lungudrnet: error: --verbose and --quiet exclude each other\n")


def test_version_is_the_installed_package_version(capsys):
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8")
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert version("lungudrnet") == re.search(r'^version = "(.+)"$', pyproject, re.MULTILINE).group(1)
    assert capsys.readouterr().out == f"lungudrnet {version('lungudrnet')}\n"


def _help(argv: list[str], capsys, monkeypatch) -> str:
    """The help text of ``argv`` with its whitespace collapsed (independent of line wrapping)."""
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as exit:
        main([*argv, "--help"])
    assert exit.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_top_level_help_is_plain_text_listing_every_subcommand(capsys, monkeypatch):
    text = _help([], capsys, monkeypatch)
    commands = text.split("Commands: ", 1)[1].split(";", 1)[0].split(", ")
    assert sorted(commands) == ["bench", "demo", "evaluate", "lung-mask", "register", "train"]
    assert "``" not in text


# Each default once, right before the next option's name.
@pytest.mark.parametrize("command, expected", [
    ("register", "--device DEVICE auto, cpu, cuda or mps (default: auto) --fixed-mask"),
    ("register", "mm grid; more: slower, rarely more exact) --displacement-grid"),
    ("register", "(12 bytes per fixed voxel) (default: native) --no-affine"),
    ("demo", "--out OUT output folder (default: demo_output) --device DEVICE auto, cpu, cuda or mps (default: auto) "
             "--model"),
    ("lung-mask", "--overwrite replace an existing mask file"),
    ("train", "held out when the data has no validation pairs (paper: 0.2) --augment-pairs"),
    ("evaluate", "which pairs (default: val) --out OUT folder for the CSV and Markdown tables (default: evaluation) "
                 "--device"),
    ("bench", "--out OUT output folder (default: bench_results) --quick"),
    ("bench", "--pairs N number of synthetic breathing pairs on the Learn2Reg grid (default: 6) --groups"),
    ("bench", "--repeats REPEATS timed runs per method and pair (median) (default: 3) --warmup WARMUP untimed runs "
              "before the timed ones (default: 1) --slow-seconds"),
    ("bench", "--threads THREADS CPU threads, the same for every method (default: 2) --timeout TIMEOUT seconds per "
              "method and pair (default: 3600.0) --weights"),
    ("bench", "iterations per resolution of elastix (Par0011 uses 1000) (default: 500)"),
])
def test_subcommand_help_shows_each_default_once(command, expected, capsys, monkeypatch):
    text = _help([command], capsys, monkeypatch)
    assert expected in text
    assert not re.search(r"default: (None|False|True|==SUPPRESS==)", text)
