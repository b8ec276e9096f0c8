"""``lungudrnet demo``: register a breathing pair made from a real chest CT and show the result.

The real CT (``lung2`` of the sample data, held out from the default model's
training) is turned into an exhale/inhale pair with a known displacement field
and landmarks (:mod:`.synth`), registered with the bundled weights, and
written out with ``metrics.json`` and a figure.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import SimpleITK as sitk

log = logging.getLogger(__name__)

DEMO_CT = "lung2"
DEMO_SEED = 2026
DEMO_AMPLITUDE_MM = 15.0


def add_demo_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="register a breathing pair made from a real chest CT")
    parser.add_argument("--out", default="demo_output", help="output folder")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--model", help="checkpoint or training run folder (default: the bundled weights)")
    parser.set_defaults(run=run_demo)


def field_error_mm(predicted: sitk.Image, truth: sitk.Image, mask: sitk.Image) -> dict:
    """Mean and 90th percentile of |u_predicted - u_true| (mm) inside ``mask``."""
    inside = sitk.GetArrayViewFromImage(mask) > 0
    error = np.linalg.norm(sitk.GetArrayViewFromImage(predicted)[inside] - sitk.GetArrayViewFromImage(truth)[inside],
                           axis=-1)
    return {"mean": float(error.mean()), "p90": float(np.percentile(error, 90))}


def run_demo(args: argparse.Namespace) -> None:
    # Imported here so that `lungudrnet register` does not pay for matplotlib, scipy and the generator.
    from .checkpoint import DEFAULT_WEIGHTS, untrained_model
    from .figure import save_registration_figure
    from .outputs import check_output_dir, write_result
    from .registration import register
    from .report import registration_report
    from .sample_data import load_sample_ct
    from .synth import learn2reg_like_grid, make_breathing_pair

    started = time.perf_counter()
    out_dir = check_output_dir(args.out, [], overwrite=True)
    ct = load_sample_ct(DEMO_CT)
    pair = make_breathing_pair(ct, seed=DEMO_SEED, amplitude_mm=DEMO_AMPLITUDE_MM, reference=learn2reg_like_grid(ct))
    model = args.model
    if model is None and not DEFAULT_WEIGHTS.is_file():
        log.warning("NO TRAINED WEIGHTS BUNDLED: running an UNTRAINED network (the output shows the pipeline, "
                    "not registration quality)")
        model = untrained_model()[0]
    result = register(pair.fixed, pair.moving, model=model, device=args.device, fixed_mask=pair.fixed_mask)
    report = registration_report(pair.fixed, pair.moving, result, pair.fixed_mask, pair.moving_mask,
                                 pair.fixed_points, pair.moving_points)
    report["field_error_mm"] = field_error_mm(result.displacement, pair.displacement, pair.fixed_mask)
    report["data"] = (f"real chest CT '{DEMO_CT}' (pyradiomics sample data) made into a breathing pair: "
                      f"seed {DEMO_SEED}, amplitude {DEMO_AMPLITUDE_MM} mm, Learn2Reg-like grid 192x192x208")
    write_result(result, report, out_dir)
    before, after = report["before"], report["after"]
    title = (f"TRE {before['tre_mm']['mean']:.1f} -> {after['tre_mm']['mean']:.1f} mm, "
             f"lung Dice {before['dice_percent']:.1f} -> {after['dice_percent']:.1f} %, "
             f"{result.timings['total']:.1f} s on {result.device}")
    moving_on_fixed = sitk.Resample(pair.moving, pair.fixed, sitk.Transform(), sitk.sitkLinear, -1024.0)
    save_registration_figure(pair.fixed, moving_on_fixed, result.warped, result.displacement,
                             out_dir / "registration.png", title=title)
    print(f"demo ({report['model'].get('path') or 'UNTRAINED network'}): {title}")
    print(f"NCC {before['ncc_percent']:.2f} -> {after['ncc_percent']:.2f} %, folded voxels "
          f"{report['jacobian']['folding_percent']:.3f} %, field error {report['field_error_mm']['mean']:.2f} mm")
    print(f"total demo time {time.perf_counter() - started:.1f} s; results and registration.png in {out_dir}")
