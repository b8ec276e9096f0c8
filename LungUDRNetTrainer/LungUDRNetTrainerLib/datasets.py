"""Registration pairs on disk: the Learn2Reg layout and a plain pairs CSV.

Learn2Reg layout (as the challenge distributes it, e.g. LungCT)::

    DIR/LungCT_dataset.json          training, training_paired_images, registration_val, registration_test
    DIR/imagesTr/LungCT_0001_0000.nii.gz   inspiration      DIR/imagesTr/LungCT_0001_0001.nii.gz   expiration
    DIR/masksTr/<same name>          lung masks (optional)
    DIR/keypointsTr/<stem>.csv       corresponding points, voxel x, y, z (optional)
    DIR/landmarksTr/<stem>.csv       manual landmarks, same format (optional)
    DIR/*_evaluation_config.json     the challenge's ``eval_pairs`` (used when the JSON has no validation pairs)

Pairs follow the challenge's convention: ``fixed`` = ``_0000`` (inspiration),
``moving`` = ``_0001`` (expiration) of the same case, unless the JSON lists
the pairs itself. Without any JSON the ``imagesTr`` folder is paired by name.

Pairs CSV: read by :mod:`LungUDRNetLib.pairs_csv` (columns, paths relative to
the CSV's folder, ``split`` train/val/test, ``true_displacement`` for the
trainer's optional supervised term), the same reader as ``lungudrnet register --pairs``.

Point files are voxel indices x, y, z (x = first image axis) in CSV, as in
Learn2Reg, or elastix ``point`` files (LPS mm) / ``index`` files (voxels)
(:func:`LungUDRNetLib.pairs_csv.read_points_lps`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from LungUDRNetLib.errors import InputError
from LungUDRNetLib.input_files import check_input_path
from LungUDRNetLib.pairs_csv import CASE_PHASE, FILE_COLUMNS, SPLITS, image_stem, pair_name, read_pairs_csv
from LungUDRNetLib.pairs_csv import resolve_path as _resolve

POINT_KINDS = ("keypoints", "landmarks")
FIXED_PHASE, MOVING_PHASE = 0, 1
MAX_LISTED = 5  # missing files named in one error message


@dataclass(frozen=True)
class PairRecord:
    """One fixed/moving pair with its optional masks and corresponding point sets.

    ``points`` maps a kind ("keypoints", "landmarks", "points") to the
    (fixed, moving) point files; row i of one corresponds to row i of the other.
    """

    name: str
    fixed: Path
    moving: Path
    fixed_mask: Path | None = None
    moving_mask: Path | None = None
    points: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    true_displacement: Path | None = None


def _companion(image: Path, kind: str, suffix: str | None = None) -> Path | None:
    """The file of ``kind`` (masks, keypoints, landmarks) beside a Learn2Reg image, if it exists.

    ``imagesTr/X.nii.gz`` -> ``masksTr/X.nii.gz`` or ``keypointsTr/X.csv``.
    """
    folder = image.parent.name.replace("images", kind, 1)
    name = image.name if suffix is None else image_stem(image) + suffix
    candidate = image.parent.parent / folder / name
    return candidate if folder != image.parent.name and candidate.is_file() else None


def learn2reg_pair(fixed: Path, moving: Path, mask_of: dict[Path, Path] | None = None) -> PairRecord:
    """A pair of Learn2Reg images with the masks and point files found beside them."""
    mask_of = mask_of or {}
    points = {}
    for kind in POINT_KINDS:
        fixed_points, moving_points = _companion(fixed, kind, ".csv"), _companion(moving, kind, ".csv")
        if fixed_points and moving_points:
            points[kind] = (fixed_points, moving_points)
    return PairRecord(
        name=pair_name(fixed, moving),
        fixed=fixed, moving=moving,
        fixed_mask=mask_of.get(fixed) or _companion(fixed, "masks"),
        moving_mask=mask_of.get(moving) or _companion(moving, "masks"),
        points=points,
    )


def _read_json(path: Path) -> dict:
    check_input_path(path, "dataset")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"dataset {path}: cannot be read as JSON ({error})") from None


def _find_one(root: Path, pattern: str, exclude: str | None = None) -> Path | None:
    matches = sorted(p for p in root.glob(pattern) if not (exclude and exclude in p.name))
    if len(matches) > 1:
        raise InputError(f"dataset {root}: several files match {pattern} ({', '.join(p.name for p in matches)}); "
                         "keep one")
    return matches[0] if matches else None


def _pairs_from_entries(root: Path, entries: list[dict], key: str, mask_of: dict[Path, Path]) -> list[PairRecord]:
    try:
        return [learn2reg_pair(_resolve(root, e["fixed"]), _resolve(root, e["moving"]), mask_of)
                for e in entries]
    except (KeyError, TypeError):
        raise InputError(f"dataset {root}: every entry of {key!r} needs 'fixed' and 'moving' image paths") from None


def _pairs_by_case(images: list[Path], mask_of: dict[Path, Path], fixed_phase: int,
                   moving_phase: int) -> list[PairRecord]:
    """Pair ``<case>_<fixed_phase>`` with ``<case>_<moving_phase>`` among ``images``."""
    by_case: dict[str, dict[int, Path]] = {}
    for image in images:
        match = CASE_PHASE.match(image_stem(image))
        if match:
            by_case.setdefault(match["case"], {})[int(match["phase"])] = image
    return [learn2reg_pair(phases[fixed_phase], phases[moving_phase], mask_of)
            for case, phases in sorted(by_case.items()) if fixed_phase in phases and moving_phase in phases]


def load_learn2reg(root: str | Path, val_fraction: float = 0.2) -> dict[str, list[PairRecord]]:
    """The train/val/test pairs of a Learn2Reg dataset folder.

    Validation pairs come from the JSON's ``registration_val`` (or the
    evaluation config's ``eval_pairs``) and are removed from the training
    pairs; if there are none, the last ``val_fraction`` of the training pairs
    are held out.
    """
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise InputError(f"dataset {root}: folder not found")
    dataset_json = _find_one(root, "*dataset*.json", exclude="evaluation")
    info = _read_json(dataset_json) if dataset_json else {}
    evaluation = _find_one(root, "*evaluation_config*.json")
    training = [e for e in info.get("training", []) if isinstance(e, dict) and "image" in e]
    mask_of = {_resolve(root, e["image"]): _resolve(root, e["mask"]) for e in training if e.get("mask")}
    direction = info.get("registration_direction", {})
    fixed_phase, moving_phase = int(direction.get("fixed", FIXED_PHASE)), int(direction.get("moving", MOVING_PHASE))

    if info.get("training_paired_images"):
        train = _pairs_from_entries(root, info["training_paired_images"], "training_paired_images", mask_of)
    else:
        images = [_resolve(root, e["image"]) for e in training] or sorted((root / "imagesTr").glob("*.nii*"))
        train = _pairs_by_case(images, mask_of, fixed_phase, moving_phase)
    val_entries = info.get("registration_val") or (_read_json(evaluation).get("eval_pairs", []) if evaluation else [])
    splits = {
        "train": train,
        "val": _pairs_from_entries(root, val_entries, "registration_val", mask_of),
        "test": _pairs_from_entries(root, info.get("registration_test", []), "registration_test", mask_of),
    }
    return hold_out_validation(splits, val_fraction)


def load_pairs_csv(path: str | Path, val_fraction: float = 0.2) -> dict[str, list[PairRecord]]:
    """The train/val/test pairs listed in a pairs CSV (:func:`LungUDRNetLib.pairs_csv.read_pairs_csv`)."""
    splits: dict[str, list[PairRecord]] = {split: [] for split in SPLITS}
    for row in read_pairs_csv(path):
        file = {column: row.files.get(column) for column in FILE_COLUMNS}
        points = {}
        if file["fixed_points"] and file["moving_points"]:
            points["points"] = (file["fixed_points"], file["moving_points"])
        splits[row.split].append(PairRecord(
            name=row.name, fixed=file["fixed"], moving=file["moving"], fixed_mask=file["fixed_mask"],
            moving_mask=file["moving_mask"], points=points, true_displacement=file["true_displacement"]))
    return hold_out_validation(splits, val_fraction)


def load_splits(data: str | Path | None = None, pairs: str | Path | None = None, val_fraction: float = 0.2,
                needed: tuple[str, ...] = ("train", "val")) -> dict[str, list[PairRecord]]:
    """Pairs from a Learn2Reg folder (``data``) or a pairs CSV (``pairs``): exactly one of them.

    Every file of the ``needed`` splits must exist (one InputError naming the dataset JSON or CSV and
    the missing files); the other splits are returned unchecked (Learn2Reg lists test images that
    may not be downloaded).
    """
    if (data is None) == (pairs is None):
        raise InputError("data: give either a Learn2Reg dataset folder (--data) or a pairs CSV (--pairs)")
    splits = load_learn2reg(data, val_fraction) if data is not None else load_pairs_csv(pairs, val_fraction)
    missing = [entry for split in needed for entry in missing_files(splits[split], split)]
    if missing:
        source = Path(os.path.abspath(data if data is not None else pairs))
        if source.is_dir():
            source = _find_one(source, "*dataset*.json", exclude="evaluation") or source
        more = f" (and {len(missing) - MAX_LISTED} more missing files)" if len(missing) > MAX_LISTED else ""
        raise InputError(f"dataset {source}: {'; '.join(missing[:MAX_LISTED])}{more}; restore the files or "
                         "correct their paths")
    return splits


def hold_out_validation(splits: dict[str, list[PairRecord]], val_fraction: float) -> dict[str, list[PairRecord]]:
    """Drop validation pairs from training; with no validation pairs, hold out the last training ones."""
    val_keys = {(p.fixed, p.moving) for p in splits["val"]}
    train = [p for p in splits["train"] if (p.fixed, p.moving) not in val_keys]
    val = splits["val"]
    if not val and len(train) > 1 and val_fraction > 0:
        count = min(max(1, math.ceil(val_fraction * len(train))), len(train) - 1)
        train, val = train[:-count], train[-count:]
    return {**splits, "train": train, "val": val}


def missing_files(pairs: list[PairRecord], split: str) -> list[str]:
    """``"<split> pair <name>: <what> <file> not found"`` for every file of ``pairs`` that does not exist."""
    missing = []
    for pair in pairs:
        files = {"fixed image": pair.fixed, "moving image": pair.moving, "fixed mask": pair.fixed_mask,
                 "moving mask": pair.moving_mask, "true displacement": pair.true_displacement}
        files.update({f"{kind} ({side})": p for kind, both in pair.points.items()
                      for side, p in zip(("fixed", "moving"), both)})
        missing += [f"{split} pair {pair.name}: {what} {file} not found"
                    for what, file in files.items() if file is not None and not os.path.lexists(file)]
    return missing
