"""Smoke test of the benchmark (tiny phantom pairs, identity + UDRNet + SimpleITK demons) and its rows of
``register`` with and without instance optimisation; speed is measured by `lungudrnet bench`, never
asserted here."""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk

from LungUDRNetLib import register
from LungUDRNetBench.command import add_parser
from LungUDRNetBench.data import read_pair, tiny_pairs
from LungUDRNetBench.peers import Options, udrnet_pipeline, udrnet_pipeline_fast
from LungUDRNetBench.runner import Job, run_job, time_command
from LungUDRNetLib.geometry import transform_points


def _bench_args(out) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["bench", "--quick", "--out", str(out), "--warmup", "0"])


def test_quick_bench_writes_tables_and_ranks_methods(tmp_path):
    args = _bench_args(tmp_path)
    rows = args.run(args)
    assert {(r["method"], r["pair"]) for r in rows} == {(m, p) for m in ("identity", "udrnet", "sitk-demons")
                                                       for p in ("tiny0", "tiny1")}
    assert all(r["error"] is None for r in rows)
    tre = {r["method"]: r["tre_mean_mm"] for r in rows if r["pair"] == "tiny0"}
    assert tre["identity"] > 2.0  # the generator moved the landmarks
    assert tre["sitk-demons"] < 0.8 * tre["identity"]  # a real registration beats the floor
    assert all(r["process_s"] > r["median_s"] > 0 and r["peak_rss_mb"] > 50 for r in rows)
    with (tmp_path / "results.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 6
    table = (tmp_path / "results.md").read_text()
    assert "| sitk-demons | 2 |" in table and "threads 2" in table and "timed runs per pair" in table
    assert all(r["timed_runs"] == 1 for r in rows)
    assert (tmp_path / "tre_vs_time.png").stat().st_size > 1000


def test_child_failure_is_a_row_not_a_crash(tmp_path):
    result = run_job(Job("identity", str(tmp_path / "no_such_pair"), str(tmp_path / "run"), repeats=1))
    assert result.error is not None and "failed" in result.error
    assert np.isnan(result.median_s)


def test_the_register_rows_also_time_the_command_itself(tmp_path):
    """``udrnet-fast`` is ``lungudrnet register --fast``: its command is run in a process of its own, which
    writes the command's three files; a row that is no command gets NaN."""
    pair = tiny_pairs(tmp_path / "pairs", count=1)[0]
    seconds = time_command(Job("udrnet-fast", str(pair), str(tmp_path / "run"), threads=1))
    assert seconds > 0
    written = json.loads((tmp_path / "run" / "command" / "metrics.json").read_text())
    assert written["runtime_s"]["total"] < seconds and "instance optimisation" not in written["runtime_s"]
    assert (tmp_path / "run" / "command" / "displacement.nii.gz").stat().st_size > 0
    assert np.isnan(time_command(Job("sitk-demons", str(pair), str(tmp_path / "demons"))))


@pytest.mark.parametrize("slow_s, timed_runs", [(float("inf"), 3), (0.0, 1)])
def test_slow_methods_get_fewer_timed_runs(tmp_path, slow_s, timed_runs):
    pair = tiny_pairs(tmp_path / "pairs", count=1)[0]
    result = run_job(Job("identity", str(pair), str(tmp_path / "run"), threads=1, repeats=3, warmup=1,
                         slow_s=slow_s))
    assert result.error is None
    assert len(result.times_s) == timed_runs  # slow_s = 0: the warm-up is the one timed run


def test_instance_optimisation_lowers_udrnet_tre_in_register_and_the_bench(tmp_path):
    pair = read_pair(tiny_pairs(tmp_path, count=1)[0])

    def tre(field) -> float:
        moved = transform_points(pair.fixed_points, field)
        return float(np.linalg.norm(moved - pair.moving_points, axis=1).mean())

    fast = register(pair.fixed, pair.moving, device="cpu", fast=True)
    default = register(pair.fixed, pair.moving, device="cpu")
    assert default.displacement.GetSize() == pair.fixed.GetSize()
    assert tre(default.displacement) < 0.8 * tre(fast.displacement)
    assert "instance optimisation" in default.kept_stage and "instance optimisation" not in fast.kept_stage
    assert "instance optimisation" not in fast.timings and default.timings["instance optimisation"] > 0
    # The bench's rows run the same registrations.
    for method, result in ((udrnet_pipeline, default), (udrnet_pipeline_fast, fast)):
        row = method(pair.fixed, pair.moving, Options())
        np.testing.assert_allclose(sitk.GetArrayFromImage(row.displacement),
                                   sitk.GetArrayFromImage(result.displacement), atol=1e-3)
        np.testing.assert_allclose(sitk.GetArrayFromImage(row.warped), sitk.GetArrayFromImage(result.warped),
                                   atol=1e-3)
