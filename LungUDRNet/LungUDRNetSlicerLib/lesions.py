"""Follow lesions drawn on the moving scan into the fixed scan through a registration's transform node.

Positions are RAS millimetres in the nodes' own coordinates; volumes in mL.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import slicer
import vtk
from vtk.util.numpy_support import vtk_to_numpy

from LungUDRNetLib.errors import InputError

BINARY_LABELMAP = "Binary labelmap"


def track_lesions(lesions, transform) -> LesionTracking:
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

