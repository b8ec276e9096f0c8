"""Evaluation of checkpoints on registration pairs: per-pair tables and the paper's summary tables.

Every pair goes through the full :func:`LungUDRNetLib.registration.register`
pipeline (what users get) and :func:`LungUDRNetLib.report.registration_report`:

* 1-MSE (%) and NCC (%) on the windowed, min-max normalised images on the
  fixed image's grid, on the overlap of the two scans (``registration_report``'s
  ``ncc_percent``: on Learn2Reg's shared grid, every voxel but those the field
  maps out of the scan, the closest to the paper's whole-image scores, which
  it computes on its 192^3 network grid as the trainer's validation does), and
  Dice (%) of the lung masks (moving mask warped with nearest neighbour) --
  the paper's section 4.3. The rows also hold the lung values
  (``lung_ncc_percent``, ...) and ``overlap_percent``, which the tables leave out;
* TRE (mm) per point set (Learn2Reg ``keypoints``, ``landmarks``, or the pairs
  CSV's ``points``): the mean physical distance between each fixed point p
  mapped to p + u(p) and its moving point, both in LPS mm. For Learn2Reg,
  where fixed and moving share one voxel grid, this equals the challenge's
  TRE (voxel displacement scaled by the moving spacing);
* SDlogJ and % folded voxels (det J <= 0) of the field in voxels of the fixed grid.

"Before" is the identity (moving resampled onto the fixed grid, zero field).
Summaries are mean +- std (population std, ddof=0) over the pairs.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from pathlib import Path

import numpy as np

from LungUDRNetLib import metrics
from LungUDRNetLib.checkpoint import load_model
from LungUDRNetLib.errors import InputError, OutputError
from LungUDRNetLib.geometry import transform_points
from LungUDRNetLib.io import atomic_path, read_image
from LungUDRNetLib.model import UDRNet
from LungUDRNetLib.output_folder import output_lock
from LungUDRNetLib.outputs import check_output_dir
from LungUDRNetLib.pairs_csv import read_points_lps
from LungUDRNetLib.preprocess import PreprocessConfig, read_mask
from LungUDRNetLib.registration import register
from LungUDRNetLib.report import registration_report

from .config import MODEL_NAMES
from .datasets import PairRecord
from .pair_dataset import check_pairs

log = logging.getLogger(__name__)

# (row key without the before_/after_ prefix, table header, decimals), in the paper's column order.
METRICS = (
    ("one_minus_mse_percent", "1-MSE (%)", 2),
    ("ncc_percent", "NCC (%)", 2),
    ("dice_percent", "Dice (%)", 2),
    ("tre_keypoints_mm", "TRE keypoints (mm)", 2),
    ("tre_landmarks_mm", "TRE landmarks (mm)", 2),
    ("tre_points_mm", "TRE points (mm)", 2),
    ("sdlogj", "SDlogJ", 3),
    ("folding_percent", "Folded (%)", 3),
)
STATES = ("before", "after")
REPORT_FILE = "evaluation.md"


def evaluate_pair(net: UDRNet, preprocess: PreprocessConfig, pair: PairRecord, device: str = "auto") -> dict:
    """Register one pair and return its row: ``pair``, ``before_<metric>``, ``after_<metric>``, ``seconds``."""
    fixed = read_image(pair.fixed, f"pair {pair.name}: fixed image")
    moving = read_image(pair.moving, f"pair {pair.name}: moving image")
    fixed_mask = read_mask(pair.fixed_mask, fixed, f"pair {pair.name}: fixed mask") if pair.fixed_mask else None
    moving_mask = read_mask(pair.moving_mask, moving, f"pair {pair.name}: moving mask") if pair.moving_mask else None
    result = register(fixed, moving, model=net, device=device, fixed_mask=fixed_mask, moving_mask=moving_mask,
                      preprocess=preprocess, affine=False, fast=True, never_worse=False)  # the network as it is
    report = registration_report(fixed, moving, result, fixed_mask, moving_mask)
    row = {"pair": pair.name, "overlap_percent": report["overlap_percent"]}
    for state in STATES:
        row.update({f"{state}_{key}": value for key, value in report[state].items()})
    row.update(before_sdlogj=0.0, before_folding_percent=0.0,  # the identity neither stretches nor folds
               after_sdlogj=report["jacobian"]["sdlogj"], after_folding_percent=report["jacobian"]["folding_percent"])
    for kind, (fixed_file, moving_file) in pair.points.items():
        fixed_points, moving_points = read_points_lps(fixed_file, fixed), read_points_lps(moving_file, moving)
        if len(fixed_points) != len(moving_points):
            raise InputError(f"pair {pair.name}: {len(fixed_points)} fixed and {len(moving_points)} moving "
                             f"{kind}; rows must correspond one to one")
        mapped = transform_points(fixed_points, result.displacement)
        row[f"before_tre_{kind}_mm"] = float(metrics.target_registration_error(fixed_points, moving_points).mean())
        row[f"after_tre_{kind}_mm"] = float(metrics.target_registration_error(mapped, moving_points).mean())
    row["seconds"] = round(result.timings["total"], 3)
    return row


def summarise(rows: list[dict]) -> dict[str, tuple[float, float]]:
    """Mean and std over pairs of every numeric column (pairs lacking a metric are left out of it)."""
    keys = [k for k in dict.fromkeys(k for row in rows for k in row) if k != "pair"]
    summary = {}
    for key in keys:
        values = np.array([row[key] for row in rows if isinstance(row.get(key), (int, float))], dtype=float)
        values = values[np.isfinite(values)]
        if values.size:
            summary[key] = (float(values.mean()), float(values.std()))
    return summary


def _format(value: float | None, decimals: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{decimals}f}"


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


def _columns(keys) -> list[tuple[str, str, int]]:
    """The :data:`METRICS` that occur (before or after) among ``keys``."""
    return [m for m in METRICS if any(f"{s}_{m[0]}" in keys for s in STATES)]


def summary_table(methods: list[tuple[str, dict]]) -> str:
    """The paper's Table 1/3 layout: one row per method (mean +- std), after an identity row."""
    columns = _columns({k for _, summary in methods for k in summary})

    def cells(summary: dict, state: str) -> list[str]:
        values = [summary.get(f"{state}_{key}") for key, _, _ in columns]
        return ["-" if v is None else f"{_format(v[0], d)} ± {_format(v[1], d)}" for v, (_, _, d) in
                zip(values, columns)]

    body = [["Before registration (identity)", *cells(methods[0][1], "before")]]
    body += [[name, *cells(summary, "after")] for name, summary in methods]
    return _markdown(["Method", *(header for _, header, _ in columns)], body)


def pairs_table(rows: list[dict]) -> str:
    """Per-pair Markdown table: before -> after for every metric."""
    columns = _columns({k for row in rows for k in row})
    body = [[row["pair"], *(f"{_format(row.get(f'before_{k}'), d)} → {_format(row.get(f'after_{k}'), d)}"
                            for k, _, d in columns)] for row in rows]
    return _markdown(["Pair", *(header for _, header, _ in columns)], body)


def _csv(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def model_label(path: str | Path) -> str:
    """A file-name-safe label: the run folder for ``RUN/best.pt`` or ``RUN``, else the file stem."""
    path = Path(path)
    name = path.name if path.is_dir() else path.parent.name if path.name == "best.pt" else path.stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "model"


def evaluate_checkpoint(checkpoint: str | Path, pairs: list[PairRecord], device: str = "auto",
                        model: tuple | None = None) -> dict:
    """Rows and summary of one checkpoint: ``label``, ``name`` (the method), ``attention``, ``rows``,
    ``summary``. ``model``: the checkpoint as :func:`load_model` returns it, when loaded already."""
    net, preprocess, _ = model or load_model(checkpoint)
    label = model_label(checkpoint)
    rows = []
    for number, pair in enumerate(pairs, start=1):
        rows.append(evaluate_pair(net, preprocess, pair, device))
        log.info("[%s %d/%d] %s: NCC %.2f%% -> %.2f%%", label, number, len(pairs), pair.name,
                 rows[-1]["before_ncc_percent"], rows[-1]["after_ncc_percent"])
    return {"label": label, "name": MODEL_NAMES["udrnet" if net.config.attention else "voxelmorph"],
            "attention": net.config.attention, "rows": rows, "summary": summarise(rows)}


def evaluate_models(checkpoints: list[str | Path], pairs: list[PairRecord], out_dir: Path, device: str = "auto",
                    overwrite: bool = False) -> str:
    """Evaluate each checkpoint on ``pairs``; write ``pairs_<label>.csv``, ``summary.csv`` and
    ``evaluation.md`` into ``out_dir``; return the summary table (baseline rows before scHAF rows).

    The folder and every model are checked before any work, and the folder is made only to write the
    tables: a run that fails creates nothing.
    """
    check_output_dir(out_dir, [], overwrite, (REPORT_FILE,))
    models = [load_model(checkpoint) for checkpoint in checkpoints]
    check_pairs(pairs)
    results = []
    for checkpoint, model in zip(checkpoints, models):
        result = evaluate_checkpoint(checkpoint, pairs, device, model)
        while result["label"] in {r["label"] for r in results}:
            result["label"] += "_2"
        results.append(result)
    results.sort(key=lambda r: r["attention"])  # the baseline first, as in the paper's Table 3
    names = [r["name"] for r in results]
    for result in results:
        result["method"] = f"{result['name']} [{result['label']}]" if names.count(result["name"]) > 1 else result["name"]
    table = summary_table([(r["method"], r["summary"]) for r in results])
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"output folder {out_dir}: cannot be created ({error.strerror})") from None
    with output_lock(out_dir):
        check_output_dir(out_dir, [], overwrite, (REPORT_FILE,))  # again: another run may have finished meanwhile
        _write_outputs(out_dir, results, table, len(pairs))
    return table


def _write_outputs(out_dir: Path, results: list[dict], table: str, pair_count: int) -> None:
    """The per-pair CSVs, the summary CSV and the Markdown report, each written atomically."""
    sections = [f"# Evaluation on {pair_count} pairs\n\nMean ± std over pairs.\n\n{table}\n"]
    sections += [f"## {r['method']}: per pair (before → after)\n\n{pairs_table(r['rows'])}\n" for r in results]
    summary_rows = [{"method": r["method"], "pairs": pair_count,
                     **{f"{key}_{stat}": value[i] for key, value in r["summary"].items()
                        for i, stat in enumerate(("mean", "std"))}} for r in results]
    outputs = {f"pairs_{r['label']}.csv": _csv(r["rows"]) for r in results}
    outputs.update({"summary.csv": _csv(summary_rows), REPORT_FILE: "\n".join(sections)})
    for file_name, text in outputs.items():
        with atomic_path(out_dir / file_name) as temporary:
            temporary.write_text(text, encoding="utf-8")
