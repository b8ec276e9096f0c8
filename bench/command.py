"""``lungudrnet bench``: every method on the same pairs, one child process per method and pair."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

from . import data, tables, unseen
from LungUDRNetLib.checkpoint import DEFAULT_WEIGHTS, read_checkpoint
from LungUDRNetLib.comparison_nets import ARCHITECTURES
from LungUDRNetLib.errors import InputError
from LungUDRNetLib.networks import model_name
from .evaluate import evaluate
from .peers import METHODS, Options
from .runner import Job, run_job, time_command

log = logging.getLogger(__name__)

QUICK_METHODS = ["identity", "udrnet", "sitk-demons"]
DEFAULT_ELASTIX_DIR = Path("..") / "shared" / "data" / "elastix_lung"
# The baselines trained like the bundled weights (source tree only; see the model card beside them).
BASELINE_MODELS = Path(__file__).resolve().parents[1] / "Resources" / "BaselineModels"


def _shipped(name: str) -> str | None:
    path = BASELINE_MODELS / name
    return str(path) if path.is_file() else None


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmark UDRNet against its peers (TRE, time, memory)")
    parser.add_argument("--data", help="Learn2Reg-layout folder (imagesTr/, masksTr/, keypointsTr/, landmarksTr/)")
    parser.add_argument("--out", default="bench_results", help="output folder")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: 2 tiny phantom pairs, methods {', '.join(QUICK_METHODS)}, 1 repeat")
    parser.add_argument("--methods",
                        help=f"comma-separated methods of {', '.join(METHODS)} (default: all but the paper's "
                             f"comparison networks {', '.join(ARCHITECTURES)}, which join it for each "
                             f"--comparison-weights checkpoint)")
    parser.add_argument("--pairs", type=int, default=6, metavar="N",
                        help="number of synthetic breathing pairs on the Learn2Reg grid")
    parser.add_argument("--groups", default="standard,unseen",
                        help="pair groups: standard (breathing pairs on the Learn2Reg grid, --data, the elastix "
                             "CT), unseen (scans unlike the training pairs: whole field of view, 5 mm slices, "
                             "set-up differences, motion to 35 mm, other storage; reported apart)")
    parser.add_argument("--elastix-lung", default=str(DEFAULT_ELASTIX_DIR),
                        help="folder with the elastix test chest CT (used where present)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method and pair (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    parser.add_argument("--slow-seconds", type=float, default=60.0,
                        help="a method slower than this per run gets fewer timed runs (the warm-up is timed "
                             "itself; runs stop once they add up to more); 0 = always warm-up + repeats")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads, the same for every method")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per method and pair")
    parser.add_argument("--weights", help="UDRNet checkpoint (default: bundled weights)")
    parser.add_argument("--baseline-weights",
                        help="checkpoint of `lungudrnet train --model voxelmorph` (UDRNet without scHAF; default: "
                             "the one trained like the bundled weights, where the source tree has it)")
    parser.add_argument("--voxelmorph-weights",
                        help="checkpoint of `lungudrnet train --model voxelmorph-package` (default: as above)")
    parser.add_argument("--comparison-weights", action="append", default=[], metavar="CHECKPOINT",
                        help="checkpoint of `lungudrnet train --model attunet|resunet|transunet`; repeat for each "
                             "(the method is the checkpoint's network)")
    parser.add_argument("--elastix-iterations", type=int, default=Options.elastix_iterations,
                        help="iterations per resolution of elastix (Par0011 uses 1000)")
    parser.set_defaults(run=run_bench)


def _pair_folders(args: argparse.Namespace, cache: Path) -> list[Path]:
    if args.quick:
        return data.tiny_pairs(cache)
    groups = {g.strip() for g in args.groups.split(",") if g.strip()}
    if not groups or groups - {"standard", "unseen"}:
        raise InputError(f"bench: --groups {args.groups!r}: use standard, unseen or both (comma-separated)")
    folders = []
    if "standard" in groups:
        folders += data.synthetic_pairs(cache, args.pairs)
        folders += data.elastix_ct_pair(cache, Path(args.elastix_lung))
        if args.data:
            folders += data.learn2reg_pairs(cache, Path(args.data))
    if "unseen" in groups:
        folders += data.unseen_pairs(cache, Path(args.elastix_lung))
    return folders


def selected_methods(args: argparse.Namespace, comparison: dict[str, str]) -> list[str]:
    """The methods to run; ``comparison``: :func:`comparison_checkpoints` of ``args``."""
    if args.quick:
        return QUICK_METHODS
    if args.methods is None:
        return [m for m in METHODS if m not in ARCHITECTURES or m in comparison]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"bench: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    return methods


def comparison_checkpoints(checkpoints: list[str]) -> dict[str, str]:
    """``{model name: checkpoint}`` of the ``--comparison-weights`` files: one per comparison network."""
    found = {}
    for path in checkpoints:
        name = model_name(read_checkpoint(path)["model_config"])
        if name not in ARCHITECTURES:
            hint = "; pass it with --weights or --baseline-weights" if name in ("udrnet", "voxelmorph") else ""
            raise InputError(f"bench: --comparison-weights {path}: holds {name}, not one of "
                             f"{', '.join(ARCHITECTURES)}{hint}")
        if name in found:
            raise InputError(f"bench: --comparison-weights {path}: a second {name} checkpoint (first: {found[name]})")
        found[name] = path
    return found


def _evaluated(pair: data.BenchPair, out: Path) -> tuple[dict | None, str | None]:
    """The evaluation report of one run, or the reason it could not be evaluated."""
    try:
        return evaluate(pair, out), None
    except Exception as error:  # a broken field must not end the bench
        return None, f"evaluation failed: {type(error).__name__}: {str(error)[:200]}"


def gpu_network_seconds(shape: tuple[int, int, int] = (192, 192, 208), repeats: int = 10) -> float | None:
    """Median seconds of one UDRNet forward pass on CUDA at ``shape`` (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    from .peers import _network_model

    model = _network_model(None)[0].cuda()
    pair = torch.rand(2, 1, 1, *shape, device="cuda")
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 2):
            torch.cuda.synchronize()
            started = time.perf_counter()
            model(pair[0], pair[1])
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
    return sorted(times[2:])[len(times[2:]) // 2]


def _write_outputs(rows: list[dict], machine: dict, notes: list[str], out: Path,
                   pairs: dict[str, data.BenchPair]) -> None:
    machine = {**machine, "load_average_1m_now": tables.machine_description(machine["threads"])["load_average_1m"]}
    notes = notes + unseen.criteria(rows, pairs, data.storage_variants(), out / "runs")
    summary = tables.summarise(rows)
    tables.write_csv(rows, out / "results.csv")
    (out / "results.md").write_text(tables.markdown(summary, machine, notes))
    tables.plot_tre_vs_time(summary, out / "tre_vs_time.png")


def run_bench(args: argparse.Namespace) -> list[dict]:
    """Run the bench and write results.csv, results.md and tre_vs_time.png into ``args.out``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    repeats = 1 if args.quick else args.repeats
    given = {f.name: getattr(args, f.name) for f in fields(Options)}
    comparison = comparison_checkpoints(args.comparison_weights)
    methods = selected_methods(args, comparison)
    options = Options(**{**given, "baseline_weights": args.baseline_weights or _shipped("udrnet_noattention.pt"),
                         "voxelmorph_weights": args.voxelmorph_weights or _shipped("voxelmorph_package.pt"),
                         "comparison_weights": comparison})
    machine = tables.machine_description(args.threads)
    pairs = [data.read_pair(folder) for folder in _pair_folders(args, out / "pairs")]
    notes = [f"{len(pairs)} pairs: {', '.join(p.name for p in pairs)}",
             f"whole process = from starting the method's process (interpreter, imports) to its first run's "
             f"files written; time in process = read pair, register, warp, write warped image and field "
             f"(method only: the field computation alone), median of {repeats} runs after {args.warmup} "
             f"warm-up (methods slower than {args.slow_seconds:g} s per run: fewer, see 'timed runs'); "
             f"{args.threads} threads for every method, each in its own child process",
             f"udrnet: the network alone (the paper); udrnet-fast: `register --fast`; udrnet-pipeline: "
             f"`register` (instance optimisation with the model's iterations; -2x, -4x: twice, four times as "
             f"many); elastix: Par0011-based, {options.elastix_iterations} iterations per resolution"]
    if options.weights is None and not DEFAULT_WEIGHTS.is_file():
        notes.append("bundled UDRNet weights absent: UDRNet rows use an untrained network (accuracy not meaningful)")
    for method, weights in (("udrnet-noattention", options.baseline_weights),
                            ("voxelmorph", options.voxelmorph_weights)):
        if weights is None and method in methods:
            notes.append(f"{method}: no trained weights given; an untrained network (accuracy not meaningful)")
    for method in [m for m in ARCHITECTURES if m in methods and m not in comparison]:
        notes.append(f"{method}: no --comparison-weights checkpoint of it; an untrained network (accuracy not "
                     "meaningful)")
    gpu = gpu_network_seconds()
    if gpu is not None:
        notes.append(f"UDRNet network step on {machine['gpu']} at 192x192x208: {gpu * 1000:.1f} ms (median)")
    rows = []
    for method in methods:
        for pair in pairs:
            job = Job(method, str(out / "pairs" / pair.name), str(out / "runs" / method / pair.name),
                      args.threads, repeats, args.warmup, asdict(options), args.slow_seconds or float("inf"))
            result = run_job(job, args.timeout)
            if not result.error:
                result.command_s = time_command(job, args.timeout)
            report = None
            if not result.error:
                report, result.error = _evaluated(pair, Path(job.out))
            rows.append(tables.row(method, pair.name, report, result))
            log.info("%-20s %-28s %s", method, pair.name, result.error or f"{result.median_s:.2f} s, "
                     f"TRE {rows[-1]['tre_mean_mm'] or float('nan'):.2f} mm, {result.peak_rss_mb:.0f} MB")
            _write_outputs(rows, machine, notes, out, {p.name: p for p in pairs})  # after every row: a stopped bench keeps its results
    print((out / "results.md").read_text())
    return rows
