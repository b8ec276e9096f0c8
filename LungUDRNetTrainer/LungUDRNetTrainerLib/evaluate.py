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
from LungUDRNetLib.model import RegistrationUNet
from LungUDRNetLib.networks import METHOD_NAMES, PAPER_ORDER, model_name
from LungUDRNetLib.output_folder import output_lock
from LungUDRNetLib.outputs import check_output_dir
from LungUDRNetLib.pairs_csv import read_points_lps
from LungUDRNetLib.preprocess import PreprocessConfig, read_mask
from LungUDRNetLib.registration import register
from LungUDRNetLib.report import registration_report

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
HIGHER_IS_BETTER = {"one_minus_mse_percent", "ncc_percent", "dice_percent"}  # the other METRICS: lower is better
REPORT_FILE = "evaluation.md"
TOP = 5  # pairs of the paper's Table 2
# The paper's 1-MSE, NCC and Dice (%) per model: (Table 1, the mean over its validation pairs; Table 2, over
# its five best). Its Table 3 repeats the Table 1 rows of voxelmorph and udrnet.
PAPER = {
    "attunet": ((88.91, 89.72, 54.13), (90.86, 90.54, 58.34)),
    "resunet": ((89.60, 91.08, 54.55), (91.56, 91.84, 58.91)),
    "voxelmorph": ((89.72, 91.36, 54.67), (91.65, 92.04, 58.99)),
    "transunet": ((89.89, 91.45, 54.90), (91.79, 92.13, 59.20)),
    "udrnet": ((89.90, 91.49, 54.92), (91.82, 92.27, 59.27)),
}
TABLES_NOTE = (f"Each network alone, as in the paper. Table 2 reads the paper's \"top five best-performing data\" "
               f"per metric: for each method and metric, the mean over the {TOP} pairs best in that metric (highest "
               f"1-MSE, NCC, Dice; lowest TRE, SDlogJ, folding), so the pairs may differ between columns. The "
               f"paper's figures come from its own data (Learn2Reg LungCT at 192³); compare orderings, not values. "
               f"1-MSE and NCC are scored on the voxels that both the identity and the method's field map inside the "
               f"moving scan, so each method's own 'before' differs slightly; the identity row is the first "
               f"method's (every method's own is in its per-pair table).")


def evaluate_pair(net: RegistrationUNet, preprocess: PreprocessConfig, pair: PairRecord, device: str = "auto") -> dict:
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
    return {key: (float(values.mean()), float(values.std())) for key, values in _columns_of(rows).items()}


def best_pairs_mean(rows: list[dict], count: int = TOP) -> dict[str, float]:
    """Per column, the mean over the ``count`` pairs best in that column (highest 1-MSE, NCC, Dice; lowest
    TRE, SDlogJ, folding): the paper's Table 2 ("top five"), each metric ranked on its own."""
    means = {}
    for key, values in _columns_of(rows).items():
        metric = key.partition("_")[2]
        if metric in {m[0] for m in METRICS}:
            ordered = np.sort(values)
            means[key] = float((ordered[::-1] if metric in HIGHER_IS_BETTER else ordered)[:count].mean())
    return means


def _columns_of(rows: list[dict]) -> dict[str, np.ndarray]:
    """The finite values of every numeric column but ``pair``."""
    keys = [k for k in dict.fromkeys(k for row in rows for k in row) if k != "pair"]
    columns = {}
    for key in keys:
        values = np.array([row[key] for row in rows if isinstance(row.get(key), (int, float))], dtype=float)
        values = values[np.isfinite(values)]
        if values.size:
            columns[key] = values
    return columns


def _format(value: float | None, decimals: int) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{decimals}f}"


def _markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


def _columns(keys) -> list[tuple[str, str, int]]:
    """The :data:`METRICS` that occur (before or after) among ``keys``."""
    return [m for m in METRICS if any(f"{s}_{m[0]}" in keys for s in STATES)]


def _paper_cell(model: str | None, table: int) -> str:
    figures = PAPER.get(model)
    return "-" if figures is None else " / ".join(f"{v:.2f}" for v in figures[table == 2])


def comparison_table(results: list[dict], table: int, identity: dict) -> str:
    """Table ``table`` of the paper, one row per result after an identity row (the "before" values of the
    result ``identity``), the paper's figures in the last column: 1 and 3, mean +- std over the pairs; 2, the
    mean over each metric's five best pairs."""
    columns = _columns({k for r in results for k in r["summary"]})

    def cells(result: dict, state: str) -> list[str]:
        if table == 2:
            return [_format(result["best"].get(f"{state}_{key}"), d) for key, _, d in columns]
        values = [result["summary"].get(f"{state}_{key}") for key, _, _ in columns]
        return ["-" if v is None else f"{_format(v[0], d)} ± {_format(v[1], d)}" for v, (_, _, d) in
                zip(values, columns)]

    top = f" (mean of the {TOP} best pairs per metric)" if table == 2 else ""
    header = ["Method", *(f"{h}{' top ' + str(TOP) if table == 2 else ''}" for _, h, _ in columns),
              f"Paper: 1-MSE / NCC / Dice (%){top}"]
    body = [["Before registration (identity)", *cells(identity, "before"), "-"]]
    body += [[r["method"], *cells(r, "after"), _paper_cell(r["model"], table)] for r in results]
    return _markdown(header, body)


def paper_tables(results: list[dict]) -> str:
    """Tables 1 and 2 of the paper for ``results`` (in the paper's row order), and Table 3, the ablation,
    when the results hold both VoxelMorph and UDRNet."""
    identity = results[0]  # one identity row for all tables (see TABLES_NOTE)
    pairs = len(identity["rows"])
    sections = [f"Table 1: mean ± std over the {pairs} pairs\n\n{comparison_table(results, 1, identity)}",
                f"Table 2: the {TOP} best pairs\n\n{comparison_table(results, 2, identity)}"]
    ablation = [r for r in results if r["model"] in ("voxelmorph", "udrnet")]
    if {r["model"] for r in ablation} == {"voxelmorph", "udrnet"}:
        sections.append(f"Table 3: ablation, VoxelMorph without and with scHAF\n\n"
                        f"{comparison_table(ablation, 3, identity)}")
    return "\n\n".join(sections)


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
    """Rows and summaries of one checkpoint: ``label``, ``model`` (its model name), ``name`` (the paper's
    method name), ``rows``, ``summary`` and ``best``. ``model``: the checkpoint as :func:`load_model`
    returns it, when loaded already."""
    net, preprocess, _ = model or load_model(checkpoint)
    label = model_label(checkpoint)
    rows = []
    for number, pair in enumerate(pairs, start=1):
        rows.append(evaluate_pair(net, preprocess, pair, device))
        log.info("[%s %d/%d] %s: NCC %.2f%% -> %.2f%%", label, number, len(pairs), pair.name,
                 rows[-1]["before_ncc_percent"], rows[-1]["after_ncc_percent"])
    name = model_name(net.config.to_dict())
    return {"label": label, "model": name, "name": METHOD_NAMES[name], "rows": rows, "summary": summarise(rows),
            "best": best_pairs_mean(rows)}


def evaluate_models(checkpoints: list[str | Path], pairs: list[PairRecord], out_dir: Path, device: str = "auto",
                    overwrite: bool = False) -> str:
    """Evaluate each checkpoint on ``pairs``; write ``pairs_<label>.csv``, ``summary.csv`` and
    ``evaluation.md`` into ``out_dir``; return the paper's tables (:func:`paper_tables`), rows in the
    paper's order (AttUNet, ResUNet, VoxelMorph, TransUNet, UDRNet).

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
    results.sort(key=lambda r: PAPER_ORDER.index(r["model"]))
    names = [r["name"] for r in results]
    for result in results:
        result["method"] = f"{result['name']} [{result['label']}]" if names.count(result["name"]) > 1 else result["name"]
    tables = paper_tables(results)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"output folder {out_dir}: cannot be created ({error.strerror})") from None
    with output_lock(out_dir):
        check_output_dir(out_dir, [], overwrite, (REPORT_FILE,))  # again: another run may have finished meanwhile
        _write_outputs(out_dir, results, tables, len(pairs))
    return tables


def _write_outputs(out_dir: Path, results: list[dict], tables: str, pair_count: int) -> None:
    """The per-pair CSVs, the summary CSV and the Markdown report, each written atomically."""
    sections = [f"# Evaluation on {pair_count} pairs\n\n{TABLES_NOTE}\n\n{tables}\n"]
    sections += [f"## {r['method']}: per pair (before → after)\n\n{pairs_table(r['rows'])}\n" for r in results]
    summary_rows = [{"method": r["method"], "pairs": pair_count,
                     **{f"{key}_{stat}": value[i] for key, value in r["summary"].items()
                        for i, stat in enumerate(("mean", "std"))},
                     **{f"{key}_top{TOP}": value for key, value in r["best"].items()}} for r in results]
    outputs = {f"pairs_{r['label']}.csv": _csv(r["rows"]) for r in results}
    outputs.update({"summary.csv": _csv(summary_rows), REPORT_FILE: "\n".join(sections)})
    for file_name, text in outputs.items():
        with atomic_path(out_dir / file_name) as temporary:
            temporary.write_text(text, encoding="utf-8")
