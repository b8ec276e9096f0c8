"""Bench outputs: per-pair rows (results.csv), a per-group and per-method summary (results.md) and the
TRE-vs-time figure.

Pairs fall into groups by name: ``unseen_*`` pairs (see :mod:`.data`) form the
"unseen" group, reported apart from the "standard" one and never averaged with it.
"""

from __future__ import annotations

import csv
import math
import os
import platform
from pathlib import Path

import numpy as np
import torch

from .data import UNSEEN_PREFIX

COLUMNS = ["group", "method", "pair", "tre_before_mm", "tre_mean_mm", "tre_std_mm", "tre_p90_mm", "dice_percent", "one_minus_mse_percent",
           "ncc_percent", "sdlogj", "folding_percent", "process_s", "median_s", "timed_runs", "method_median_s", "peak_rss_mb", "command_s", "error"]
SUMMARY = [("TRE mean (mm)", "tre_mean_mm"), ("TRE std", "tre_std_mm"), ("TRE p90", "tre_p90_mm"),
           ("lung Dice %", "dice_percent"), ("1-MSE %", "one_minus_mse_percent"), ("NCC %", "ncc_percent"),
           ("SDlogJ", "sdlogj"), ("folded %", "folding_percent"), ("whole process (s)", "process_s"),
           ("time in process (s, median)", "median_s"),
           ("timed runs per pair", "timed_runs"), ("method only (s)", "method_median_s"),
           ("peak RSS (MB)", "peak_rss_mb"), ("register command (s)", "command_s")]


def group_of(pair: str) -> str:
    """The bench group of a pair name: "unseen" or "standard"."""
    return "unseen" if pair.startswith(UNSEEN_PREFIX) else "standard"


def row(method: str, pair: str, report: dict | None, run) -> dict:
    """One results.csv row from a :class:`.runner.RunResult` and its evaluation report
    (:func:`.evaluate.evaluate`; None when the run or the evaluation failed)."""
    after = (report or {}).get("after", {})
    tre = after.get("tre_mm", {})
    before = (report or {}).get("before", {}).get("tre_mm", {})
    jacobian = (report or {}).get("jacobian", {})
    return {"group": group_of(pair), "method": method, "pair": pair, "tre_before_mm": before.get("mean"),
            "tre_mean_mm": tre.get("mean"), "tre_std_mm": tre.get("std"),
            "tre_p90_mm": tre.get("p90"), "dice_percent": after.get("dice_percent"),
            "one_minus_mse_percent": after.get("one_minus_mse_percent"), "ncc_percent": after.get("ncc_percent"),
            "sdlogj": jacobian.get("sdlogj"), "folding_percent": jacobian.get("folding_percent"),
            "process_s": run.process_s, "median_s": run.median_s, "timed_runs": len(run.times_s), "method_median_s": run.method_median_s, "peak_rss_mb": run.peak_rss_mb,
            "command_s": run.command_s, "error": run.error}


def _mean(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None and not math.isnan(r[key])]  # older rows lack some
    return float(np.mean(values)) if values else float("nan")


def summarise(rows: list[dict]) -> list[dict]:
    """Per group and method: means over its successful pairs (peak memory: the maximum) and its errors."""
    summary = []
    for group, method in dict.fromkeys((r["group"], r["method"]) for r in rows):
        mine = [r for r in rows if r["method"] == method and r["group"] == group]
        ok = [r for r in mine if not r["error"]]
        entry = {key: _mean(ok, key) for _, key in SUMMARY}
        entry["peak_rss_mb"] = max((r["peak_rss_mb"] for r in ok), default=float("nan"))
        entry.update(group=group, method=method, pairs=len(ok),
                     errors="; ".join(sorted({f"{r['pair']}: {r['error']}" for r in mine if r["error"]})))
        summary.append(entry)
    return summary


def machine_description(threads: int) -> dict:
    """CPU model, cores, load, torch version and the thread count every method ran with."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": model, "cores": os.cpu_count(), "threads": threads, "torch": torch.__version__, "gpu": gpu,
            "load_average_1m": round(os.getloadavg()[0], 2), "python": platform.python_version()}


def write_csv(rows: list[dict], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _cell(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def markdown(summary: list[dict], machine: dict, notes: list[str]) -> str:
    """One results table per group with the machine description and notes, as Markdown."""
    header = "| method | pairs | " + " | ".join(title for title, _ in SUMMARY) + " |"
    tables = []
    for group in dict.fromkeys(entry["group"] for entry in summary):
        lines = [f"## {group} pairs", "", header, "|" + "---|" * (len(SUMMARY) + 2)]
        for entry in (e for e in summary if e["group"] == group):
            cells = [entry["method"], str(entry["pairs"])] + [_cell(entry[key]) for _, key in SUMMARY]
            lines.append("| " + " | ".join(cells) + " |")
        tables += [*lines, ""]
    errors = [f"- {e['group']} / {e['method']}: {e['errors']}" for e in summary if e["errors"]]
    described = ", ".join(f"{k} {v}" for k, v in machine.items())
    return "\n".join(["# LungUDRNet benchmark", "", f"Machine: {described}.", "", *tables,
                      *(["Notes:"] + [f"- {n}" for n in notes] if notes else []),
                      *(["", "Errors:", *errors] if errors else []), ""])


def plot_tre_vs_time(summary: list[dict], path: Path) -> Path:
    """Write :func:`tre_vs_time_figure` of ``summary`` as a PNG to ``path``."""
    import matplotlib.pyplot as plt

    figure = tre_vs_time_figure(summary)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def tre_vs_time_figure(summary: list[dict]):
    """Mean TRE (mm) against whole-process time (s), both on log scales, one panel per group and one colour
    per method (the same in every panel, named in the legend); a matplotlib figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    shown = [entry for entry in summary if not (math.isnan(entry["tre_mean_mm"]) or math.isnan(entry["process_s"]))]
    groups = list(dict.fromkeys(entry["group"] for entry in summary))
    methods = list(dict.fromkeys(entry["method"] for entry in shown))
    palette = plt.cm.tab10 if len(methods) <= 10 else plt.cm.tab20  # one colour per method up to 20
    colours = {method: palette(index % palette.N) for index, method in enumerate(methods)}
    legend_inches = 1.8
    figure, panels = plt.subplots(1, len(groups), figsize=(4.6 * len(groups) + legend_inches, 4.2), squeeze=False)
    for axes, group in zip(panels[0], groups):
        for entry in shown:
            if entry["group"] == group:
                axes.scatter(entry["process_s"], entry["tre_mean_mm"], color=colours[entry["method"]], s=40,
                             label=entry["method"], edgecolors="black", linewidths=0.4)
        axes.set_xscale("log")
        axes.set_yscale("log")
        for axis in (axes.xaxis, axes.yaxis):
            axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
            axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            axis.set_minor_formatter(NullFormatter())
        axes.set_title(f"{group} pairs", fontsize=10)
        axes.set_xlabel("whole process per pair (s)")
        axes.grid(True, which="major", alpha=0.3)
    panels[0][0].set_ylabel("mean TRE (mm)")
    handles = {label: handle for axes in panels[0] for handle, label in zip(*axes.get_legend_handles_labels())}
    figure.legend(handles.values(), handles.keys(), loc="center right", fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0, 1 - legend_inches / figure.get_figwidth(), 1))
    return figure
