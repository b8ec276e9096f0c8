"""Registering a cohort: every pair of a pairs CSV (:mod:`.pairs_csv`), ``lungudrnet register --pairs``.

``OUT/<pair>/`` holds what a single ``register`` writes (``warped.nii.gz``,
``displacement.nii.gz``, ``metrics.json`` with a ``cohort`` entry: pair, row,
rank, the CSV's fixed and moving cells), or ``error.json`` when the pair
failed. ``OUT/summary.csv`` has one row per pair (:data:`SUMMARY_COLUMNS`).

* Resume: a pair whose folder holds all result files, a valid ``metrics.json``
  of this row and no ``error.json`` is skipped; any other is (re)done.
* A failing pair is recorded and the others go on.
* One run at a time: ``OUT`` is locked (:func:`.output_folder.output_lock`); a
  second run into it is refused while the first runs.
* ``jobs`` > 1: that many worker processes ("spawn"), each with
  max(1, CPUs // jobs) torch threads.
* Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``): pair i is
  done by rank i % WORLD_SIZE on ``cuda:LOCAL_RANK`` (CPU without CUDA); a
  gloo barrier, then rank 0 writes the summary from the pairs' folders.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import multiprocessing
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from . import progress_events
from .errors import CancelledError, InputError, LungUDRNetError
from .io import atomic_path, write_json
from .output_folder import output_lock
from .pairs_csv import PairRow, pair_name, read_pairs_csv, read_points_lps
from .register_files import Options, read_inputs

if TYPE_CHECKING:  # imported where used: it loads torch
    from .ranks import Ranks

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.csv"
ERROR_FILE = "error.json"
SUMMARY_COLUMNS = ("pair", "row", "status", "error", "ncc_before_percent", "ncc_after_percent",
                   "lung_ncc_before_percent", "lung_ncc_after_percent", "dice_before_percent", "dice_after_percent",
                   "tre_before_mm", "tre_after_mm", "folding_percent", "kept_stage", "runtime_s", "device", "rank",
                   "fixed", "moving")
MAX_NAME = 100  # characters of a pair's folder name
BARRIER_TIMEOUT = timedelta(hours=48)  # the longest a rank waits for the others to finish their pairs
_RESERVED = re.compile(r"^(con|prn|aux|nul|com\d|lpt\d)(\..*)?$", re.IGNORECASE)  # Windows device names


class CohortError(LungUDRNetError):
    """Some pairs of a cohort failed (each one's error is in the summary)."""

    exit_code = 1


@dataclass(frozen=True)
class Task:
    """Pair ``index`` (0-based, CSV order) of the cohort, its folder and the rank that does it."""

    index: int
    row: PairRow
    name: str
    folder: Path
    rank: int


@dataclass(frozen=True)
class Outcome:
    """What a cohort run did; ``summary`` is None on the ranks that do not write it, ``skipped`` (pairs done
    before) None under torchrun (each rank knows only its own)."""

    total: int
    failed: int
    skipped: int | None
    summary: Path | None

    def message(self) -> str:
        """One line: how many pairs failed, or that all are done."""
        if self.failed:
            return f"{self.failed} of {self.total} pairs failed (see {self.summary})"
        before = "" if self.skipped is None else f" ({self.skipped} done before)"
        return f"{self.total} pairs registered{before}; summary in {self.summary}"


def folder_name(row: PairRow, width: int = 3) -> str:
    """A file-system-safe folder name: the ``name`` cell, else ``<row>_<fixed>__<moving>`` (file stems)."""
    given = row.cells.get("name")
    raw = given if given else f"{row.number:0{width}d}_{pair_name(row.files['fixed'], row.files['moving'])}"
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("._-")[:MAX_NAME].rstrip("._-") or f"pair_{row.number}"
    return f"_{name}" if _RESERVED.match(name) or name.lower() == SUMMARY_FILE else name


def plan(rows: list[PairRow], out_dir: Path, world_size: int = 1) -> list[Task]:
    """One task per row: folder name (unique, ignoring case) and rank (row index % ``world_size``)."""
    width = max(3, len(str(len(rows))))
    tasks, seen = [], {}
    for index, row in enumerate(rows):
        name = folder_name(row, width)
        if name.lower() in seen:
            first = seen[name.lower()]
            raise InputError(f"{row.where('name')}: its folder name {name!r} is that of row {first.number} (line "
                             f"{first.line}); give every pair its own name")
        seen[name.lower()] = row
        tasks.append(Task(index, row, name, out_dir / name, index % world_size))
    return tasks


def run_cohort(pairs_file: str | os.PathLike, out_dir: str | os.PathLike, options: Options = Options(),
               jobs: int = 1, overwrite: bool = False, progress: bool = True) -> Outcome:
    """Register every pair of ``pairs_file`` into ``out_dir`` (see the module docstring).

    Errors of the CSV itself (unknown or missing columns, empty cells) stop the
    run before any pair; a pair's own problem is its row's ``error``.
    """
    from .checkpoint import load_model
    from .outputs import check_output_dir
    from .ranks import Ranks

    rows = read_pairs_csv(pairs_file)
    if not rows:
        raise InputError(f"pairs file {Path(os.path.abspath(pairs_file))}: lists no pairs")
    if jobs < 1:
        raise InputError(f"jobs: must be at least 1, not {jobs}")
    ranks = Ranks.from_env()
    out_dir = check_output_dir(out_dir, [], True, (SUMMARY_FILE,))
    tasks = plan(rows, out_dir, ranks.world_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = ranks.device(options.device)  # a bad device or model stops the run here, not once per pair
    if ranks.distributed:
        options = replace(options, device=str(device))
    model = load_model(options.model)
    if ranks.distributed:
        return _run_rank(tasks, ranks, options, model, jobs, overwrite, progress)
    with output_lock(out_dir):
        return _run_here(tasks, out_dir, options, model, jobs, overwrite, progress)


def _run_here(tasks: list[Task], out_dir: Path, options: Options, model: tuple, jobs: int, overwrite: bool,
              progress: bool) -> Outcome:
    """All ``tasks`` in this process (and its workers), the summary rewritten after each pair."""
    summary = out_dir / SUMMARY_FILE
    results: dict[int, dict] = {}
    todo = []
    for task in tasks:
        report = None if overwrite else finished_report(task)
        if report is None:
            todo.append(task)
        else:
            results[task.index] = summary_row(task, report)
    write_summary(summary, tasks, results)

    def done(task: Task, row: dict) -> None:
        results[task.index] = row
        write_summary(summary, tasks, results)

    _run_tasks(todo, len(tasks) - len(todo), len(tasks), options, model, jobs, done, progress)
    failed = sum(row["status"] != "ok" for row in results.values())
    return Outcome(len(tasks), failed, len(tasks) - len(todo), summary)


def _run_rank(tasks: list[Task], ranks: Ranks, options: Options, model: tuple, jobs: int, overwrite: bool,
              progress: bool) -> Outcome:
    """This rank's share of ``tasks``; then, after all ranks, rank 0 writes the summary from the folders."""
    import torch.distributed as dist

    mine = [task for task in tasks if task.rank == ranks.rank]
    todo = [task for task in mine if overwrite or finished_report(task) is None]
    dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world_size, timeout=BARRIER_TIMEOUT)
    try:
        log.info("rank %d of %d: %d pairs (%d done before) on %s", ranks.rank, ranks.world_size, len(mine),
                 len(mine) - len(todo), options.device)
        _run_tasks(todo, len(mine) - len(todo), len(mine), options, model, jobs, lambda task, row: None,
                   progress and ranks.rank == 0)
        dist.barrier()  # every rank has finished its pairs
    finally:
        dist.destroy_process_group()
    if ranks.rank != 0:
        return Outcome(len(mine), 0, None, None)
    results = {task.index: folder_row(task) for task in tasks}
    summary = tasks[0].folder.parent / SUMMARY_FILE
    write_summary(summary, tasks, results)
    failed = sum(row["status"] != "ok" for row in results.values())
    return Outcome(len(tasks), failed, None, summary)


def _run_tasks(todo: list[Task], done_before: int, total: int, options: Options, model: tuple, jobs: int, done,
               progress: bool) -> None:
    """Register ``todo`` here with ``model`` (``jobs`` = 1) or in worker processes (each loads its own);
    ``done(task, row)`` after each pair."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    bar = tqdm(total=total, initial=done_before, desc="pairs", unit="pair", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    failed = 0

    def finish(task: Task, row: dict) -> None:
        nonlocal failed
        failed += row["status"] != "ok"
        if row["status"] == "ok":
            where = "lung_ncc" if row["lung_ncc_after_percent"] is not None else "ncc"  # as summary_line
            log.info("pair %s: NCC %s -> %s %%, %s s", task.name, _short(row[f"{where}_before_percent"]),
                     _short(row[f"{where}_after_percent"]), _short(row["runtime_s"]))
        else:
            log.warning("pair %s failed: %s", task.name, row["error"])
        done(task, row)
        bar.update()
        bar.set_postfix(failed=failed)
        progress_events.emit_progress(bar.n / total, f"{bar.n} of {total} pairs", stage="cohort")

    with bar, logging_redirect_tqdm():
        if jobs == 1 or len(todo) <= 1:
            for task in todo:
                finish(task, register_pair(task, options, model))
            return
        threads = max(1, _cpu_count() // jobs)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(jobs, len(todo)), context, _start_worker,
                                 (options, threads, logging.getLogger().level)) as pool:
            futures = {pool.submit(_worker_register, task): task for task in todo}
            try:
                for future in as_completed(futures):
                    task = futures[future]
                    try:
                        row = future.result()
                    except BrokenProcessPool:
                        row = _failed(task, "its worker process ended unexpectedly (killed, e.g. for lack of memory)")
                    finish(task, row)
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise


def _short(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _load(options: Options) -> tuple:
    from .checkpoint import load_model

    return load_model(options.model)


_worker: dict = {}  # the options and model of this worker process


def _start_worker(options: Options, threads: int, level: int) -> None:
    import torch

    from .cli import show_library_warnings

    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    show_library_warnings(level <= logging.DEBUG)
    torch.set_num_threads(threads)
    _worker.update(options=options, model=_load(options))


def _worker_register(task: Task) -> dict:
    return register_pair(task, _worker["options"], _worker["model"])


def register_pair(task: Task, options: Options, model: tuple) -> dict:
    """Register one pair into its folder; its summary row, ``status`` ok or failed (then ``error.json``)."""
    try:
        report = _register(task, options, model)
    except (KeyboardInterrupt, CancelledError):
        raise
    except MemoryError:
        message = "ran out of memory"
    except LungUDRNetError as error:
        message = str(error)
    except Exception as error:  # an unforeseen problem of this pair must not end the cohort
        log.debug("pair %s", task.name, exc_info=True)
        message = f"{type(error).__name__}: {error}"
    else:
        return summary_row(task, report)
    message = " ".join(message.split())  # one line
    try:
        write_json(_error_record(task, message), _mkdir(task.folder) / ERROR_FILE)
    except (OSError, LungUDRNetError) as error:
        log.warning("pair %s: %s could not be written (%s)", task.name, ERROR_FILE, error)
    return _failed(task, message)


def _mkdir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _register(task: Task, options: Options, model: tuple) -> dict:
    """The pair's ``register`` run, as ``lungudrnet register`` does it; returns its metrics."""
    from .outputs import check_output_dir

    row = task.row
    missing = row.missing_files()
    if missing:
        raise InputError(missing[0] + (f" (and {len(missing) - 1} more missing files)" if len(missing) > 1 else ""))
    paths = {"fixed image": row.files["fixed"], "moving image": row.files["moving"],
             "fixed mask": row.files.get("fixed_mask"), "moving mask": row.files.get("moving_mask")}
    check_output_dir(task.folder, list(row.files.values()), True)
    inputs = read_inputs(paths, options, model)
    points = _points(row, inputs.fixed, inputs.moving)
    result = inputs.register(options)
    cohort = {"pair": task.name, "row": row.number, "rank": task.rank, "fixed": row.cells["fixed"],
              "moving": row.cells["moving"]}
    report, _ = inputs.save(result, task.folder, options, overwrite=True, points=points, extra={"cohort": cohort})
    (task.folder / ERROR_FILE).unlink(missing_ok=True)
    return report


def _points(row: PairRow, fixed, moving) -> tuple:
    """The row's corresponding points (fixed, moving; N x 3 LPS mm), or (None, None)."""
    given = [column for column in ("fixed_points", "moving_points") if column in row.files]
    if not given:
        return None, None
    if len(given) == 1:
        other = "moving_points" if given[0] == "fixed_points" else "fixed_points"
        raise InputError(f"{row.where(other)}: empty, but {given[0]} is given; the TRE needs both point files")
    fixed_points = read_points_lps(row.files["fixed_points"], fixed)
    moving_points = read_points_lps(row.files["moving_points"], moving)
    if len(fixed_points) != len(moving_points):
        raise InputError(f"{row.where()}: {len(fixed_points)} fixed and {len(moving_points)} moving points; "
                         "rows must correspond one to one")
    return fixed_points, moving_points


def finished_report(task: Task) -> dict | None:
    """The pair's ``metrics.json`` if its folder holds a complete result of this row, else None."""
    from .outputs import RESULT_FILES

    folder = task.folder
    if (folder / ERROR_FILE).exists() or not all((folder / name).is_file() for name in RESULT_FILES):
        return None
    try:
        report = json.loads((folder / "metrics.json").read_text())
        summary_row(task, report)  # every key the summary needs
        same_pair = (report["cohort"]["fixed"], report["cohort"]["moving"]) == (task.row.cells["fixed"],
                                                                                task.row.cells["moving"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return report if same_pair else None


def folder_row(task: Task) -> dict:
    """The pair's summary row from its folder: its ``metrics.json``, else its ``error.json``."""
    report = finished_report(task)
    if report is not None:
        return summary_row(task, report)
    try:
        record = json.loads((task.folder / ERROR_FILE).read_text())
        return _failed(task, str(record["error"]), record.get("rank", task.rank))
    except (OSError, ValueError, KeyError, TypeError):
        return _failed(task, f"no result: rank {task.rank} did not finish this pair")


def summary_row(task: Task, report: dict) -> dict:
    """The summary row of a finished pair from its metrics (as in ``metrics.json``)."""
    before, after = report["before"], report["after"]

    def tre(state: dict):
        return state["tre_mm"]["mean"] if "tre_mm" in state else None

    return {**_base_row(task), "status": "ok", "error": "", "rank": report["cohort"]["rank"],
            "ncc_before_percent": before.get("ncc_percent"), "ncc_after_percent": after.get("ncc_percent"),
            "lung_ncc_before_percent": before.get("lung_ncc_percent"),
            "lung_ncc_after_percent": after.get("lung_ncc_percent"),
            "dice_before_percent": before.get("dice_percent"), "dice_after_percent": after.get("dice_percent"),
            "tre_before_mm": tre(before), "tre_after_mm": tre(after),
            "folding_percent": report["jacobian"]["folding_percent"], "kept_stage": report["stages"]["kept"],
            "runtime_s": report["runtime_s"]["total"], "device": report["device"]}


def _base_row(task: Task) -> dict:
    return {"pair": task.name, "row": task.row.number, "fixed": task.row.cells["fixed"],
            "moving": task.row.cells["moving"], "rank": task.rank}


def _failed(task: Task, message: str, rank: int | None = None) -> dict:
    return {**_base_row(task), "status": "failed", "error": message, "rank": task.rank if rank is None else rank}


def _error_record(task: Task, message: str) -> dict:
    return {"pair": task.name, "row": task.row.number, "rank": task.rank, "error": message}


def write_summary(path: Path, tasks: list[Task], results: dict[int, dict]) -> Path:
    """Write ``summary.csv`` atomically: one row per task in CSV order, ``pending`` where not done yet."""
    text = io.StringIO()
    writer = csv.DictWriter(text, SUMMARY_COLUMNS, restval="", lineterminator="\n")
    writer.writeheader()
    for task in tasks:
        row = results.get(task.index) or {**_base_row(task), "status": "pending", "rank": task.rank}
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    with atomic_path(path) as temporary:
        temporary.write_text(text.getvalue(), encoding="utf-8")
    return path


def read_summary(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a ``summary.csv`` (all values as text; empty = not known)."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))
