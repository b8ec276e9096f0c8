"""A one-page PNG of a registration: what a person looks at to judge it.

Rows: an axial and a coronal slice through the fixed image's centre (or a
chosen LPS point), in voxel order, with the patient's directions (R/L, A/P,
S/I) written at the panel edges. Columns: fixed, moving, warped, a
fixed/warped checkerboard of squares of equal size in mm, |fixed - moving|
(before) and |fixed - warped| (after) in HU with a colour bar, and the
displacement magnitude (mm) with the deformed grid drawn over it.

Where a scan holds no data (outside its field of view, where resampling fills
in a constant), a difference would show padding, not anatomy: given the
``in_view`` voxels, the difference panels leave the others out (shown in one
flat colour) and the checkerboard shows the fixed image there.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import patheffects  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from .geometry import direction_matrix, field_to_voxel_flow, points_to_index  # noqa: E402
from .io import atomic_path  # noqa: E402

WINDOW = (-1000.0, 200.0)  # HU shown from black to white
DIFFERENCE_RANGE = (0.0, 600.0)  # HU of |difference| shown from black to white
OUT_OF_VIEW_COLOUR = "#35527d"  # difference panels, where a scan holds no data
CHECKER_MM = 20.0  # side of a checkerboard square
FIGURE_INCHES = (21.0, 6.4)
DPI = 90
COLUMNS = ("fixed", "moving (before)", "warped (after)", "checkerboard fixed / warped",
           "|fixed − moving| before", "|fixed − warped| after", "displacement |u|, deformed grid")


def _slices(volume: np.ndarray, centre: np.ndarray) -> dict[str, np.ndarray]:
    """Axial (k) and coronal (j) slices of a (k, j, i) array through voxel ``centre`` (i, j, k)."""
    i, j, k = np.clip(np.round(centre).astype(int), 0, np.asarray(volume.shape[::-1]) - 1)
    return {"axial": volume[k], "coronal": volume[:, j, :]}


def difference_image(fixed: np.ndarray, other: np.ndarray, in_view: np.ndarray | None = None) -> np.ma.MaskedArray:
    """|fixed - other| (HU), masked where ``in_view`` is False (no data in one of the scans)."""
    difference = np.abs(np.asarray(fixed, dtype=np.float64) - other)
    return np.ma.masked_array(difference, mask=np.zeros(difference.shape, bool) if in_view is None else ~in_view)


def checkerboard(a: np.ndarray, b: np.ndarray, spacing: tuple[float, float], square_mm: float = CHECKER_MM,
                 in_view: np.ndarray | None = None) -> np.ndarray:
    """``a`` and ``b`` in alternate squares of ``square_mm`` on both axes (``spacing``: mm per row, per
    column), starting with ``a`` at [0, 0]; ``a`` wherever ``in_view`` is False."""
    rows = (np.arange(a.shape[0]) * spacing[0] // square_mm)[:, None]
    cols = (np.arange(a.shape[1]) * spacing[1] // square_mm)[None, :]
    show_b = (rows + cols) % 2 == 1
    return np.where(show_b if in_view is None else show_b & in_view, b, a)


def _towards(direction: np.ndarray, axis: int) -> tuple[str, str]:
    """Patient directions (towards lower index, towards higher index) along index axis ``axis`` (0 = i,
    1 = j, 2 = k), from the LPS direction matrix: the anatomical axis that the index axis runs closest to."""
    column = direction[:, axis]
    nearest = int(np.argmax(np.abs(column)))
    plus, minus = "LPS"[nearest], "RAI"[nearest]  # LPS: +x left, +y posterior, +z superior
    return (minus, plus) if column[nearest] > 0 else (plus, minus)


def orientation_letters(direction: np.ndarray, view: str) -> dict[str, str]:
    """The patient direction at each edge (left, right, top, bottom) of a panel as drawn here: columns are
    the i axis, rows j from the top (axial) or k from the bottom (coronal)."""
    left, right = _towards(direction, 0)
    low, high = _towards(direction, 1 if view == "axial" else 2)
    top, bottom = (low, high) if view == "axial" else (high, low)
    return {"left": left, "right": right, "top": top, "bottom": bottom}


def _label_edges(axis, letters: dict[str, str]) -> None:
    style = {"transform": axis.transAxes, "color": "yellow", "fontsize": 8, "fontweight": "bold",
             "path_effects": [patheffects.withStroke(linewidth=2, foreground="black")]}
    axis.text(0.02, 0.5, letters["left"], ha="left", va="center", **style)
    axis.text(0.98, 0.5, letters["right"], ha="right", va="center", **style)
    axis.text(0.5, 0.98, letters["top"], ha="center", va="top", **style)
    axis.text(0.5, 0.02, letters["bottom"], ha="center", va="bottom", **style)


def save_registration_figure(fixed: sitk.Image, moving_on_fixed: sitk.Image, warped: sitk.Image,
                             displacement: sitk.Image, path: str | os.PathLike, title: str = "",
                             centre_lps: np.ndarray | None = None, in_view: np.ndarray | None = None) -> Path:
    """Write the figure (``FIGURE_INCHES`` at ``DPI``) to ``path`` (atomically). All images share the fixed grid.

    ``moving_on_fixed`` is the moving image resampled onto the fixed grid without
    any transform (the 'before' state); ``displacement`` is the LPS mm field.
    ``in_view``: bool (z, y, x) on the fixed grid, True where the fixed scan and
    the moving scan, at p (before) and at p + u(p) (after), hold data; None: everywhere.
    """
    centre = (np.asarray(fixed.GetSize()) - 1) / 2.0 if centre_lps is None else \
        points_to_index(np.atleast_2d(centre_lps), fixed)[0]
    volumes = {name: sitk.GetArrayFromImage(image) for name, image in
               (("fixed", fixed), ("moving", moving_on_fixed), ("warped", warped))}
    volumes["in view"] = np.ones(volumes["fixed"].shape, bool) if in_view is None else in_view
    magnitude = np.linalg.norm(sitk.GetArrayFromImage(displacement), axis=-1)
    flow = field_to_voxel_flow(displacement)  # voxels along (k, j, i)
    sx, sy, sz = fixed.GetSpacing()
    spacings = {"axial": (sy, sx), "coronal": (sz, sx)}  # mm per row, per column
    difference_colours = plt.get_cmap("gray").with_extremes(bad=OUT_OF_VIEW_COLOUR)
    figure, axes = plt.subplots(2, len(COLUMNS), figsize=FIGURE_INCHES, layout="constrained")
    for row, view in enumerate(("axial", "coronal")):
        s = {name: _slices(v, centre)[view] for name, v in volumes.items()}
        shown = {"aspect": spacings[view][0] / spacings[view][1], "origin": "upper" if view == "axial" else "lower"}
        for col, panel in enumerate((s["fixed"], s["moving"], s["warped"],
                                     checkerboard(s["fixed"], s["warped"], spacings[view], in_view=s["in view"]))):
            axes[row, col].imshow(panel, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], **shown)
        for col, other in ((4, s["moving"]), (5, s["warped"])):
            image = axes[row, col].imshow(difference_image(s["fixed"], other, s["in view"]), cmap=difference_colours,
                                          vmin=DIFFERENCE_RANGE[0], vmax=DIFFERENCE_RANGE[1], **shown)
        figure.colorbar(image, ax=axes[row, 4:6], fraction=0.05, pad=0.02, label="|difference| (HU)")
        image = axes[row, 6].imshow(_slices(magnitude, centre)[view], cmap="magma", **shown)
        _draw_deformed_grid(axes[row, 6], flow, centre, view)
        figure.colorbar(image, ax=axes[row, 6], fraction=0.05, pad=0.02, label="|u| (mm)")
        axes[row, 0].set_ylabel(view)
        for axis in axes[row]:
            _label_edges(axis, orientation_letters(direction_matrix(fixed), view))
    for col, name in enumerate(COLUMNS):
        axes[0, col].set_title(name, fontsize=10)
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    if in_view is not None:
        title += "\nblue in the difference panels: outside the field of view of a scan (padding, not compared)"
    figure.suptitle(title)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=DPI, format="png")
    plt.close(figure)
    return Path(path)


def _draw_deformed_grid(axis, flow: np.ndarray, centre: np.ndarray, view: str, lines: int = 16) -> None:
    """Overlay grid lines x + u(x) (in-plane components) on a slice of the displacement magnitude."""
    i, j, k = np.clip(np.round(centre).astype(int), 0, np.asarray(flow.shape[:0:-1]) - 1)
    if view == "axial":
        rows, cols = flow[1, k], flow[2, k]  # in-plane: j (row), i (column)
    else:
        rows, cols = flow[0, :, j, :], flow[2, :, j, :]  # in-plane: k (row), i (column)
    height, width = rows.shape
    grid_r, grid_c = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    moved_r, moved_c = grid_r + rows, grid_c + cols
    limits = axis.get_xlim(), axis.get_ylim()
    for r in np.linspace(0, height - 1, lines).astype(int):
        axis.plot(moved_c[r], moved_r[r], color="cyan", linewidth=0.5)
    for c in np.linspace(0, width - 1, lines).astype(int):
        axis.plot(moved_c[:, c], moved_r[:, c], color="cyan", linewidth=0.5)
    axis.set_xlim(limits[0])  # the image's extent, not that of the lines
    axis.set_ylim(limits[1])
