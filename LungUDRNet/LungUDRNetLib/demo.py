"""``lungudrnet demo``: register a breathing pair made from a real chest CT and show the result.

The real CT (``lung2`` of the sample data, held out from the default model's
training) is turned into an exhale/inhale pair with a known displacement field
and landmarks (:mod:`.synth`) and registered with the bundled weights. The
output folder gets the pair (``fixed.nii.gz``, ``moving.nii.gz``), the results
of ``lungudrnet register`` (``warped.nii.gz``, ``displacement.nii.gz``,
``metrics.json``), a figure (``registration.png``) and a 3D Slicer scene that
opens the three scans and the transform at once (``demo_scene.mrml``).
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
SCENE_FILE = "demo_scene.mrml"


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


def in_view(pair, ct: sitk.Image, displacement: sitk.Image) -> np.ndarray:
    """Bool (z, y, x) on the fixed grid: where the demo pair holds CT data to compare.

    The pair's grid (shared by both scans) is padded with air where it reaches
    beyond the CT, and the fixed scan was pulled from the moving one at
    p + u_true(p). So a fixed voxel p is in view when p + u_true(p) (the fixed
    scan's data), p (moving, before registration) and p + u(p) (moving after;
    ``displacement`` u in LPS mm) lie inside both the CT and the pair's grid.
    """
    from .report import overlap_mask

    return np.logical_and.reduce([overlap_mask(pair.fixed, scan, field) for scan in (ct, pair.moving)
                                  for field in (pair.displacement, displacement)])


def run_demo(args: argparse.Namespace) -> None:
    # Imported here so that `lungudrnet register` does not pay for matplotlib, scipy and the generator.
    from .checkpoint import DEFAULT_WEIGHTS, untrained_model
    from .figure import save_registration_figure
    from .io import write_image
    from .mrml_scene import write_scene
    from .outputs import check_output_dir
    from .registration import register
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
    report = result.metrics(pair.fixed, pair.moving, pair.fixed_mask, pair.moving_mask, pair.fixed_points,
                            pair.moving_points)
    report["field_error_mm"] = field_error_mm(result.displacement, pair.displacement, pair.fixed_mask)
    report["data"] = (f"real chest CT '{DEMO_CT}' (pyradiomics sample data) made into a breathing pair: "
                      f"seed {DEMO_SEED}, amplitude {DEMO_AMPLITUDE_MM} mm, Learn2Reg-like grid 192x192x208")
    result.save(out_dir, overwrite=True, metrics=report)
    write_image(pair.fixed, out_dir / "fixed.nii.gz")
    write_image(pair.moving, out_dir / "moving.nii.gz")
    write_scene(out_dir / SCENE_FILE, {name: f"{name}.nii.gz" for name in ("fixed", "moving", "warped")},
                {"displacement": "displacement.nii.gz"}, background="fixed", foreground="warped")
    before, after = report["before"], report["after"]
    title = (f"Synthetic breathing motion on the real chest CT '{DEMO_CT}' (fixed: made exhale; moving: inhale): "
             f"TRE {before['tre_mm']['mean']:.1f} -> {after['tre_mm']['mean']:.1f} mm, "
             f"lung Dice {before['dice_percent']:.1f} -> {after['dice_percent']:.1f} %, "
             f"{result.timings['total']:.1f} s on {result.device}")
    moving_on_fixed = sitk.Resample(pair.moving, pair.fixed, sitk.Transform(), sitk.sitkLinear, -1024.0)
    save_registration_figure(pair.fixed, moving_on_fixed, result.warped, result.displacement,
                             out_dir / "registration.png", title=title, in_view=in_view(pair, ct, result.displacement))
    print(f"demo ({report['model'].get('path') or 'UNTRAINED network'}): {title}")
    print(f"NCC {before['ncc_percent']:.2f} -> {after['ncc_percent']:.2f} %, folded voxels "
          f"{report['jacobian']['folding_percent']:.3f} %, field error {report['field_error_mm']['mean']:.2f} mm")
    print(f"total demo time {time.perf_counter() - started:.1f} s; results, registration.png and {SCENE_FILE} "
          f"(drag and drop into 3D Slicer) in {out_dir}")
