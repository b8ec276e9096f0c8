"""The ``lungudrnet train`` and ``lungudrnet evaluate`` subcommands."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import threading
from pathlib import Path

from LungUDRNetLib.errors import InputError

from .config import PRESETS, TrainConfig, add_config_arguments, overrides_from_args, read_run_config, resolve_config

log = logging.getLogger(__name__)


def add_parsers(subparsers) -> None:
    """Register ``train`` and ``evaluate`` on the ``lungudrnet`` parser."""
    add_train_parser(subparsers)
    add_evaluate_parser(subparsers)


def add_train_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train UDRNet (or a network it is compared with) headless; under torchrun on several GPUs",
        description="Train UDRNet unsupervised on a Learn2Reg dataset folder or a pairs CSV. Settings: "
                    "paper defaults <- --preset <- --config file <- flags.")
    parser.add_argument("--out", help="run folder for config.yaml, last.pt, last.prev.pt, best.pt, log.csv, "
                                      "tensorboard/")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last.pt (last.prev.pt if that cannot be loaded)")
    parser.add_argument("--preset", choices=sorted(PRESETS),
                        help="paper (default), fast (64^3, CPU-sized) or smoke (tiny, seconds: a pipeline check)")
    parser.add_argument("--config", help="YAML or TOML file of settings (keys as the flags below)")
    add_config_arguments(parser)
    parser.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> None:
    from .training import stop_on_signals, train

    overrides = overrides_from_args(args)
    if args.resume:
        run_dir = Path(args.resume)
        if args.out and Path(args.out).resolve() != run_dir.resolve():
            raise InputError(f"--out {args.out}: a resumed run stays in its folder {run_dir}; leave out --out")
        if not (run_dir / "config.yaml").is_file():
            raise InputError(f"resume {run_dir}: no config.yaml there (not a training run folder)")
        base = read_run_config(run_dir / "config.yaml")
        config = resolve_config(args.preset, args.config, overrides, base=base)
        changed = {k: v for k, v in dataclasses.asdict(config).items() if getattr(base, k) != v}
        if changed:
            log.warning("resuming with changed settings: %s", changed)
    else:
        if not args.out:
            raise InputError("train: --out RUN_DIR is needed (or --resume RUN_DIR)")
        run_dir = Path(args.out)
        config = resolve_config(args.preset, args.config, overrides)
    main_process = int(os.environ.get("RANK", "0")) == 0
    if not main_process:
        logging.getLogger().setLevel(logging.WARNING)
    stop = threading.Event()
    with stop_on_signals(stop):
        train(config, run_dir, resume=bool(args.resume), stop=stop)
    if main_process:
            print(f"training finished; best model: {run_dir / 'best.pt'} "
              f"(use it with: lungudrnet register --model {run_dir} ...)")


def add_evaluate_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="per-pair metrics and the paper's Tables 1-3 for one or more checkpoints",
        description="Register every pair of a split with the network alone (as in the paper: no affine stage, no "
                    "stage choice) and tabulate 1-MSE, NCC, lung Dice, TRE, SDlogJ and folded voxels before "
                    "(identity) and after registration: per pair, and as the paper's Table 1 (mean +- std), "
                    "Table 2 (mean of the five best pairs per metric) and Table 3 (the scHAF ablation, when "
                    "both voxelmorph and udrnet are given), with the paper's figures beside ours.")
    parser.add_argument("--model", action="append", required=True,
                        help="checkpoint or run folder; repeat for the comparison (any of udrnet, voxelmorph, "
                             "attunet, resunet, transunet)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="Learn2Reg dataset folder")
    source.add_argument("--pairs", help="pairs CSV")
    parser.add_argument("--split", choices=("val", "test", "train"), default="val", help="which pairs")
    parser.add_argument("--out", default="evaluation", help="folder for the CSV and Markdown tables")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--overwrite", action="store_true", help="replace existing tables in --out")
    parser.set_defaults(run=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> None:
    from .datasets import load_splits
    from .evaluate import evaluate_models

    # The default hold-out, so that --split val means the pairs a training run validated on.
    pairs = load_splits(args.data, args.pairs, TrainConfig().val_fraction, needed=(args.split,))[args.split]
    if not pairs:
        raise InputError(f"data {args.data or args.pairs}: no {args.split} pairs")
    table = evaluate_models(args.model, pairs, Path(args.out), device=args.device, overwrite=args.overwrite)
    print(table)
    print(f"tables written to {args.out}")
