"""The pairs CSV: one fixed/moving pair per row, read by ``lungudrnet register --pairs`` and the trainer.

A header row names the columns, in any order::

    fixed,moving[,fixed_mask,moving_mask,fixed_points,moving_points][,split][,name][,true_displacement]

Without a header the first two to six columns are taken in that order. Paths
are absolute or relative to the CSV's folder. ``split`` is ``train``, ``val``
or ``test`` (default ``train``; the trainer's, ignored by ``register``);
``name`` names the pair; ``true_displacement`` is a known pull field (LPS mm
on the fixed grid) for the trainer's supervised term. Point files: see
:func:`read_points_lps`. Empty cells mean "not given".

Errors are :class:`~.errors.InputError` on one line naming the CSV, the row
(1 = the first pair after the header; its line in the file in brackets) and
the column.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import index_to_points
from .input_files import check_input_path
from .io import IMAGE_SUFFIXES, read_points

SPLITS = ("train", "val", "test")
CSV_COLUMNS = ("fixed", "moving", "fixed_mask", "moving_mask", "fixed_points", "moving_points")
EXTRA_CSV_COLUMNS = ("split", "name", "true_displacement")  # by header only
FILE_COLUMNS = (*CSV_COLUMNS, "true_displacement")
CASE_PHASE = re.compile(r"^(?P<case>.+)_(?P<phase>\d{4})$")


@dataclass(frozen=True)
class PairRow:
    """One row of a pairs CSV: its non-empty ``cells`` as written, and its file columns resolved."""

    source: Path  # the CSV
    number: int  # 1 = the first pair after the header
    line: int  # line in the CSV file
    cells: dict[str, str]
    files: dict[str, Path]

    @property
    def split(self) -> str:
        return self.cells.get("split", "train").lower()

    @property
    def name(self) -> str:
        """The ``name`` cell, else :func:`pair_name` of the two images."""
        return self.cells.get("name") or pair_name(self.files["fixed"], self.files["moving"])

    def where(self, column: str | None = None) -> str:
        """``pairs file X, row N (line L)[, column C]``: the start of an error message about this row."""
        return f"pairs file {self.source}, row {self.number} (line {self.line})" + (f", column {column}" if column
                                                                                    else "")

    def missing_files(self) -> list[str]:
        """One message per file of this row that does not exist (what kind of file it is, the readers check)."""
        return [f"{self.where(column)}: file {path} not found" for column, path in self.files.items()
                if not os.path.lexists(path)]


def read_pairs_csv(path: str | os.PathLike) -> list[PairRow]:
    """The rows of a pairs CSV (see the module docstring), checked: columns known, a fixed and a moving
    image in every row, a valid split. Whether the files exist is not checked (:meth:`PairRow.missing_files`)."""
    path = check_input_path(os.path.abspath(path), "pairs file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            numbered = [(reader.line_num, row) for row in reader]  # line_num: the row's last line
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"pairs file {path}: cannot be read as a CSV file ({error})") from None
    numbered = [(line, [cell.strip() for cell in row]) for line, row in numbered if any(c.strip() for c in row)]
    header = _header(path, numbered[0][1]) if numbered else None
    if header is not None:
        numbered = numbered[1:]
    return [_row(path, number, line, cells, header) for number, (line, cells) in enumerate(numbered, start=1)]


def _header(path: Path, cells: list[str]) -> list[str] | None:
    """The column names if ``cells`` is a header row (it names a known column), else None."""
    names = [cell.lower() for cell in cells]
    known = (*CSV_COLUMNS, *EXTRA_CSV_COLUMNS)
    if not any(name in known for name in names):
        return None
    unknown = [name for name in names if name and name not in known]
    if unknown:
        raise InputError(f"pairs file {path}: unknown columns {unknown} in the header (known: {', '.join(known)})")
    repeated = sorted({name for name in names if name and names.count(name) > 1})
    if repeated:
        raise InputError(f"pairs file {path}: column {repeated[0]} appears twice in the header")
    absent = [name for name in ("fixed", "moving") if name not in names]
    if absent:
        raise InputError(f"pairs file {path}: the header has no {' and no '.join(absent)} column "
                         f"(columns: {', '.join(name for name in names if name)}); every pair needs a fixed and a "
                         "moving image")
    return names


def _row(path: Path, number: int, line: int, cells: list[str], header: list[str] | None) -> PairRow:
    columns = header if header is not None else list(CSV_COLUMNS)
    where = f"pairs file {path}, row {number} (line {line})"
    extra = [cell for cell in cells[len(columns):] if cell]
    unnamed = [cell for name, cell in zip(columns, cells) if not name and cell]
    if extra or unnamed:
        names = "the header names" if header is not None else "without a header the columns are"
        raise InputError(f"{where}: has a value ({(extra or unnamed)[0]!r}) in a column without a name; {names} "
                         f"{', '.join(name for name in columns if name)}")
    values = {name: cell for name, cell in zip(columns, cells) if name and cell}
    for column in ("fixed", "moving"):
        if column not in values:
            raise InputError(f"{where}, column {column}: empty; every pair needs a fixed and a moving image")
    split = values.get("split", "train").lower()
    if split not in SPLITS:
        raise InputError(f"{where}, column split: {split!r} is not train, val or test")
    files = {column: resolve_path(path.parent, values[column]) for column in FILE_COLUMNS if column in values}
    return PairRow(path, number, line, values, files)


def resolve_path(root: Path, entry: str) -> Path:
    """``entry`` (absolute, or relative to ``root`` like ``./imagesTr/X.nii.gz``) as a normalised path."""
    return Path(os.path.normpath(root / entry))


def image_stem(path: Path) -> str:
    """File name without its image suffix: ``LungCT_0001_0000.nii.gz`` -> ``LungCT_0001_0000``."""
    name = path.name
    suffix = next((s for s in IMAGE_SUFFIXES if name.lower().endswith(s)), path.suffix)
    return name[: len(name) - len(suffix)]


def pair_name(fixed: Path, moving: Path) -> str:
    """The case name when both images are phases of one case (``LungCT_0001``), else ``fixed__moving``."""
    fixed_match, moving_match = CASE_PHASE.match(image_stem(fixed)), CASE_PHASE.match(image_stem(moving))
    if fixed_match and moving_match and fixed_match["case"] == moving_match["case"]:
        return fixed_match["case"]
    return f"{image_stem(fixed)}__{image_stem(moving)}"


def read_points_lps(path: str | os.PathLike, image: sitk.Image) -> np.ndarray:
    """Read a point file as LPS mm (N, 3): voxel x, y, z rows (x = first image axis; CSV as in Learn2Reg, or
    an elastix ``index`` file) are mapped through ``image``'s geometry; an elastix ``point`` file is LPS mm."""
    path = Path(path)
    points = read_points(path)
    first = path.read_text().lstrip().split(None, 1)
    is_world = bool(first) and first[0].lower() == "point"
    return points if is_world else index_to_points(points, image)
