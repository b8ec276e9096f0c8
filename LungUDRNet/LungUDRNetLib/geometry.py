"""The one place where coordinates and displacement fields change convention.

Conventions used throughout LungUDRNet:

* Physical space is ITK's **LPS** (x = right-to-Left, y = anterior-to-Posterior,
  z = inferior-to-Superior), in millimetres. 3D Slicer uses **RAS**; the two
  differ by the sign of the first two axes.
* A ``SimpleITK.Image`` maps a voxel index ``(i, j, k)`` to the LPS point
  ``origin + direction @ (spacing * (i, j, k))``. Its numpy array is indexed
  ``[k, j, i]`` (z, y, x); a torch tensor is ``[B, C, D, H, W]`` with
  D = k, H = j, W = i.
* A **displacement field** ``u`` is a resampling ("pull") field on the fixed
  image's grid: the fixed point ``p`` corresponds to the moving point
  ``p + u(p)``; ``warped(p) = moving(p + u(p))``. As a physical field it is a
  3-component vector image in LPS millimetres, components ordered (x, y, z).
  As a network ("voxel") field it is an array ``[3, D, H, W]`` in voxels of the
  network grid, channel c displacing along array axis c (D, H, W).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def direction_matrix(image: sitk.Image) -> np.ndarray:
    """The 3x3 direction cosine matrix of ``image`` (columns = index axes in LPS)."""
    return np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)


def index_to_lps_matrix(image: sitk.Image) -> np.ndarray:
    """4x4 homogeneous matrix mapping a voxel index (i, j, k) to LPS mm."""
    matrix = np.eye(4)
    matrix[:3, :3] = direction_matrix(image) @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def index_to_ras_matrix(image: sitk.Image) -> np.ndarray:
    """4x4 matrix mapping a voxel index (i, j, k) to RAS mm (Slicer's IJKToRAS)."""
    flip = np.eye(4)
    flip[:3, :3] = LPS_TO_RAS
    return flip @ index_to_lps_matrix(image)


def geometry_from_index_to_ras(matrix: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """Split a Slicer IJKToRAS matrix into SimpleITK (origin, spacing, direction) in LPS."""
    matrix = np.asarray(matrix, dtype=float)
    linear = LPS_TO_RAS @ matrix[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing
    origin = LPS_TO_RAS @ matrix[:3, 3]
    return tuple(origin), tuple(spacing), tuple(direction.ravel())


def lps_to_ras(points_or_vectors: np.ndarray) -> np.ndarray:
    """Flip the first two components of points or vectors (..., 3): LPS <-> RAS.

    The flip is its own inverse, so the same function converts RAS to LPS.
    """
    converted = np.array(points_or_vectors, dtype=float, copy=True)
    converted[..., :2] *= -1.0
    return converted


ras_to_lps = lps_to_ras


def voxel_flow_to_field(flow: np.ndarray, grid: sitk.Image) -> sitk.Image:
    """Network voxel flow ``[3, D, H, W]`` on ``grid`` -> physical LPS field on ``grid``.

    ``flow[c]`` is the displacement in voxels along array axis c (k, j, i).
    The result is a VectorFloat64 image with ``grid``'s geometry whose
    components are LPS millimetres.
    """
    flow = np.asarray(flow)
    if flow.shape != (3, *grid.GetSize()[::-1]):
        raise ValueError(f"flow shape {flow.shape} does not match grid size {grid.GetSize()[::-1]}")
    index_vectors = np.stack([flow[2], flow[1], flow[0]], axis=-1).astype(np.float64)  # (i, j, k)
    linear = direction_matrix(grid) @ np.diag(grid.GetSpacing())
    field = sitk.GetImageFromArray(index_vectors @ linear.T, isVector=True)
    field.CopyInformation(grid)
    return field


def field_to_voxel_flow(field: sitk.Image) -> np.ndarray:
    """Inverse of :func:`voxel_flow_to_field`: LPS mm field -> ``[3, D, H, W]`` voxels (float32)."""
    linear = direction_matrix(field) @ np.diag(field.GetSpacing())
    index_vectors = sitk.GetArrayViewFromImage(field) @ np.linalg.inv(linear).T
    return np.stack([index_vectors[..., 2], index_vectors[..., 1], index_vectors[..., 0]]).astype(np.float32)


def resample_field(field: sitk.Image, reference: sitk.Image,
                   pixel_type: int = sitk.sitkVectorFloat64) -> sitk.Image:
    """Linearly resample a physical (LPS mm) field onto ``reference``'s grid.

    Points outside the field's grid take the nearest edge vector, so a field
    computed on a cropped region continues smoothly rather than dropping to 0.
    ``pixel_type`` VectorFloat32 halves the memory of a large result.
    """
    return sitk.Resample(
        sitk.Cast(field, sitk.sitkVectorFloat64), reference, sitk.Transform(), sitk.sitkLinear,
        0.0, pixel_type, True,
    )


def flow_on_grid(flow: np.ndarray, grid: sitk.Image, target: sitk.Image) -> np.ndarray:
    """A network voxel flow [3, D, H, W] on ``grid`` as the voxel flow of the same physical field on
    ``target`` (e.g. between the network grid and the displacement grid of instance optimisation)."""
    return field_to_voxel_flow(resample_field(voxel_flow_to_field(flow, grid), target))


def covering_grid(grid: sitk.Image, reference: sitk.Image) -> tuple[sitk.Image, np.ndarray]:
    """``grid`` extended by whole nodes until its nodes span every voxel centre of ``reference``.

    The result is an empty VectorFloat32 image with ``grid``'s spacing,
    direction and node positions, shifted origin and more nodes; returned with
    the number of nodes added before ``grid``'s first one along each index axis
    (i, j, k). A field on it interpolates linearly, without extrapolating, at
    every point of ``reference`` between its first and last voxel centres.
    """
    size = np.asarray(reference.GetSize())
    corners = np.array([[i, j, k] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)])
    on_grid = points_to_index(index_to_points(corners.astype(float), reference), grid)
    tolerance = 1e-6  # nodes, so that a corner on a node adds none
    before = np.ceil(np.maximum(0.0, -on_grid.min(axis=0)) - tolerance).astype(int)
    after = np.ceil(np.maximum(0.0, on_grid.max(axis=0) - (np.asarray(grid.GetSize()) - 1)) - tolerance).astype(int)
    covering = sitk.Image([int(n) for n in np.asarray(grid.GetSize()) + before + after], sitk.sitkVectorFloat32, 3)
    covering.SetOrigin(tuple(float(v) for v in index_to_points(-before.astype(float), grid)[0]))
    covering.SetSpacing(grid.GetSpacing())
    covering.SetDirection(grid.GetDirection())
    return covering, before


def resized_grid(grid: sitk.Image, shape_xyz) -> sitk.Image:
    """An empty float32 image covering the same box as ``grid`` (outer voxel faces, same centre and
    direction) with ``shape_xyz`` voxels along (i, j, k); spacing = ``grid``'s box / shape. Averaging
    blocks of f^3 voxels of a grid of shape f * n gives the values at the voxels of the grid of shape n."""
    shape = np.asarray([int(n) for n in shape_xyz])
    if shape.shape != (3,) or shape.min() < 1:
        raise ValueError(f"grid shape must be three positive sizes, not {tuple(shape_xyz)}")
    spacing = np.asarray(grid.GetSize()) * np.asarray(grid.GetSpacing()) / shape
    centre = index_to_points((np.asarray(grid.GetSize(), dtype=float)[None] - 1) / 2, grid)[0]
    resized = sitk.Image([int(n) for n in shape], sitk.sitkFloat32)
    resized.SetSpacing(tuple(float(v) for v in spacing))
    resized.SetDirection(grid.GetDirection())
    resized.SetOrigin(tuple(float(v) for v in centre - direction_matrix(grid) @ (spacing * (shape - 1) / 2)))
    return resized


def field_to_transform(field: sitk.Image) -> sitk.DisplacementFieldTransform:
    """A ``DisplacementFieldTransform`` over a private float64 copy of ``field`` (which stays intact)."""
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


def warp_image(moving: sitk.Image, field: sitk.Image, interpolator: int = sitk.sitkLinear,
               default_value: float | None = None, transform: sitk.Transform | None = None) -> sitk.Image:
    """Resample ``moving`` at ``p + u(p)`` for every point p of ``field``'s grid.

    ``default_value`` fills points that fall outside ``moving``; by default the
    minimum of ``moving`` (air for CT, background for masks). ``transform``
    is ``field_to_transform(field)`` when the caller has built it already
    (``field`` then only gives the grid: any image on it will do).
    """
    if default_value is None:
        default_value = float(np.min(sitk.GetArrayViewFromImage(moving)))
    return sitk.Resample(moving, field, transform or field_to_transform(field), interpolator, default_value,
                         moving.GetPixelID())


def transform_points(points_lps: np.ndarray, field: sitk.Image | sitk.Transform) -> np.ndarray:
    """Map fixed points p (N, 3, LPS mm) to their moving correspondences p + u(p) (``field``: the pull field
    u, or a transform of fixed to moving points)."""
    transform = field if isinstance(field, sitk.Transform) else field_to_transform(field)
    return np.array([transform.TransformPoint(tuple(map(float, p))) for p in np.atleast_2d(points_lps)])


def index_to_points(indices: np.ndarray, image: sitk.Image) -> np.ndarray:
    """Continuous voxel indices (N, 3) in (i, j, k) order -> LPS mm points (N, 3)."""
    matrix = index_to_lps_matrix(image)
    return np.atleast_2d(indices) @ matrix[:3, :3].T + matrix[:3, 3]


def lps_bounds(image: sitk.Image, start=(0, 0, 0), size=None) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest LPS corner (mm) of the voxel block ``start`` + ``size`` (default: all of
    ``image``), taken at the voxels' outer edges, not their centres."""
    size = np.asarray(image.GetSize() if size is None else size)
    edges = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)]) * size + np.asarray(start) - 0.5
    corners = index_to_points(edges.astype(float), image)
    return corners.min(axis=0), corners.max(axis=0)


def describe_bounds(image: sitk.Image) -> str:
    """``"x a..b, y c..d, z e..f mm (LPS)"``: where ``image`` lies in physical space."""
    low, high = lps_bounds(image)
    return ", ".join(f"{axis} {a:.0f}..{b:.0f}" for axis, a, b in zip("xyz", low, high)) + " mm (LPS)"


def bounds_overlap(a: sitk.Image, b: sitk.Image) -> bool:
    """Whether the LPS boxes of two images share a volume."""
    (low_a, high_a), (low_b, high_b) = lps_bounds(a), lps_bounds(b)
    return bool(np.all(np.minimum(high_a, high_b) > np.maximum(low_a, low_b)))


def affine_points(transform: sitk.AffineTransform, points_lps: np.ndarray) -> np.ndarray:
    """``transform`` applied to LPS mm points (..., 3), vectorised: T(p) = A (p - c) + c + t."""
    matrix = np.asarray(transform.GetMatrix()).reshape(3, 3)
    centre, translation = np.asarray(transform.GetCenter()), np.asarray(transform.GetTranslation())
    return (points_lps - centre) @ matrix.T + centre + translation


def invert_affine(transform: sitk.Transform) -> sitk.AffineTransform:
    """The inverse of an affine (or rigid) map T(p) = A (p - c) + c + t, as an AffineTransform about the
    same centre: T^-1(q) = A^-1 (q - c) + c - A^-1 t."""
    inverse_matrix = np.linalg.inv(np.asarray(transform.GetMatrix()).reshape(3, 3))
    return sitk.AffineTransform(tuple(inverse_matrix.ravel()),
                                tuple(-inverse_matrix @ np.asarray(transform.GetTranslation())),
                                tuple(transform.GetCenter()))


def transform_to_field(transform: sitk.Transform, reference: sitk.Image,
                       pixel_type: int = sitk.sitkVectorFloat32) -> sitk.Image:
    """The pull field ``u(p) = T(p) - p`` (LPS mm) of ``transform`` on ``reference``'s grid."""
    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetReferenceImage(reference)
    to_field.SetOutputPixelType(pixel_type)
    return to_field.Execute(transform)


def compose_affine(transform: sitk.AffineTransform, field: sitk.Image) -> sitk.Image:
    """The pull field of "first ``field``, then ``transform``": ``u'(p) = T(p + u(p)) - p`` (LPS mm).

    ``field`` is a displacement (LPS mm) on any grid, e.g. the network's field
    between the fixed image and the moving image pre-aligned by ``T``; the
    result is on the same grid, VectorFloat32. As ``u'(p) = (T(p) - p) + A u(p)``
    (A: the matrix of ``T``) is linear in u, linear interpolation of the result
    is the composition of the interpolated field with ``T`` exactly.
    """
    matrix = np.asarray(transform.GetMatrix()).reshape(3, 3)
    affine_part = transform_to_field(transform, field, sitk.sitkVectorFloat64)  # kept alive while viewed
    vectors = sitk.GetArrayFromImage(field).astype(np.float64) @ matrix.T
    vectors += sitk.GetArrayViewFromImage(affine_part)
    composed = sitk.GetImageFromArray(vectors.astype(np.float32), isVector=True)
    composed.CopyInformation(field)
    return composed


def points_to_index(points_lps: np.ndarray, image: sitk.Image) -> np.ndarray:
    """LPS mm points (N, 3) -> continuous voxel indices (N, 3) in (i, j, k) order."""
    matrix = index_to_lps_matrix(image)
    return (np.atleast_2d(points_lps) - matrix[:3, 3]) @ np.linalg.inv(matrix[:3, :3]).T


def field_in_ras(field: sitk.Image) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A physical field as Slicer's oriented grid transform wants it.

    Returns ``(vectors, origin, spacing, direction)``: the displacement array
    (z, y, x, 3) in RAS mm and the grid's RAS origin (3,), spacing (3,) and
    3x3 direction matrix (columns = i, j, k axes in RAS).
    """
    vectors = lps_to_ras(sitk.GetArrayViewFromImage(field))
    origin = LPS_TO_RAS @ np.asarray(field.GetOrigin())
    direction = LPS_TO_RAS @ direction_matrix(field)
    return vectors, origin, np.asarray(field.GetSpacing()), direction


def field_from_ras(vectors: np.ndarray, origin: np.ndarray, spacing: np.ndarray,
                   direction: np.ndarray) -> sitk.Image:
    """Inverse of :func:`field_in_ras`: RAS grid + RAS vectors -> LPS VectorFloat64 field."""
    field = sitk.GetImageFromArray(lps_to_ras(vectors), isVector=True)
    field.SetOrigin(tuple(LPS_TO_RAS @ np.asarray(origin, dtype=float)))
    field.SetSpacing(tuple(float(s) for s in spacing))
    field.SetDirection(tuple((LPS_TO_RAS @ np.asarray(direction, dtype=float)).ravel()))
    return field
