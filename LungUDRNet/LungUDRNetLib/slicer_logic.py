"""MRML nodes <-> the LungUDRNet core: the logic of the Slicer module, usable without its GUI.

Needs only Slicer's MRML libraries (the Slicer application or the ``slicer-core``
package), VTK, numpy and the core library; torch is imported when a
registration runs. Nothing here uses ``slicer.mrmlScene``: the scene is taken
from the input nodes.

Coordinates: MRML nodes are in RAS millimetres, the core in LPS millimetres;
every conversion goes through :mod:`LungUDRNetLib.geometry`. Volumes are taken
in their own coordinates (the voxels and the full IJK->RAS matrix; parent
transforms are not applied) and all outputs are in the fixed volume's
coordinates:

* the warped volume: the moving volume resampled onto the fixed volume's grid;
* the transform: a grid transform on the fixed grid whose "from parent"
  displacement u (RAS mm) maps a fixed point p to the corresponding moving
  point p + u(p). As the parent of the moving volume it shows that volume
  aligned with the fixed one; hardened on a node drawn on the moving scan it
  moves the node into the fixed scan (Slicer inverts the field for that).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy

from .errors import InputError
from .geometry import field_in_ras, geometry_from_index_to_ras, index_to_ras_matrix

Progress = Callable[[float, str], None]
ATTRIBUTE_PREFIX = "LungUDRNet."
BINARY_LABELMAP = "Binary labelmap"


# --- volumes and fields -----------------------------------------------------------------------------

def image_from_volume(volume, what: str = "volume") -> sitk.Image:
    """A scalar volume node's voxels as a SimpleITK image with the node's full IJK->RAS geometry (in LPS).

    Spacing, origin and direction (oblique or flipped axes included) come from
    the node's IJK->RAS matrix; the voxel values are copied.
    """
    image_data = volume.GetImageData() if volume is not None else None
    if image_data is None:
        raise InputError(f"{what}: no volume selected, or it holds no image data")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise InputError(f"{what} '{volume.GetName()}': has {image_data.GetNumberOfScalarComponents()} "
                         "components per voxel; a scalar (CT) volume is needed")
    values = vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(image_data.GetDimensions()[::-1])
    image = sitk.GetImageFromArray(np.array(values))
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras)
    origin, spacing, direction = geometry_from_index_to_ras(slicer.util.arrayFromVTKMatrix(ijk_to_ras))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def update_volume_from_image(volume, image: sitk.Image) -> None:
    """Set a scalar volume node's voxels and IJK->RAS matrix from a SimpleITK image (LPS geometry)."""
    slicer.util.updateVolumeFromArray(volume, sitk.GetArrayFromImage(image))
    volume.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(index_to_ras_matrix(image)))


def update_grid_transform_from_field(transform, displacement: sitk.Image) -> None:
    """Make a transform node the resampling transform of a core displacement field.

    ``displacement`` is the core's pull field (LPS mm on the fixed grid). The
    node gets a ``vtkOrientedGridTransform`` on the same grid (RAS origin,
    spacing, direction matrix) holding the displacements in RAS mm, set as the
    transform "from parent": a fixed point p (RAS) maps to p + u(p).
    """
    vectors, origin, spacing, direction = field_in_ras(displacement)
    grid = vtk.vtkImageData()
    grid.SetOrigin(*origin)
    grid.SetSpacing(*spacing)
    grid.SetDimensions(*displacement.GetSize())
    grid.GetPointData().SetScalars(numpy_to_vtk(vectors.reshape(-1, 3).astype(np.float32), deep=True))
    grid_direction = np.eye(4)
    grid_direction[:3, :3] = direction
    grid_transform = slicer.vtkOrientedGridTransform()
    grid_transform.SetDisplacementGridData(grid)
    grid_transform.SetGridDirectionMatrix(slicer.util.vtkMatrixFromArray(grid_direction))
    grid_transform.SetInterpolationModeToLinear()
    transform.SetAndObserveTransformFromParent(grid_transform)


# --- registration -----------------------------------------------------------------------------------

@dataclass
class RegistrationOutput:
    """The nodes made by a registration, its metrics (as in ``metrics.json``) and notes for the user."""

    warped_volume: object
    transform: object
    report: dict
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Similarity before -> after, runtime and device on one line; then the notes, one per line."""
        before, after = self.report["before"], self.report["after"]
        parts = [f"NCC {before['ncc_percent']:.1f}% -> {after['ncc_percent']:.1f}%"]
        if "dice_percent" in after:
            parts.append(f"lung Dice {before['dice_percent']:.1f}% -> {after['dice_percent']:.1f}%")
        parts.append(f"{self.report['runtime_s']['total']:.1f} s on {self.report['device']}")
        return "; ".join(parts) + "".join(f"\n{note}" for note in self.notes)


class RegistrationLogic:
    """Register a moving CT volume node onto a fixed one with UDRNet; track lesions through the result.

    :meth:`process` runs in the calling thread (Python console, scripts,
    tests); :meth:`start` runs the same registration in a child process and
    returns a :class:`RegistrationJob` to poll or cancel (the module's panel).
    """

    def process(self, fixed_volume, moving_volume, fixed_mask=None, moving_mask=None, model=None,
                device: str = "auto", warped_volume=None, transform=None, show_aligned: bool = True,
                progress: Progress | None = None, refine_steps: int = 0) -> RegistrationOutput:
        """Register ``moving_volume`` onto ``fixed_volume`` and add the warped volume and transform.

        ``model``: checkpoint path, a ``UDRNet`` or None for the bundled weights;
        ``device``: ``"auto"`` (CUDA if available, else CPU), ``"cuda"`` or ``"cpu"``.
        ``warped_volume``/``transform``: nodes to fill, or None for new ones.
        ``show_aligned`` puts the moving volume under the transform.
        ``refine_steps`` > 0 refines the network's field on this pair (see ``register``).
        ``progress(fraction, message)`` is called between steps; an exception
        raised by it (e.g. :class:`~LungUDRNetLib.errors.CancelledError`)
        stops the run with the scene unchanged: nodes are made only at the end.
        """
        from .registration import register
        from .report import registration_report

        images = input_images(fixed_volume, moving_volume, fixed_mask, moving_mask)
        plan = OutputPlan(fixed_volume, moving_volume, warped_volume, transform, show_aligned, device)
        notes: list[str] = []
        with warnings_as_notes(notes):
            result = register(images["fixed"], images["moving"], model=model, device=device,
                              fixed_mask=images["fixed_mask"], moving_mask=images["moving_mask"], progress=progress,
                              refine_steps=refine_steps)
            report = registration_report(images["fixed"], images["moving"], result,
                                         images["fixed_mask"], images["moving_mask"])
        return plan.make(result.warped, result.displacement, report, notes)

    def start(self, fixed_volume, moving_volume, fixed_mask=None, moving_mask=None,
              model: str | Path | None = None, device: str = "auto", warped_volume=None, transform=None,
              show_aligned: bool = True, refine_steps: int = 0) -> RegistrationJob:
        """Like :meth:`process`, but in a child process (``lungudrnet register``); returns at once.

        The input volumes are copied now; the outputs are made by
        :meth:`RegistrationJob.finish`. ``model`` is a checkpoint path or None.
        """
        from .background import RegistrationProcess

        images = input_images(fixed_volume, moving_volume, fixed_mask, moving_mask)
        plan = OutputPlan(fixed_volume, moving_volume, warped_volume, transform, show_aligned, device)
        return RegistrationJob(RegistrationProcess(images, model=model, device=device, refine_steps=refine_steps), plan)

    def track_lesions(self, lesions, transform) -> LesionTracking:
        """Move lesions drawn on the moving scan into the fixed scan and measure how they moved.

        ``lesions`` is a segmentation or markups node in the moving volume's
        coordinates; ``transform`` a registration output. A copy of
        ``lesions`` is hardened through the transform (``lesions`` is left as
        it is), and a table node lists per segment or point the position
        before and after (RAS mm; the centroid for segments), the
        displacement (mm) and, for segments, the volume before and after (mL).
        """
        _ensure_segmentation_converters()
        before = lesion_positions(lesions)
        scene = lesions.GetScene()
        moved_name = scene.GenerateUniqueName(f"{lesions.GetName()} in fixed")
        moved = scene.AddNewNodeByClass(lesions.GetClassName(), moved_name)
        moved.CopyContent(lesions, True)
        moved.CreateDefaultDisplayNodes()
        moved.SetAndObserveTransformNodeID(transform.GetID())
        slicer.vtkSlicerTransformLogic.hardenTransform(moved)
        after = lesion_positions(moved)
        motions = [LesionMotion(name, position, moved_position, volume, moved_volume)
                   for (name, position, volume), (_, moved_position, moved_volume) in zip(before, after)]
        table = motion_table(scene, scene.GenerateUniqueName(f"{lesions.GetName()} motion"), motions)
        return LesionTracking(moved, table, motions)


def input_images(fixed_volume, moving_volume, fixed_mask=None, moving_mask=None) -> dict[str, sitk.Image | None]:
    """The input nodes as SimpleITK images (LPS), keyed like ``register()``'s arguments."""
    if moving_volume is not None and moving_volume is fixed_volume:
        raise InputError("moving volume: is the fixed volume; choose two different scans")
    images = {"fixed": image_from_volume(fixed_volume, "fixed volume"),
              "moving": image_from_volume(moving_volume, "moving volume")}
    for key, mask in (("fixed_mask", fixed_mask), ("moving_mask", moving_mask)):
        images[key] = None if mask is None else image_from_volume(mask, key.replace("_", " "))
    return images


@dataclass
class OutputPlan:
    """Where the results of one registration go, checked before it runs.

    :meth:`make` is the only step of a registration that changes the scene.
    """

    fixed_volume: object
    moving_volume: object
    warped_volume: object = None
    transform: object = None
    show_aligned: bool = True
    requested_device: str = "auto"

    def __post_init__(self) -> None:
        if self.warped_volume is not None and self.warped_volume in (self.fixed_volume, self.moving_volume):
            raise InputError("warped volume: choose a new volume, not one of the inputs")

    def make(self, warped: sitk.Image, displacement: sitk.Image, report: dict,
             notes: list[str]) -> RegistrationOutput:
        """Fill (or add) the warped volume and the transform from the core's results (LPS, fixed grid)."""
        fixed, moving = self.fixed_volume, self.moving_volume
        scene = fixed.GetScene()
        if scene is None or moving.GetScene() is not scene:
            raise InputError("fixed/moving volume: was removed from the scene during the registration")
        warped_volume, transform = self.warped_volume, self.transform
        if warped_volume is None:
            warped_volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                                    scene.GenerateUniqueName(f"{moving.GetName()} warped"))
        update_volume_from_image(warped_volume, warped)
        warped_volume.CreateDefaultDisplayNodes()
        if transform is None:
            name = f"{moving.GetName()} to {fixed.GetName()} (LungUDRNet)"
            transform = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", scene.GenerateUniqueName(name))
        update_grid_transform_from_field(transform, displacement)
        for node in (transform, warped_volume):
            _describe_result(node, fixed, moving, report)
        if self.show_aligned:
            moving.SetAndObserveTransformNodeID(transform.GetID())
        return RegistrationOutput(warped_volume, transform, report,
                                  device_notes(self.requested_device, report["device"]) + notes)


def _describe_result(node, fixed_volume, moving_volume, report: dict) -> None:
    """Reference the inputs (Slicer's registration roles) and record the model and device."""
    node.SetNodeReferenceID(slicer.vtkMRMLTransformNode.GetFixedNodeReferenceRole(), fixed_volume.GetID())
    node.SetNodeReferenceID(slicer.vtkMRMLTransformNode.GetMovingNodeReferenceRole(), moving_volume.GetID())
    node.SetAttribute(ATTRIBUTE_PREFIX + "model", str(report["model"].get("path") or "in-memory model"))
    node.SetAttribute(ATTRIBUTE_PREFIX + "device", str(report["device"]))


def device_notes(requested: str, used: str) -> list[str]:
    """A note when ``auto`` found no GPU and the registration ran on the CPU."""
    if requested == "auto" and used == "cpu":
        return ["No CUDA GPU available: ran on the CPU (slower)."]
    return []


@contextlib.contextmanager
def warnings_as_notes(notes: list[str]) -> Iterator[None]:
    """Collect the core's warnings (CPU fallback after GPU out-of-memory, NaN voxels...) into ``notes``."""

    class Collector(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notes.append(record.getMessage())

    logger = logging.getLogger("LungUDRNetLib")
    handler = Collector(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


class RegistrationJob:
    """A registration running in a child process (see :meth:`RegistrationLogic.start`).

    Call :meth:`poll` (e.g. from a GUI timer) until it returns True, then
    :meth:`finish` to make the output nodes; :meth:`cancel` stops the child
    and deletes its files. Only :meth:`finish` touches the scene.
    """

    def __init__(self, process, plan: OutputPlan) -> None:
        self._process = process
        self._plan = plan

    @property
    def fraction(self) -> float:
        """Progress in [0, 1]."""
        return self._process.fraction

    @property
    def message(self) -> str:
        """The current step, for a status line."""
        return self._process.message

    def poll(self) -> bool:
        """Read the child's new output; True once it has ended."""
        return self._process.poll()

    def finish(self) -> RegistrationOutput:
        """Read the results of the ended child and make the output nodes (raises the child's error)."""
        warped, displacement, report = self._process.results()
        return self._plan.make(warped, displacement, report, list(self._process.warnings))

    def cancel(self) -> None:
        """Stop the child and everything it started; the scene stays as it was."""
        self._process.cancel()


# --- lesion tracking --------------------------------------------------------------------------------

@dataclass
class LesionMotion:
    """Where one segment (its centroid) or point lies before and after, in RAS mm; volumes in mL."""

    name: str
    before: np.ndarray
    after: np.ndarray
    volume_before_ml: float | None = None
    volume_after_ml: float | None = None

    @property
    def displacement_mm(self) -> float:
        """Distance moved, in mm."""
        return float(np.linalg.norm(self.after - self.before))


@dataclass
class LesionTracking:
    """Result of :meth:`RegistrationLogic.track_lesions`."""

    node: object
    table: object
    motions: list[LesionMotion]


def lesion_positions(node) -> list[tuple[str, np.ndarray, float | None]]:
    """(name, RAS position in the node's own coordinates, volume in mL or None) per segment or point."""
    if isinstance(node, slicer.vtkMRMLSegmentationNode):
        segmentation = node.GetSegmentation()
        segmentation.CreateRepresentation(BINARY_LABELMAP)
        return [(segmentation.GetSegment(segment_id).GetName(), *segment_centroid_and_volume(node, segment_id))
                for segment_id in segmentation.GetSegmentIDs()]
    if isinstance(node, slicer.vtkMRMLMarkupsNode):
        positions = []
        for index in range(node.GetNumberOfControlPoints()):
            position = np.zeros(3)
            node.GetNthControlPointPosition(index, position)
            positions.append((node.GetNthControlPointLabel(index), position, None))
        return positions
    raise InputError(f"lesions '{node.GetName()}': need a segmentation or markups node, not {node.GetClassName()}")


def segment_centroid_and_volume(node, segment_id: str) -> tuple[np.ndarray, float]:
    """Centroid (RAS mm, node coordinates) and volume (mL) of a segment's binary labelmap."""
    labelmap = node.GetBinaryLabelmapInternalRepresentation(segment_id)
    label = node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    values = vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(labelmap.GetDimensions()[::-1])
    indices = np.argwhere(values == label)[:, ::-1] + np.asarray(labelmap.GetExtent()[::2])  # (i, j, k)
    image_to_ras = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(image_to_ras)
    matrix = slicer.util.arrayFromVTKMatrix(image_to_ras)
    centroid = (indices @ matrix[:3, :3].T + matrix[:3, 3]).mean(axis=0) if len(indices) else np.full(3, np.nan)
    return centroid, len(indices) * abs(np.linalg.det(matrix[:3, :3])) / 1000.0


def motion_table(scene, name: str, motions: list[LesionMotion]):
    """A table node with one row per lesion: positions before/after (RAS mm), displacement, volumes."""
    def column(title: str, values: list, array_class=vtk.vtkDoubleArray):
        array = array_class()
        array.SetName(title)
        for value in values:
            array.InsertNextValue(np.nan if value is None else value)
        return array

    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table.AddColumn(column("Lesion", [m.name for m in motions], vtk.vtkStringArray))
    for state in ("before", "after"):
        for axis, letter in enumerate("RAS"):
            table.AddColumn(column(f"{letter} {state} (mm)", [float(getattr(m, state)[axis]) for m in motions]))
    table.AddColumn(column("Displacement (mm)", [m.displacement_mm for m in motions]))
    table.AddColumn(column("Volume before (mL)", [m.volume_before_ml for m in motions]))
    table.AddColumn(column("Volume after (mL)", [m.volume_after_ml for m in motions]))
    return table


def _ensure_segmentation_converters() -> None:
    """Register the labelmap/surface converters (done by the Segmentations module in the Slicer app)."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if factory.ConstructRepresentationObjectByClass("vtkOrientedImageData") is None:
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())

