"""`lungudrnet register --pairs`: a cohort of small phantom pairs from a pairs CSV, with a broken pair, resume,
worker processes and two torchrun-style ranks on the CPU (gloo); the CSV's errors."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from LungUDRNetLib.checkpoint import save_checkpoint, untrained_model
from LungUDRNetLib.cli import main
from LungUDRNetLib.cohort import SUMMARY_COLUMNS, read_summary
from LungUDRNetLib.errors import InputError
from LungUDRNetLib.geometry import warp_image
from LungUDRNetLib.io import write_image
from LungUDRNetLib.outputs import RESULT_FILES
from LungUDRNetLib.pairs_csv import read_pairs_csv
from LungUDRNetLib.phantom import analytic_field, chest_phantom, lung_mask_phantom, make_grid
from LungUDRNetLib.preprocess import PreprocessConfig

HEADER = "name,fixed,moving,fixed_mask,moving_mask,fixed_points,moving_points"
NAMES = ["case_a", "002_c1", "case_c"]  # the second row has no name: row number and case name
POINTS = ("10,10,10\n14,12,9\n18,15,12\n", "10,10,11\n14,12,10\n18,15,13\n")  # voxel x, y, z
METRICS = [  # summary column -> its place in metrics.json
    ("ncc_before_percent", ("before", "ncc_percent")), ("ncc_after_percent", ("after", "ncc_percent")),
    ("lung_ncc_before_percent", ("before", "lung_ncc_percent")), ("lung_ncc_after_percent", ("after", "lung_ncc_percent")),
    ("dice_before_percent", ("before", "dice_percent")), ("dice_after_percent", ("after", "dice_percent")),
    ("folding_percent", ("jacobian", "folding_percent")), ("runtime_s", ("runtime_s", "total")),
]


def write_cohort(folder: Path) -> Path:
    """Three phantom pairs (28 x 26 x 22 voxels) with lung masks under ``folder/data``, points for the first
    two, a tiny untrained model and ``pairs.csv`` with relative paths; returns the CSV."""
    data = folder / "data"
    data.mkdir(parents=True)
    lines = [HEADER]
    for case, name in enumerate(("case a", "", "case/c")):
        moving = chest_phantom(make_grid((28, 26, 22), (2.4, 2.6, 3.2), (-34.0, -34.0, -36.0)), seed=case)
        fixed = warp_image(moving, analytic_field(moving, translation_mm=(0.0, 0.0, 2.0 + case), amplitude_mm=1.0))
        for phase, image in enumerate((fixed, moving)):
            write_image(image, data / f"c{case}_000{phase}.nii.gz")
            write_image(lung_mask_phantom(image), data / f"c{case}_mask{phase}.nii.gz")
            (data / f"c{case}_points{phase}.csv").write_text(POINTS[phase])
        points = f"data/c{case}_points0.csv,data/c{case}_points1.csv" if case < 2 else ","
        lines.append(f"{name},data/c{case}_0000.nii.gz,data/c{case}_0001.nii.gz,data/c{case}_mask0.nii.gz,"
                     f"data/c{case}_mask1.nii.gz,{points}")
    save_checkpoint(folder / "model.pt", untrained_model()[0], PreprocessConfig(grid_shape=(32, 32, 32)))
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")
    return folder / "pairs.csv"


def cohort_args(pairs: Path, out: Path, *extra: str, model: Path | None = None) -> list[str]:
    """``register --pairs`` on the CPU, the cohort's model alone (no affine stage, no instance optimisation: faster,
    and the points stay where the model puts them)."""
    return ["register", "--pairs", str(pairs), "--out", str(out), "--model", str(model or pairs.parent / "model.pt"),
            "--device", "cpu", "--no-affine", "--fast", "-q", *extra]


def mtimes(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return write_cohort(tmp_path_factory.mktemp("cohort"))


@pytest.fixture(scope="module")
def first_run(cohort) -> Path:
    """The cohort registered in this process (``--jobs 1``)."""
    out = cohort.parent / "out_jobs1"
    assert main(cohort_args(cohort, out)) == 0
    return out


def test_summary_holds_each_pairs_metrics_and_the_tre_where_points_are_given(first_run, cohort, capsys):
    rows = read_summary(first_run / "summary.csv")
    assert list(rows[0]) == list(SUMMARY_COLUMNS)
    assert [row["pair"] for row in rows] == NAMES and [row["row"] for row in rows] == ["1", "2", "3"]
    assert [row["status"] for row in rows] == ["ok"] * 3 and {row["error"] for row in rows} == {""}
    for row in rows:
        assert sorted(p.name for p in (first_run / row["pair"]).iterdir()) == sorted(RESULT_FILES)
        report = json.loads((first_run / row["pair"] / "metrics.json").read_text())
        for column, (section, key) in METRICS:
            assert float(row[column]) == report[section][key], column
        assert row["kept_stage"] == report["stages"]["kept"] == "network"  # --no-affine --fast
        assert (row["device"], row["rank"]) == ("cpu", "0") and report["cohort"]["rank"] == 0
        assert report["cohort"]["fixed"] == row["fixed"] and row["fixed"].startswith("data/")
        if row["pair"] == "case_c":  # no points in the CSV
            assert (row["tre_before_mm"], row["tre_after_mm"]) == ("", "") and "tre_mm" not in report["after"]
        else:
            # Points 1 voxel apart along z (3.2 mm); an untrained network hardly moves them.
            assert float(row["tre_before_mm"]) == report["before"]["tre_mm"]["mean"] == pytest.approx(3.2)
            assert float(row["tre_after_mm"]) == report["after"]["tre_mm"]["mean"] == pytest.approx(3.2, abs=0.01)
        assert 0 < float(row["ncc_before_percent"]) <= 100 and float(row["dice_after_percent"]) > 50


def test_two_worker_processes_give_the_results_of_one_and_overwrite_redoes_every_pair(first_run, cohort, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(first_run, out)  # finished pairs, which only --overwrite redoes
    before = {name: mtimes(out / name) for name in NAMES}
    assert main(cohort_args(cohort, out, "--jobs", "2", "--overwrite")) == 0
    for name in NAMES:
        after = mtimes(out / name)
        assert all(after[file] != before[name][file] for file in RESULT_FILES), name  # all rewritten
    ours, reference = read_summary(out / "summary.csv"), read_summary(first_run / "summary.csv")
    assert len(ours) == len(reference) == 3
    for row, expected in zip(ours, reference):
        for column in SUMMARY_COLUMNS:
            if column in ("runtime_s",):
                continue
            if column.endswith(("_percent", "_mm")) and expected[column]:
                assert float(row[column]) == pytest.approx(float(expected[column]), rel=1e-5, abs=1e-6), column
            else:
                assert row[column] == expected[column], column


def test_a_broken_pair_fails_alone_and_a_rerun_redoes_only_the_unfinished_pairs(cohort, tmp_path, capsys):
    data = cohort.parent / "data"
    pairs = tmp_path / "pairs.csv"  # the cohort with absolute paths, but the second moving image is broken
    pairs.write_text(cohort.read_text().replace("data/", f"{data}/").replace(f"{data}/c1_0001", "broken"))
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    names = ["case_a", "002_c1_0000__broken", "case_c"]
    out = tmp_path / "out"
    args = cohort_args(pairs, out, model=cohort.parent / "model.pt")
    assert main(args) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (f"lungudrnet: error: 1 of 3 pairs failed "
                                                        f"(see {out / 'summary.csv'})")
    rows = read_summary(out / "summary.csv")
    assert [(row["pair"], row["status"]) for row in rows] == [(names[0], "ok"), (names[1], "failed"),
                                                              (names[2], "ok")]
    assert rows[1]["error"] == (f"moving image {broken}: cannot be read as an image (not a NIfTI, NRRD, "
                                "MetaImage or DICOM file, or its header is corrupt)")
    assert [row["ncc_after_percent"] == "" for row in rows] == [False, True, False]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "summary.csv"])
    assert [name for name in names if (out / name / "metrics.json").is_file()] == [names[0], names[2]]
    assert json.loads((out / names[1] / "error.json").read_text())["error"] == rows[1]["error"]

    # Repair the broken image and lose a file of a finished pair (as in a crash): only those two are redone.
    shutil.copyfile(data / "c1_0001.nii.gz", broken)
    (out / names[2] / "warped.nii.gz").unlink()
    kept = mtimes(out / names[0])
    assert main(args) == 0
    assert capsys.readouterr().out == f"3 pairs registered (1 done before); summary in {out / 'summary.csv'}\n"
    assert mtimes(out / names[0]) == kept
    for name in names[1:]:
        assert sorted(p.name for p in (out / name).iterdir()) == sorted(RESULT_FILES)  # error.json gone
    assert [row["status"] for row in read_summary(out / "summary.csv")] == ["ok"] * 3


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_torchrun_ranks_share_the_pairs_and_rank_0_writes_the_summary(first_run, cohort, tmp_path):
    out = tmp_path / "out"
    args = [a for a in cohort_args(cohort, out) if a not in ("--device", "cpu", "-q")]  # auto: CPU here, gloo
    port = _free_port()
    ranks = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "CUDA_VISIBLE_DEVICES": ""}
        ranks.append(subprocess.Popen([sys.executable, "-m", "LungUDRNetLib.cli", *args], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8"))
    outputs = [process.communicate(timeout=300) for process in ranks]
    assert [process.returncode for process in ranks] == [0, 0], outputs
    expected_rank = {"case_a": 0, "002_c1": 1, "case_c": 0}  # pair i -> rank i % 2
    for rank, (stdout, stderr) in enumerate(outputs):
        done = [name for name in NAMES if f"pair {name}: NCC" in stderr]
        assert done == [name for name, owner in expected_rank.items() if owner == rank]
        assert all(stderr.count(f"pair {name}: NCC") == 1 for name in done)
    assert outputs[0][0] == f"3 pairs registered; summary in {out / 'summary.csv'}\n"
    assert outputs[1][0] == ""  # rank 1 writes no summary and reports nothing
    rows = read_summary(out / "summary.csv")
    assert [(row["pair"], row["status"], int(row["rank"])) for row in rows] == [
        (name, "ok", rank) for name, rank in expected_rank.items()]
    for row, reference in zip(rows, read_summary(first_run / "summary.csv")):
        assert json.loads((out / row["pair"] / "metrics.json").read_text())["cohort"]["rank"] == int(row["rank"])
        assert float(row["ncc_after_percent"]) == pytest.approx(float(reference["ncc_after_percent"]), rel=1e-5)


def test_pairs_csv_errors_name_the_file_row_and_column(cohort, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    cases = [
        ("fixed,fixed_mask\na.nii.gz,m.nii.gz\n", "the header has no moving column (columns: fixed, fixed_mask)"),
        ("fixed,moving,weight\na.nii.gz,b.nii.gz,1\n", "unknown columns ['weight'] in the header"),
        ("fixed,moving\na.nii.gz,b.nii.gz\n\nc.nii.gz,\n", "row 2 (line 4), column moving: empty"),
        ("fixed,moving,split\na.nii.gz,b.nii.gz,later\n", "row 1 (line 2), column split: 'later' is not train"),
        ("a.nii.gz,b.nii.gz,,,,,extra\n", "row 1 (line 1): has a value ('extra') in a column without a name"),
        ("name,fixed,moving\nx,a.nii.gz,b.nii.gz\nX,c.nii.gz,d.nii.gz\n",
         "row 2 (line 3), column name: its folder name 'X' is that of row 1 (line 2)"),
    ]
    for text, expected in cases:
        bad.write_text(text)
        assert main(cohort_args(bad, tmp_path / "out", model=cohort.parent / "model.pt")) == InputError.exit_code
        error = capsys.readouterr().err
        assert error.startswith(f"lungudrnet: error: pairs file {bad}") and expected in error, error
        assert len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists()

    # A file that is not there fails its pair (one line naming the CSV, row and column); the others go on.
    missing = tmp_path / "missing.csv"
    missing.write_text(f"fixed,moving\n{cohort.parent / 'data' / 'c0_0000.nii.gz'},absent.nii.gz\n")
    assert main(cohort_args(missing, tmp_path / "out", model=cohort.parent / "model.pt")) == 1
    (row,) = read_summary(tmp_path / "out" / "summary.csv")
    assert (row["pair"], row["status"]) == ("001_c0_0000__absent", "failed")
    assert row["error"] == f"pairs file {missing}, row 1 (line 2), column moving: file {tmp_path / 'absent.nii.gz'} " \
                           "not found"
    assert capsys.readouterr().err.endswith("lungudrnet: error: 1 of 1 pairs failed "
                                            f"(see {tmp_path / 'out' / 'summary.csv'})\n")
    assert [row.number for row in read_pairs_csv(missing)] == [1]


@pytest.mark.parametrize("argv, expected", [
    (["--pairs", "p.csv", "--fixed", "f.nii"], "--pairs registers the pairs of a CSV; leave out --fixed"),
    ([], "the following arguments are required: --fixed, --moving (or --pairs CSV for a cohort)"),
    (["--fixed", "f.nii"], "the following arguments are required: --moving (or --pairs CSV for a cohort)"),
    (["--fixed", "f.nii", "--moving", "m.nii", "--jobs", "2"], "--jobs is for a cohort (--pairs)"),
    (["--pairs", "p.csv", "--fixed-mask", "m.nii"], "--fixed-mask is for one pair; with --pairs give masks in"),
    (["--pairs", "p.csv", "--jobs", "0"], "--jobs must be at least 1, not 0"),
])
def test_one_pair_or_a_cohort_is_a_usage_error_otherwise(argv, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["register", "--out", str(tmp_path / "out"), *argv])
    assert exit.value.code == 2
    assert f"lungudrnet register: error: {expected}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
