"""Write a training set of synthetic breathing pairs made from real chest CTs.

Each pair comes from :func:`LungUDRNetLib.synth.make_breathing_pair` (a known
displacement field, lung masks and landmarks) with its own seed and motion
amplitude. The output is a pairs CSV that ``lungudrnet train --pairs`` reads:
images and masks as NIfTI, landmarks as elastix ``point`` files (LPS mm),
the ground-truth field as ``displacement.nii.gz`` for reference.

    python -m LungUDRNetTrainerLib.synthetic_dataset --out DIR \
        --train lung1:24 --val lung2:4 [--spacing 2.5] [--amplitude 6 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from LungUDRNetLib.io import atomic_path, write_displacement_field, write_image
from LungUDRNetLib.sample_data import load_sample_ct
from LungUDRNetLib.synth import LEARN2REG_SIZE, LEARN2REG_SPACING, make_breathing_pair, resample_to_grid

COLUMNS = ("name", "split", "fixed", "moving", "fixed_mask", "moving_mask", "fixed_points", "moving_points")


def write_points(points_lps: np.ndarray, path: Path) -> None:
    """Write (N, 3) LPS mm points as an elastix ``point`` file."""
    lines = ["point", str(len(points_lps))] + [" ".join(f"{v:.4f}" for v in p) for p in points_lps]
    with atomic_path(path) as temporary:
        temporary.write_text("\n".join(lines) + "\n")


def write_synthetic_dataset(out: Path, plan: dict[str, list[tuple[str, int]]], spacing_mm: float = 2.5,
                            amplitude_mm: tuple[float, float] = (6.0, 20.0), seed: int = 0) -> Path:
    """Generate the pairs of ``plan`` ({split: [(sample CT name, number of pairs)]}) into ``out``.

    The CTs are resampled to the Learn2Reg field of view (336 x 240 x 364 mm) at
    ``spacing_mm`` isotropic. Amplitudes are drawn uniformly from ``amplitude_mm``.
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
        pair_seed, amplitude = int(rng.integers(2 ** 31)), float(rng.uniform(*amplitude_mm))
        pair = make_breathing_pair(cts[name], seed=pair_seed, amplitude_mm=amplitude)
        stem = f"{split}_{name}_{index:03d}"
        files = {"fixed": f"{stem}_fixed.nii.gz", "moving": f"{stem}_moving.nii.gz",
                 "fixed_mask": f"{stem}_fixed_mask.nii.gz", "moving_mask": f"{stem}_moving_mask.nii.gz",
                 "fixed_points": f"{stem}_fixed_points.txt", "moving_points": f"{stem}_moving_points.txt"}
        for key in ("fixed", "moving", "fixed_mask", "moving_mask"):
            write_image(getattr(pair, key), out / files[key])
        write_points(pair.fixed_points, out / files["fixed_points"])
        write_points(pair.moving_points, out / files["moving_points"])
        write_displacement_field(pair.displacement, out / f"{stem}_true_displacement.nii.gz")
        rows.append({"name": f"{stem} (seed {pair_seed}, {amplitude:.1f} mm)", "split": split, **files})
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
    parser.add_argument("--amplitude", nargs=2, type=float, default=(6.0, 20.0), help="min max amplitude (mm)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_synthetic_dataset(args.out, {"train": args.train, "val": args.val}, args.spacing,
                                   tuple(args.amplitude), args.seed)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
