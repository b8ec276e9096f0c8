"""``lungudrnet demo``: register a generated pair end to end and write the results."""

from __future__ import annotations

import argparse
import logging

from .checkpoint import DEFAULT_WEIGHTS, untrained_model
from .geometry import warp_image
from .outputs import check_output_dir, write_result
from .phantom import analytic_field, chest_phantom, lung_mask_phantom, make_grid
from .registration import register
from .report import registration_report

log = logging.getLogger(__name__)


def add_demo_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="register a generated example pair and write the results")
    parser.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--overwrite", action="store_true", default=True, help=argparse.SUPPRESS)
    parser.set_defaults(run=run_demo)


def run_demo(args: argparse.Namespace) -> None:
    out_dir = check_output_dir(args.out, [], overwrite=True)
    grid = make_grid((96, 80, 64), (3.0, 3.0, 4.0), origin=(-140.0, -120.0, -130.0))
    moving = chest_phantom(grid, seed=1)
    truth = analytic_field(grid, translation_mm=(0.0, 0.0, 6.0), amplitude_mm=4.0)
    fixed = warp_image(moving, truth)
    model = None
    if not DEFAULT_WEIGHTS.is_file():
        log.warning("NO TRAINED WEIGHTS BUNDLED: running an UNTRAINED network on a PHANTOM pair "
                    "(the output shows the pipeline, not registration quality)")
        model = untrained_model()[0]
    result = register(fixed, moving, model=model, device=args.device)
    report = registration_report(fixed, moving, result, lung_mask_phantom(fixed), lung_mask_phantom(moving))
    report["data"] = "synthetic chest phantom with a known analytic field"
    write_result(result, report, out_dir)
    print(f"demo: NCC {report['before']['ncc_percent']:.2f}% -> {report['after']['ncc_percent']:.2f}%, "
          f"runtime {result.timings['total']:.2f} s on {result.device}; results in {out_dir}")
