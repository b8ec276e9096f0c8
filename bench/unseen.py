"""The unseen group's pass criteria, per method: how many pairs the registration halved the landmark error
on, how many it left worse than no registration, the largest folding, and how far apart the fields of the
same pair stored otherwise map its landmarks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from LungUDRNetLib.geometry import transform_points
from LungUDRNetLib.io import read_displacement_field

from .data import BenchPair


def storage_gap_mm(field_a: Path, field_b: Path, fixed_points: np.ndarray) -> float:
    """Largest distance (mm) between the moving positions two pull fields give the same fixed points."""
    a, b = (transform_points(fixed_points, read_displacement_field(path)) for path in (field_a, field_b))
    return float(np.linalg.norm(a - b, axis=1).max())


def criteria(rows: list[dict], pairs: dict[str, BenchPair], variants: dict[str, str], runs: Path) -> list[str]:
    """One line per method on the unseen group: halved / not worse / folding / storage agreement."""
    lines = []
    unseen = [r for r in rows if r["group"] == "unseen" and not r["error"] and r["tre_mean_mm"] is not None]
    for method in dict.fromkeys(r["method"] for r in unseen):
        mine = [r for r in unseen if r["method"] == method]
        halved = sum(r["tre_mean_mm"] <= 0.5 * r["tre_before_mm"] for r in mine)
        worse = [r["pair"] for r in mine if r["tre_mean_mm"] > r["tre_before_mm"]]
        folding = max((r["folding_percent"] for r in mine if r["folding_percent"] is not None), default=math.nan)
        gaps = [storage_gap_mm(runs / method / base / "field.mha", runs / method / variant / "field.mha",
                               pairs[base].fixed_points)
                for variant, base in variants.items()
                if {variant, base} <= {r["pair"] for r in mine}]
        lines.append(f"unseen / {method}: TRE at most half of before on {halved} of {len(mine)} pairs; "
                     f"worse than no registration on {len(worse)}{' (' + ', '.join(worse) + ')' if worse else ''}; "
                     f"largest folding {folding:.3f} %; the same pair stored otherwise: "
                     + (f"landmarks mapped at most {max(gaps):.3f} mm apart" if gaps else "not run"))
    return lines
