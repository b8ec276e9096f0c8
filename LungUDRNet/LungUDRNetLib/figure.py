"""A one-page PNG of a registration: what a person looks at to judge it.

Rows: an axial and a coronal slice through the fixed image's centre (or a
chosen LPS point). Columns: fixed, moving, warped, fixed/warped checkerboard,
|fixed - moving| (before), |fixed - warped| (after), and the displacement
magnitude (mm) with the deformed grid drawn over it.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from .geometry import field_to_voxel_flow, points_to_index  # noqa: E402
from .io import atomic_path  # noqa: E402

WINDOW = (-1000.0, 200.0)  # HU shown from black to white


def _slices(volume: np.ndarray, centre: np.ndarray) -> dict[str, np.ndarray]:
    """Axial (k) and coronal (j) slices of a (k, j, i) array through voxel ``centre`` (i, j, k)."""
    i, j, k = np.clip(np.round(centre).astype(int), 0, np.asarray(volume.shape[::-1]) - 1)
    return {"axial": volume[k], "coronal": volume[:, j, :]}


def _checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    rows = (np.arange(a.shape[0]) * tiles // a.shape[0])[:, None]
    cols = (np.arange(a.shape[1]) * tiles // a.shape[1])[None, :]
    return np.where((rows + cols) % 2 == 0, a, b)


def save_registration_figure(fixed: sitk.Image, moving_on_fixed: sitk.Image, warped: sitk.Image,
                             displacement: sitk.Image, path: str | os.PathLike, title: str = "",
                             centre_lps: np.ndarray | None = None) -> Path:
    """Write the figure to ``path`` (atomically). All images share the fixed grid.

    ``moving_on_fixed`` is the moving image resampled onto the fixed grid without
    any transform (the 'before' state); ``displacement`` is the LPS mm field.
    """
    centre = (np.asarray(fixed.GetSize()) - 1) / 2.0 if centre_lps is None else \
        points_to_index(np.atleast_2d(centre_lps), fixed)[0]
    volumes = {name: sitk.GetArrayFromImage(image) for name, image in
               (("fixed", fixed), ("moving", moving_on_fixed), ("warped", warped))}
    magnitude = np.linalg.norm(sitk.GetArrayFromImage(displacement), axis=-1)
    flow = field_to_voxel_flow(displacement)  # voxels along (k, j, i)
    spacing = fixed.GetSpacing()
    aspects = {"axial": spacing[1] / spacing[0], "coronal": spacing[2] / spacing[0]}
    columns = ["fixed", "moving", "warped", "checkerboard", "|fixed − moving|", "|fixed − warped|", "|u| (mm)"]
    figure, axes = plt.subplots(2, len(columns), figsize=(3.0 * len(columns), 6.4))
    for row, view in enumerate(("axial", "coronal")):
        s = {name: _slices(v, centre)[view] for name, v in volumes.items()}
        panels = [s["fixed"], s["moving"], s["warped"], _checkerboard(s["fixed"], s["warped"]),
                  np.abs(s["fixed"] - s["moving"]), np.abs(s["fixed"] - s["warped"])]
        for col, panel in enumerate(panels):
            limits = (0.0, 600.0) if col >= 4 else WINDOW
            axes[row, col].imshow(panel, cmap="gray", vmin=limits[0], vmax=limits[1], aspect=aspects[view],
                                  origin="lower" if view == "coronal" else "upper")
        shown = _slices(magnitude, centre)[view]
        image = axes[row, -1].imshow(shown, cmap="magma", aspect=aspects[view],
                                     origin="lower" if view == "coronal" else "upper")
        _draw_deformed_grid(axes[row, -1], flow, centre, view)
        figure.colorbar(image, ax=axes[row, -1], fraction=0.046, pad=0.02)
        axes[row, 0].set_ylabel(view)
    for col, name in enumerate(columns):
        axes[0, col].set_title(name)
    for axis in axes.ravel():
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(title)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=90, format="png")
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
    for r in np.linspace(0, height - 1, lines).astype(int):
        axis.plot(moved_c[r], moved_r[r], color="cyan", linewidth=0.5)
    for c in np.linspace(0, width - 1, lines).astype(int):
        axis.plot(moved_c[:, c], moved_r[:, c], color="cyan", linewidth=0.5)
