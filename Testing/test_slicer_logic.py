"""The Slicer logic on a real MRML scene (slicer-core): geometry, transforms, hardening, files, lesions, cancel.

Volumes have oblique, flipped directions, anisotropic spacing and non-zero
origins, and the fixed and moving scans have different grids. Tests that need
a non-trivial field use the analytic field of :mod:`LungUDRNetLib.phantom`
through the same core->MRML conversion the logic uses; the end-to-end tests
use a network whose output is a fixed voxel shift (its last convolution has
zero weights and a constant bias), so the field is known to be non-zero.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import torch
import vtk
from vtk.util.numpy_support import vtk_to_numpy

from LungUDRNetLib import UDRNet, UDRNetConfig, geometry, register
from LungUDRNetLib.checkpoint import save_checkpoint, untrained_model
from LungUDRNetLib.comparison_nets import ComparisonNet, ComparisonNetConfig
from LungUDRNetLib.errors import CancelledError, InputError, LungUDRNetError
from LungUDRNetLib.io import read_displacement_field, write_displacement_field
from LungUDRNetLib.phantom import (analytic_displacement, analytic_field, chest_phantom, lung_mask_phantom,
                                   make_grid)
from LungUDRNetLib.preprocess import PreprocessConfig
from LungUDRNetSlicerLib.logic import RegistrationLogic
from LungUDRNetSlicerLib.volumes import (image_from_volume, mask_from_node, update_grid_transform_from_field,
                                         update_volume_from_image)

from conftest import oblique_direction
from robustness_cases import named_pipe

RAS_FLIP = np.array([-1.0, -1.0, 1.0])


@pytest.fixture
def images() -> dict[str, sitk.Image]:
    """A fixed and a moving phantom on different oblique, flipped, anisotropic grids with non-zero origins."""
    fixed_grid = make_grid((34, 32, 28), (2.0, 2.2, 2.8), (-35.0, -38.0, -40.0), oblique_direction(10.0))
    moving_grid = make_grid((36, 34, 30), (1.8, 2.0, 2.6), (-36.0, -30.0, -39.0), oblique_direction(-15.0))
    return {"fixed": chest_phantom(fixed_grid, seed=2), "moving": chest_phantom(moving_grid, seed=1)}


@pytest.fixture
def scene() -> slicer.vtkMRMLScene:
    return slicer.vtkMRMLScene()


def add_volume(scene, image: sitk.Image, name: str, class_name: str = "vtkMRMLScalarVolumeNode"):
    node = scene.AddNewNodeByClass(class_name, name)
    update_volume_from_image(node, image)
    return node


@pytest.fixture
def volumes(scene, images):
    return {key: add_volume(scene, image, key) for key, image in images.items()}


@pytest.fixture
def shift_model(tmp_path):
    """A small network (32^3 grid, 4 channels) whose output is the same voxel shift everywhere."""
    model = UDRNet(UDRNetConfig(encoder_channels=(4, 4, 4, 4), bottleneck_channels=4, decoder_channels=(4, 4, 4, 4)))
    with torch.no_grad():
        model.flow.weight.zero_()
        model.flow.bias.copy_(torch.tensor([1.0, -0.5, 0.75]))
    return save_checkpoint(tmp_path / "shift.pt", model, PreprocessConfig(grid_shape=(32, 32, 32)))


@pytest.fixture
def field_transform(scene, images):
    """The analytic field on the fixed grid, and a grid transform node made from it."""
    field = analytic_field(images["fixed"], translation_mm=(3.0, -2.0, 4.0), amplitude_mm=3.0, wavelength_mm=80.0)
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "field")
    update_grid_transform_from_field(node, field)
    return field, node


def node_snapshot(scene) -> list[tuple[str, str, int]]:
    """IDs, names and modification times of every node: equal snapshots mean an untouched scene."""
    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    return [(node.GetID(), node.GetName(), node.GetMTime()) for node in nodes]


def ijk_to_ras(volume) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def voxel_points(image: sitk.Image) -> np.ndarray:
    """LPS points (N, 3) of all voxels, in the order of the flattened numpy array (k, j, i)."""
    indices = np.indices(image.GetSize()[::-1]).reshape(3, -1).T[:, ::-1]  # (i, j, k) per voxel
    return geometry.index_to_points(indices.astype(float), image)


def interior_points(image: sitk.Image, count: int, seed: int = 0) -> np.ndarray:
    """Random LPS points at continuous indices at least 2 voxels inside ``image``."""
    size = np.asarray(image.GetSize())
    indices = np.random.default_rng(seed).uniform(2.0, size - 3.0, size=(count, 3))
    return geometry.index_to_points(indices, image)


def test_volume_nodes_keep_oblique_geometry_both_ways(scene, images):
    image = images["fixed"]
    node = add_volume(scene, image, "fixed")
    index = np.array([3.0, 7.5, 11.0, 1.0])
    expected_ras = np.asarray(image.TransformContinuousIndexToPhysicalPoint(tuple(index[:3]))) * RAS_FLIP
    np.testing.assert_allclose((ijk_to_ras(node) @ index)[:3], expected_ras, atol=1e-9)
    back = image_from_volume(node)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(image))
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(back.GetSpacing(), image.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-9)


def test_grid_transform_holds_the_field_in_ras_on_the_fixed_grid(images, field_transform):
    field, node = field_transform
    grid_transform = node.GetTransformFromParent()
    assert isinstance(grid_transform, slicer.vtkOrientedGridTransform)
    np.testing.assert_allclose(slicer.util.arrayFromGridTransform(node),
                               sitk.GetArrayViewFromImage(field) * RAS_FLIP, atol=1e-5)
    grid = grid_transform.GetDisplacementGrid()
    np.testing.assert_allclose(grid.GetOrigin(), np.asarray(field.GetOrigin()) * RAS_FLIP, atol=1e-9)
    np.testing.assert_allclose(grid.GetSpacing(), field.GetSpacing(), atol=1e-9)
    direction = slicer.util.arrayFromVTKMatrix(grid_transform.GetGridDirectionMatrix())[:3, :3]
    np.testing.assert_allclose(direction, np.diag(RAS_FLIP) @ geometry.direction_matrix(field), atol=1e-9)
    # Between grid points too: Slicer's fixed->moving mapping is the core's TransformPoint, in RAS.
    points = interior_points(images["fixed"], 50)
    mapped_ras = np.array([grid_transform.TransformPoint(*(p * RAS_FLIP)) for p in points])
    max_error = np.abs(mapped_ras * RAS_FLIP - geometry.transform_points(points, field)).max()
    assert max_error < 1e-4, max_error


def test_hardening_the_transform_on_the_moving_volume_reproduces_the_warp(scene, images, field_transform):
    """Slicer's hardening (vtkImageReslice) resamples the moving volume exactly as the core's warp does.

    The core's warped image is moving(p + u(p)) sampled at the fixed grid's voxels p (trilinear).
    Hardening a non-linear transform resamples the same function moving(x + u(x)), but onto a grid H
    of its own choosing: the moving volume's axes and spacing, widened to the transformed bounds, with
    an origin that is not on the fixed grid. Comparing H with the warped volume would need one more
    interpolation, whose error (up to hundreds of HU at phantom edges) would hide real mistakes. So
    the warp is evaluated with the core's own code path (SimpleITK ``Resample`` with the core's
    ``DisplacementFieldTransform``, as in ``geometry.warp_image``) at H's voxels, and compared where
    both are defined: H voxels at least 2 voxels inside the fixed grid (where the field is given;
    outside, VTK and ITK extrapolate it differently) and whose p + u(p) is 2 voxels inside the
    moving volume (outside, each fills with its own background). Tolerance: 0.05 HU on 1000 HU
    contrast (both are float trilinear interpolations of the same samples).
    """
    field, node = field_transform
    moving_copy = add_volume(scene, images["moving"], "moving copy")
    moving_copy.SetAndObserveTransformNodeID(node.GetID())
    slicer.vtkSlicerTransformLogic.hardenTransform(moving_copy)
    assert moving_copy.GetTransformNodeID() is None
    hardened = image_from_volume(moving_copy)
    expected = sitk.Resample(images["moving"], hardened, geometry.field_to_transform(field), sitk.sitkLinear, 0.0,
                             sitk.sitkFloat32)

    points = voxel_points(hardened)
    pulled = points + analytic_displacement(points, (3.0, -2.0, 4.0), 3.0, 80.0)
    inside = np.ones(len(points), bool)
    for image, where in ((images["fixed"], points), (images["moving"], pulled)):
        continuous = geometry.points_to_index(where, image)
        inside &= np.all((continuous >= 2) & (continuous <= np.asarray(image.GetSize()) - 3), axis=1)
    inside = inside.reshape(hardened.GetSize()[::-1])
    assert inside.sum() > 5000
    difference = np.abs(sitk.GetArrayViewFromImage(hardened) - sitk.GetArrayViewFromImage(expected))[inside]
    assert difference.max() < 0.05, difference.max()


def test_saved_transform_node_is_the_core_displacement_file(scene, images, field_transform, tmp_path):
    field, node = field_transform
    core_file = read_displacement_field(write_displacement_field(field, tmp_path / "displacement.nii.gz"))
    storage = node.CreateDefaultStorageNode()
    scene.AddNode(storage)
    for name in ("transform.nii.gz", "transform.h5"):
        storage.SetFileName(str(tmp_path / name))
        assert storage.WriteData(node)
    saved = sitk.ReadImage(str(tmp_path / "transform.nii.gz"), sitk.sitkVectorFloat64)
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(saved), sitk.GetArrayViewFromImage(core_file), atol=1e-5)
    np.testing.assert_allclose(saved.GetOrigin(), core_file.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(saved.GetSpacing(), core_file.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(saved.GetDirection(), core_file.GetDirection(), atol=1e-6)
    transform = sitk.ReadTransform(str(tmp_path / "transform.h5"))
    points = interior_points(images["fixed"], 20)
    mapped = np.array([transform.TransformPoint(tuple(p)) for p in points])
    np.testing.assert_allclose(mapped, geometry.transform_points(points, field), atol=1e-4)


def test_core_displacement_file_loads_as_a_transform_node_that_moves_points_alike(scene, images, tmp_path):
    """A ``displacement.nii.gz`` of the core, read by Slicer's transform storage node, is the same field.

    Slicer interpolates grid transforms read from files with cubic splines, ITK linearly, so points
    between grid nodes agree within 0.05 mm for this smooth field, and the grid itself exactly.
    """
    field = analytic_field(images["fixed"], translation_mm=(-2.0, 5.0, 1.0), amplitude_mm=2.0, wavelength_mm=70.0)
    path = write_displacement_field(field, tmp_path / "displacement.nii.gz")
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "loaded")
    storage = node.CreateDefaultStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    np.testing.assert_allclose(slicer.util.arrayFromGridTransform(node), sitk.GetArrayViewFromImage(field) * RAS_FLIP,
                               atol=1e-5)
    points = interior_points(images["fixed"], 30, seed=1)
    mapped_ras = np.array([node.GetTransformFromParent().TransformPoint(*(p * RAS_FLIP)) for p in points])
    max_error = np.abs(mapped_ras * RAS_FLIP - geometry.transform_points(points, field)).max()
    assert max_error < 0.05, max_error


def sphere_segmentation(scene, reference: sitk.Image, centre_lps: np.ndarray, radius_mm: float):
    """A segmentation node with one spherical segment drawn on ``reference``'s grid."""
    inside = np.linalg.norm(voxel_points(reference) - centre_lps, axis=1) <= radius_mm
    labelmap = slicer.vtkOrientedImageData()
    labelmap.SetDimensions(*reference.GetSize())
    labelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    vtk_to_numpy(labelmap.GetPointData().GetScalars())[:] = inside
    labelmap.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(geometry.index_to_ras_matrix(reference)))
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nodules")
    node.AddSegmentFromBinaryLabelmapRepresentation(labelmap, "nodule", [1.0, 0.0, 0.0])
    return node, int(inside.sum()) * float(np.prod(reference.GetSpacing())) / 1000.0


def grid_centre(image: sitk.Image) -> np.ndarray:
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint(tuple((np.asarray(image.GetSize()) - 1) / 2)))


def scaling_field(grid: sitk.Image, centre_lps: np.ndarray, translation_mm: np.ndarray, factor: float) -> sitk.Image:
    """The pull field u(p) = t + factor * (p - c) on ``grid``: c moves to c + t, sizes grow by 1 + factor."""
    vectors = translation_mm + factor * (voxel_points(grid) - centre_lps)
    field = sitk.GetImageFromArray(vectors.reshape(*grid.GetSize()[::-1], 3), isVector=True)
    field.CopyInformation(grid)
    return field


def test_points_drawn_on_the_moving_scan_land_where_the_core_maps_them(scene, images, field_transform):
    """Points drawn at q = p + u(p) on the moving scan are moved to the fixed point p.

    Slicer moves them with the inverse of the grid transform (Newton iterations, tolerance 0.01 mm),
    so within 0.02 mm.
    """
    field, transform = field_transform
    fixed_points = interior_points(images["fixed"], 5, seed=2)
    moving_points = geometry.transform_points(fixed_points, field)
    markups = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "targets")
    for point in moving_points:
        markups.AddControlPoint(vtk.vtkVector3d(*(point * RAS_FLIP)))

    tracked = RegistrationLogic().track_lesions(markups, transform)

    assert tracked.node is not markups and markups.GetTransformNodeID() is None
    assert tracked.table.GetNumberOfRows() == len(fixed_points)
    for motion, fixed_point, moving_point in zip(tracked.motions, fixed_points, moving_points):
        np.testing.assert_allclose(motion.before, moving_point * RAS_FLIP, atol=1e-9)
        np.testing.assert_allclose(motion.after * RAS_FLIP, fixed_point, atol=0.02)
        assert motion.displacement_mm == pytest.approx(np.linalg.norm(fixed_point - moving_point), abs=0.03)
        assert motion.volume_before_ml is None


def test_segments_drawn_on_the_moving_scan_land_where_the_core_maps_them(scene, images):
    """A sphere drawn on the moving scan lands, with its new volume, where the core maps its centre.

    The field maps the fixed grid's centre p to the moving grid's centre q (25 mm away) and scales by
    1.15 about it, so a sphere of volume V around q on the moving scan becomes one of volume
    V / 1.15^3 around p. Slicer resamples the segment with nearest-neighbour interpolation on
    1.8-2.6 mm voxels, so the centroid lands within 1 mm and the volume within 10% (a sphere of
    radius 10 mm: about 400 voxels before, 270 after; smaller spheres vary by up to 20%).
    """
    fixed_point, moving_point = grid_centre(images["fixed"]), grid_centre(images["moving"])
    field = scaling_field(images["fixed"], fixed_point, moving_point - fixed_point, 0.15)
    transform = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "scaling")
    update_grid_transform_from_field(transform, field)
    np.testing.assert_allclose(geometry.transform_points(fixed_point, field)[0], moving_point, atol=1e-6)
    segmentation, volume_ml = sphere_segmentation(scene, images["moving"], moving_point, radius_mm=10.0)

    tracked = RegistrationLogic().track_lesions(segmentation, transform)

    (motion,) = tracked.motions
    assert np.linalg.norm(motion.before * RAS_FLIP - moving_point) < 0.5
    assert np.linalg.norm(motion.after * RAS_FLIP - fixed_point) < 1.0
    assert motion.displacement_mm == pytest.approx(np.linalg.norm(moving_point - fixed_point), abs=1.0)
    assert motion.volume_before_ml == pytest.approx(volume_ml)
    assert motion.volume_after_ml == pytest.approx(volume_ml / 1.15 ** 3, rel=0.10)
    assert tracked.table.GetCellText(0, 0) == "nodule"


def test_process_outputs_the_core_result_as_nodes(scene, images, volumes, shift_model):
    fixed_array = slicer.util.arrayFromVolume(volumes["fixed"])
    fixed_array[0, 0, 0] = np.nan  # the core replaces it and warns: the warning reaches the notes
    slicer.util.arrayFromVolumeModified(volumes["fixed"])
    nodes_before = scene.GetNumberOfNodes()

    output = RegistrationLogic().process(volumes["fixed"], volumes["moving"], model=shift_model, device="auto")

    images["fixed"] = image_from_volume(volumes["fixed"])
    core = register(images["fixed"], images["moving"], model=shift_model, device="auto")
    core_vectors = sitk.GetArrayViewFromImage(core.native_displacement)
    assert np.abs(core_vectors).max() > 1.0  # a real motion, several mm
    np.testing.assert_allclose(slicer.util.arrayFromGridTransform(output.transform), core_vectors * RAS_FLIP, atol=1e-5)
    grid = output.transform.GetTransformFromParent().GetDisplacementGrid()
    np.testing.assert_allclose(grid.GetOrigin(), np.asarray(core.native_displacement.GetOrigin()) * RAS_FLIP, atol=1e-6)
    # At the fixed voxel centres the node's transform is the core's full-resolution field.
    indices = np.random.default_rng(0).integers(0, images["fixed"].GetSize(), size=(50, 3))
    fixed_points = geometry.index_to_points(indices, images["fixed"])
    node_points = np.array([output.transform.GetTransformFromParent().TransformPoint(*(point * RAS_FLIP))
                            for point in fixed_points]) * RAS_FLIP
    np.testing.assert_allclose(node_points, geometry.transform_points(fixed_points, core.displacement), atol=1e-3)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(output.warped_volume),
                               sitk.GetArrayViewFromImage(core.warped), atol=1e-4)
    np.testing.assert_allclose(ijk_to_ras(output.warped_volume), ijk_to_ras(volumes["fixed"]), atol=1e-9)

    assert scene.GetNumberOfNodes() > nodes_before
    assert volumes["moving"].GetTransformNodeID() == output.transform.GetID()
    for node in (output.transform, output.warped_volume):
        assert node.GetNodeReference(slicer.vtkMRMLTransformNode.GetFixedNodeReferenceRole()) is volumes["fixed"]
        assert node.GetNodeReference(slicer.vtkMRMLTransformNode.GetMovingNodeReferenceRole()) is volumes["moving"]
        assert node.GetAttribute("LungUDRNet.model") == str(shift_model)
    assert any("NaN" in note for note in output.notes)
    assert any("CPU" in note for note in output.notes) == (not torch.cuda.is_available())
    assert "NCC" in output.summary() and output.report["after"]["ncc_percent"] != output.report["before"]["ncc_percent"]

    # Registering again fills the same nodes and reads the moving volume in its own coordinates.
    again = RegistrationLogic().process(volumes["fixed"], volumes["moving"], model=shift_model, device="cpu",
                                        warped_volume=output.warped_volume, transform=output.transform)
    assert (again.warped_volume, again.transform) == (output.warped_volume, output.transform)
    np.testing.assert_allclose(slicer.util.arrayFromGridTransform(again.transform), core_vectors * RAS_FLIP, atol=1e-4)


def segmentation_from_mask(scene, mask: sitk.Image, name: str):
    """A segmentation node made from a mask by Slicer's own labelmap import, as the Segment Editor stores it."""
    labelmap = add_volume(scene, mask, f"{name} labelmap", "vtkMRMLLabelMapVolumeNode")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    scene.RemoveNode(labelmap)
    return segmentation


def test_a_segmentation_is_a_mask_on_its_volumes_grid(scene, images, volumes):
    mask = lung_mask_phantom(images["moving"])
    segmentation = segmentation_from_mask(scene, mask, "lungs")
    from_segmentation = mask_from_node(segmentation, volumes["moving"], "moving mask")
    assert from_segmentation.GetSize() == images["moving"].GetSize()
    np.testing.assert_allclose(from_segmentation.GetOrigin(), images["moving"].GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(from_segmentation.GetDirection(), images["moving"].GetDirection(), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(from_segmentation), sitk.GetArrayViewFromImage(mask))
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nothing drawn")
    with pytest.raises(InputError, match="nothing drawn.*no segments"):
        mask_from_node(empty, volumes["moving"], "moving mask")


def test_a_comparison_network_checkpoint_loads_in_the_slicer_logic(scene, images, volumes, tmp_path):
    network = ComparisonNet(ComparisonNetConfig("transunet", encoder_channels=(4, 4, 4, 4), bottleneck_channels=4,
                                                decoder_channels=(4, 4, 4, 4)))
    with torch.no_grad():
        network.flow.weight.zero_()
        network.flow.bias.copy_(torch.tensor([1.0, -0.5, 0.75]))
    path = save_checkpoint(tmp_path / "transunet.pt", network, PreprocessConfig(grid_shape=(32, 32, 32)))

    output = RegistrationLogic().process(volumes["fixed"], volumes["moving"], model=path, device="cpu",
                                        show_aligned=False)

    core = register(images["fixed"], images["moving"], model=path, device="cpu")
    core_vectors = sitk.GetArrayViewFromImage(core.native_displacement)  # a view: ``core`` must outlive it
    assert np.abs(core_vectors).max() > 1.0
    np.testing.assert_allclose(slicer.util.arrayFromGridTransform(output.transform), core_vectors * RAS_FLIP, atol=1e-4)
    assert output.transform.GetAttribute("LungUDRNet.model") == str(path)


def test_segmentations_as_masks_give_the_labelmaps_result(scene, images, volumes, shift_model):
    masks = {key: lung_mask_phantom(images[key]) for key in ("fixed", "moving")}
    labelmaps = {key: add_volume(scene, mask, f"{key} mask", "vtkMRMLLabelMapVolumeNode") for key, mask in masks.items()}
    segmentations = {key: segmentation_from_mask(scene, mask, f"{key} lungs") for key, mask in masks.items()}
    logic = RegistrationLogic()
    by_labelmap = logic.process(volumes["fixed"], volumes["moving"], labelmaps["fixed"], labelmaps["moving"],
                                model=shift_model, device="cpu", show_aligned=False)
    by_segmentation = logic.process(volumes["fixed"], volumes["moving"], segmentations["fixed"],
                                    segmentations["moving"], model=shift_model, device="cpu", show_aligned=False)
    assert by_segmentation.report["after"]["dice_percent"] > 0.0  # the masks overlap: a real Dice to compare
    for state in ("before", "after"):
        assert by_segmentation.report[state]["dice_percent"] == pytest.approx(by_labelmap.report[state]["dice_percent"])
    np.testing.assert_allclose(slicer.util.arrayFromGridTransform(by_segmentation.transform),
                               slicer.util.arrayFromGridTransform(by_labelmap.transform), atol=1e-5)


def test_process_rejects_unusable_inputs(scene, volumes):
    logic = RegistrationLogic()
    with pytest.raises(InputError, match="moving volume"):
        logic.process(volumes["fixed"], None)
    with pytest.raises(InputError, match="two different scans"):
        logic.process(volumes["fixed"], volumes["fixed"])
    with pytest.raises(InputError, match="warped volume"):
        logic.process(volumes["fixed"], volumes["moving"], warped_volume=volumes["moving"])


def test_process_refuses_a_sheared_volume_and_a_model_that_is_not_a_file(scene, volumes, shift_model, tmp_path):
    """A volume whose IJK->RAS matrix shears its axes cannot carry an exact result; a named pipe as the model
    would block the reader: each is one InputError/ModelError naming it, and the scene gets no new node."""
    logic = RegistrationLogic()
    matrix = vtk.vtkMatrix4x4()
    volumes["fixed"].GetIJKToRASMatrix(matrix)
    matrix.SetElement(0, 1, matrix.GetElement(0, 1) + 0.5 * matrix.GetElement(1, 1))
    sheared = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "sheared")
    sheared.SetAndObserveImageData(volumes["fixed"].GetImageData())
    sheared.SetIJKToRASMatrix(matrix)
    nodes = scene.GetNumberOfNodes()
    with pytest.raises(InputError, match="^fixed image: has a direction matrix whose axes are not orthonormal"):
        logic.process(sheared, volumes["moving"], model=shift_model, device="cpu")
    with named_pipe(tmp_path / "pipe.pt") as pipe, pytest.raises(LungUDRNetError, match=r"^model .*pipe.pt: is a "
                                                                                      r"named pipe \(FIFO\)"):
        logic.process(volumes["fixed"], volumes["moving"], model=pipe, device="cpu")
    assert scene.GetNumberOfNodes() == nodes


def test_cancelling_process_leaves_the_scene_unchanged(scene, volumes, shift_model):
    def cancel_when_the_network_starts(fraction: float, message: str) -> None:
        if fraction >= 0.3:
            raise CancelledError("cancelled by the test")

    before = node_snapshot(scene)
    with pytest.raises(CancelledError):
        RegistrationLogic().process(volumes["fixed"], volumes["moving"], model=shift_model,
                                    progress=cancel_when_the_network_starts)
    assert node_snapshot(scene) == before


def wait_for(job, condition, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out at {job.fraction:.0%}: {job.message}"
        time.sleep(0.02)


@pytest.mark.parametrize("fast", [True, False])
def test_background_job_gives_the_in_process_result(scene, volumes, shift_model, fast):
    logic = RegistrationLogic()
    in_process = logic.process(volumes["fixed"], volumes["moving"], model=shift_model, device="cpu",
                               show_aligned=False, fast=fast)
    assert ("instance optimisation" in in_process.report["runtime_s"]) != fast
    before = node_snapshot(scene)

    job = logic.start(volumes["fixed"], volumes["moving"], model=shift_model, device="cpu",
                      fast=fast)
    wait_for(job, job.poll)
    assert node_snapshot(scene) == before  # nothing is made before finish()
    output = job.finish()

    assert job.fraction == 1.0
    # Instance optimisation sums in another thread order in the child: fields agree to 1e-3 mm, and the
    # warped int16 CT to 1 HU (a voxel may round the other way).
    np.testing.assert_allclose(slicer.util.arrayFromGridTransform(output.transform),
                               slicer.util.arrayFromGridTransform(in_process.transform), atol=1e-3)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(output.warped_volume),
                               slicer.util.arrayFromVolume(in_process.warped_volume), atol=1.0)
    np.testing.assert_allclose(ijk_to_ras(output.warped_volume), ijk_to_ras(volumes["fixed"]), atol=1e-9)
    assert output.report["device"] == "cpu" and output.report["runtime_s"].keys() == in_process.report["runtime_s"].keys()
    assert volumes["moving"].GetTransformNodeID() == output.transform.GetID()


def test_cancelling_a_background_job_kills_it_and_leaves_the_scene_unchanged(scene, volumes, tmp_path):
    model, _, _ = untrained_model()
    slow_model = save_checkpoint(tmp_path / "slow.pt", model, PreprocessConfig(grid_shape=(96, 96, 96)))
    before = node_snapshot(scene)
    job = RegistrationLogic().start(volumes["fixed"], volumes["moving"], model=slow_model, device="cpu")
    folder = job._process._folder

    wait_for(job, lambda: job.poll() or job.fraction >= 0.3)  # the network is running (seconds at 96^3)
    assert not job.poll()
    job.cancel()

    assert job._process.returncode != 0
    assert not folder.exists()
    assert node_snapshot(scene) == before


def test_background_job_reports_the_childs_error(scene, volumes, tmp_path):
    job = RegistrationLogic().start(volumes["fixed"], volumes["moving"], model=tmp_path / "missing.pt")
    wait_for(job, job.poll)
    with pytest.raises(LungUDRNetError, match="missing.pt"):
        job.finish()
    assert not job._process._folder.exists()
