"""MRML volume, segmentation and transform nodes <-> SimpleITK images (LPS) of the LungUDRNet core.

MRML nodes are in RAS millimetres, the core in LPS millimetres; every
conversion of coordinates goes through :mod:`LungUDRNetLib.geometry`. Nodes are
taken in their own coordinates (their voxels and full IJK->RAS matrix; parent
transforms are not applied).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy

from LungUDRNetLib.errors import InputError
from LungUDRNetLib.geometry import field_in_ras, geometry_from_index_to_ras, index_to_ras_matrix


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
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras)
    return _image(np.array(_voxels(image_data)), ijk_to_ras)


def _voxels(image_data) -> np.ndarray:
    """A view of a vtkImageData's scalars as a (z, y, x) array."""
    return vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(image_data.GetDimensions()[::-1])


def _image(voxels: np.ndarray, ijk_to_ras) -> sitk.Image:
    """A SimpleITK image of (z, y, x) ``voxels`` whose geometry (LPS) is the IJK->RAS ``vtkMatrix4x4``."""
    image = sitk.GetImageFromArray(voxels)
    origin, spacing, direction = geometry_from_index_to_ras(slicer.util.arrayFromVTKMatrix(ijk_to_ras))
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def update_volume_from_image(volume, image: sitk.Image) -> None:
    """Set a scalar volume node's voxels and IJK->RAS matrix from a SimpleITK image (LPS geometry)."""
    slicer.util.updateVolumeFromArray(volume, sitk.GetArrayViewFromImage(image))
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


def mask_from_node(node, reference_volume, what: str = "mask") -> sitk.Image:
    """A lung mask from a labelmap volume node or a segmentation node (all its segments), LPS geometry.

    A labelmap keeps its own grid (the core resamples masks onto their image's
    grid); a segmentation is merged on ``reference_volume``'s grid, as the
    Segment Editor draws it on that scan.
    """
    if not isinstance(node, slicer.vtkMRMLSegmentationNode):
        return image_from_volume(node, what)
    if node.GetSegmentation().GetNumberOfSegments() == 0:
        raise InputError(f"{what} '{node.GetName()}': the segmentation has no segments; draw the lungs first")
    geometry = slicer.vtkOrientedImageData()
    ijk_to_ras = vtk.vtkMatrix4x4()
    reference_volume.GetIJKToRASMatrix(ijk_to_ras)
    geometry.SetImageToWorldMatrix(ijk_to_ras)
    geometry.SetExtent(reference_volume.GetImageData().GetExtent())
    merged = slicer.vtkOrientedImageData()
    node.GenerateMergedLabelmapForAllSegments(merged, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, geometry)
    image_to_ras = vtk.vtkMatrix4x4()
    merged.GetImageToWorldMatrix(image_to_ras)
    return _image((_voxels(merged) > 0).astype(np.uint8), image_to_ras)
