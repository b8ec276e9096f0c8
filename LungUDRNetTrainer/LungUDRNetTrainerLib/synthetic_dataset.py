"""Write a training set of synthetic breathing pairs made from real chest CTs.

Each pair comes from :func:`LungUDRNetLib.synth.make_breathing_pair` (a known
displacement field, lung masks and landmarks) with its own seed and motion
amplitude. The output is a pairs CSV that ``lungudrnet train --pairs`` reads:
images and masks as NIfTI, landmarks as elastix ``point`` files (LPS mm),
the ground-truth field as ``*_true_displacement.nii.gz`` (the CSV's
``true_displacement`` column, for the trainer's optional supervised term).

``--wide`` draws each pair's scans from the wider range users bring
(:data:`WIDE`): breathing of 5-35 mm with front-back and left-right parts, a
set-up difference (couch shift and rotation), slice thickness, HU calibration
and noise per scan; then the moving scan is pre-aligned by ``register``'s own
affine stage (automatic lung masks), so the network learns what is left after
it, as it meets it in ``register``.

    python -m LungUDRNetTrainerLib.synthetic_dataset --out DIR \
        --train lung1:24 --val lung2:4 [--spacing 2.5] [--amplitude 6 20] [--wide] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from LungUDRNetLib.affine import prealign
from LungUDRNetLib.io import atomic_path, write_displacement_field, write_image
from LungUDRNetLib.lung_mask import lung_mask
from LungUDRNetLib.sample_data import load_sample_ct
from LungUDRNetLib.scan_variants import random_rigid, with_acquisition, with_setup_difference
from LungUDRNetLib.synth import (EXPANSION_FRACTION, LEARN2REG_SIZE, LEARN2REG_SPACING, BreathingPair,
                                 body_centre, make_breathing_pair, resample_to_grid)

COLUMNS = ("name", "split", "fixed", "moving", "fixed_mask", "moving_mask", "fixed_points", "moving_points",
           "true_displacement")


@dataclass(frozen=True)
class Variation:
    """Ranges (min, max) each pair's settings are drawn from uniformly; the defaults vary only the
    amplitude (the bundled weights before canonical space)."""

    amplitude_mm: tuple[float, float] = (6.0, 20.0)
    expansion_fraction: tuple[float, float] = (EXPANSION_FRACTION, EXPANSION_FRACTION)
    anterior_fraction: tuple[float, float] = (0.0, 0.0)
    noise_hu: tuple[float, float] = (20.0, 20.0)
    setup_angle_deg: float = 0.0  # +- about each LPS axis
    setup_shift_mm: float = 0.0  # +- along each LPS axis
    thickness_mm: tuple[float, float] = (0.0, 0.0)  # per scan; below the CT spacing: unchanged
    gain: tuple[float, float] = (1.0, 1.0)  # per scan, of HU + 1000
    offset_hu: tuple[float, float] = (0.0, 0.0)  # per scan
    affine_aligned: bool = False  # the moving scan pre-aligned by register's affine stage


WIDE = Variation(amplitude_mm=(5.0, 35.0), expansion_fraction=(0.15, 0.5), anterior_fraction=(0.0, 0.4),
                 noise_hu=(5.0, 30.0), setup_angle_deg=8.0, setup_shift_mm=20.0, thickness_mm=(1.0, 5.0),
                 gain=(0.95, 1.05), offset_hu=(-20.0, 20.0), affine_aligned=True)


def make_varied_pair(ct, variation: Variation, rng: np.random.Generator) -> tuple[BreathingPair, str]:
    """One pair drawn from ``variation`` and a short description of its settings."""
    seed, amplitude = int(rng.integers(2 ** 31)), float(rng.uniform(*variation.amplitude_mm))
    pair = make_breathing_pair(ct, seed=seed, amplitude_mm=amplitude, noise_hu=float(rng.uniform(*variation.noise_hu)),
                               expansion_fraction=float(rng.uniform(*variation.expansion_fraction)),
                               anterior_fraction=float(rng.uniform(*variation.anterior_fraction)))
    if variation.setup_angle_deg or variation.setup_shift_mm:
        setup = random_rigid(rng, variation.setup_angle_deg, variation.setup_shift_mm, body_centre(ct))
        pair = with_setup_difference(pair, setup)
    pair = with_acquisition(pair, rng, variation.thickness_mm, variation.gain, variation.offset_hu)
    if variation.affine_aligned:
        masks = (lung_mask(pair.fixed, "fixed scan"), lung_mask(pair.moving, "moving scan"))
        pair = with_setup_difference(pair, prealign(pair.fixed, pair.moving, *masks).transform)
    return pair, f"seed {seed}, {amplitude:.1f} mm"


def write_points(points_lps: np.ndarray, path: Path) -> None:
    """Write (N, 3) LPS mm points as an elastix ``point`` file."""
    lines = ["point", str(len(points_lps))] + [" ".join(f"{v:.4f}" for v in p) for p in points_lps]
    with atomic_path(path) as temporary:
        temporary.write_text("\n".join(lines) + "\n")


def write_synthetic_dataset(out: Path, plan: dict[str, list[tuple[str, int]]], spacing_mm: float = 2.5,
                            variation: Variation = Variation(), seed: int = 0) -> Path:
    """Generate the pairs of ``plan`` ({split: [(sample CT name, number of pairs)]}) into ``out``.

    The CTs are resampled to the Learn2Reg field of view (336 x 240 x 364 mm) at
    ``spacing_mm`` isotropic. Each pair's settings are drawn from ``variation``.
    Returns the path of ``pairs.csv``.
    """
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    extent = np.asarray(LEARN2REG_SIZE) * np.asarray(LEARN2REG_SPACING)
    size = tuple(int(round(e / spacing_mm)) for e in extent)
    jobs = [(split, name, index) for split, entries in plan.items() for name, count in entries for index in range(count)]
    rows = []
    cts = {}
    for split, name, index in tqdm(jobs, desc="synthetic pairs", unit="pair"):
        if name not in cts:
            cts[name] = resample_to_grid(load_sample_ct(name), size, (spacing_mm,) * 3)
        pair, description = make_varied_pair(cts[name], variation, rng)
        stem = f"{split}_{name}_{index:03d}"
        files = {key: f"{stem}_{key}.nii.gz" for key in ("fixed", "moving", "fixed_mask", "moving_mask")}
        files.update(fixed_points=f"{stem}_fixed_points.txt", moving_points=f"{stem}_moving_points.txt",
                     true_displacement=f"{stem}_true_displacement.nii.gz")
        for key in ("fixed", "moving", "fixed_mask", "moving_mask"):
            write_image(getattr(pair, key), out / files[key])
        write_points(pair.fixed_points, out / files["fixed_points"])
        write_points(pair.moving_points, out / files["moving_points"])
        write_displacement_field(pair.displacement, out / files["true_displacement"], compress=True)
        rows.append({"name": f"{stem} ({description})", "split": split, **files})
    with atomic_path(out / "pairs.csv") as temporary, temporary.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return out / "pairs.csv"


def _plan_entry(text: str) -> tuple[str, int]:
    name, _, count = text.partition(":")
    return name, int(count or 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--train", nargs="+", type=_plan_entry, default=[("lung1", 24)], help="CT:count ...")
    parser.add_argument("--val", nargs="*", type=_plan_entry, default=[("lung2", 4)], help="CT:count ...")
    parser.add_argument("--spacing", type=float, default=2.5, help="isotropic voxel size (mm)")
    parser.add_argument("--amplitude", nargs=2, type=float, default=None,
                        help="min max breathing amplitude (mm); default 6 20, with --wide 5 35")
    parser.add_argument("--wide", action="store_true", help="the wide variation of scans (module docstring)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    variation = WIDE if args.wide else Variation()
    if args.amplitude:
        variation = dataclasses.replace(variation, amplitude_mm=tuple(args.amplitude))
    path = write_synthetic_dataset(args.out, {"train": args.train, "val": args.val}, args.spacing, variation,
                                   args.seed)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
