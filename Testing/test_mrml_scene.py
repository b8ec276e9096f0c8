"""The Slicer scene writer: its XML, and what a real MRML scene (slicer-core) makes of it, also when the
scene it is dropped into already holds nodes with the same IDs."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest
import SimpleITK as sitk

from LungUDRNetLib.geometry import index_to_ras_matrix
from LungUDRNetLib.io import write_displacement_field, write_image
from LungUDRNetLib.mrml_scene import MRML_VERSION, scene_xml, write_scene
from LungUDRNetLib.phantom import analytic_field, chest_phantom, make_grid

from conftest import oblique_direction

VOLUMES = {"fixed": "fixed.nii.gz", "moving": "scans/moving.nrrd"}
TRANSFORMS = {"displacement": "displacement.nii.gz"}


def test_scene_xml_lists_the_nodes_and_their_files():
    root = ElementTree.fromstring(scene_xml(VOLUMES, TRANSFORMS, background="fixed", foreground="moving"))
    assert root.tag == "MRML" and root.get("version") == MRML_VERSION
    nodes = {node.get("id"): node for node in root}
    assert [(node.tag, node.get("name")) for node in root if node.tag in ("Volume", "GridTransform")] == [
        ("Volume", "fixed"), ("Volume", "moving"), ("GridTransform", "displacement")]
    for node in root:
        if node.tag in ("Volume", "GridTransform"):
            storage = nodes[node.get("storageNodeRef")]
            assert storage.get("fileName") == {**VOLUMES, **TRANSFORMS}[node.get("name")]
            assert storage.tag == ("VolumeArchetypeStorage" if node.tag == "Volume" else "TransformStorage")
    views = [node for node in root if node.tag == "SliceComposite"]
    assert [view.get("singletonTag") for view in views] == ["Red", "Yellow", "Green"]
    for view in views:
        assert nodes[view.get("backgroundVolumeID")].get("name") == "fixed"
        assert nodes[view.get("foregroundVolumeID")].get("name") == "moving"
        assert view.get("foregroundOpacity") == "0.5"


def test_scene_without_views_has_no_slice_composite_nodes():
    root = ElementTree.fromstring(scene_xml({"ct": "ct.nii.gz"}))
    assert [node.tag for node in root] == ["Volume", "VolumeArchetypeStorage", "VolumeDisplay"]


def test_slicer_loads_the_scene_into_a_scene_with_the_same_ids(tmp_path):
    slicer = pytest.importorskip("slicer")  # slicer-core, a test extra
    vtk = pytest.importorskip("vtk")
    rotation = oblique_direction(20.0) @ np.diag([-1.0, 1.0, 1.0])  # right-handed: Slicer keeps the voxel order
    grid = make_grid((20, 18, 16), (2.0, 2.2, 2.8), (-20.0, -20.0, -20.0), rotation)
    images = {"fixed": chest_phantom(grid, seed=1), "moving": chest_phantom(grid, seed=2)}
    (tmp_path / "scans").mkdir()
    for name, image in images.items():
        write_image(image, tmp_path / VOLUMES[name])
    write_displacement_field(analytic_field(grid), tmp_path / "displacement.nii.gz")
    path = write_scene(tmp_path / "scene.mrml", VOLUMES, TRANSFORMS, background="fixed", foreground="moving")

    scene = slicer.vtkMRMLScene()
    earlier = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "earlier")  # takes vtkMRMLScalarVolumeNode1
    red = slicer.vtkMRMLSliceCompositeNode()  # the view that Slicer's layout already has
    red.SetSingletonTag("Red")
    scene.AddNode(red)
    scene.SetURL(str(path))
    assert scene.Import()

    volumes = {node.GetName(): node for node in scene.GetNodesByClass("vtkMRMLScalarVolumeNode")}
    assert sorted(volumes) == ["earlier", "fixed", "moving"]
    assert volumes["earlier"].GetID() == earlier.GetID() and volumes["earlier"].GetImageData() is None
    for name, image in images.items():
        node = volumes[name]
        assert node.GetImageData().GetDimensions() == image.GetSize()
        ijk_to_ras = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(ijk_to_ras)
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(ijk_to_ras), index_to_ras_matrix(image), atol=1e-5)
        assert (node.GetDisplayNode().GetWindow(), node.GetDisplayNode().GetLevel()) == (1500.0, -600.0)
    assert volumes["fixed"].GetID() != earlier.GetID()  # renamed on import
    assert red.GetBackgroundVolumeID() == volumes["fixed"].GetID()  # and the reference follows it
    assert red.GetForegroundVolumeID() == volumes["moving"].GetID()
    assert scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode") == 3
    transform = scene.GetFirstNodeByName("displacement")
    assert transform.GetClassName() == "vtkMRMLGridTransformNode"
    np.testing.assert_allclose(slicer.util.arrayFromGridTransform(transform),
                               sitk.GetArrayFromImage(analytic_field(grid)) * [-1.0, -1.0, 1.0], atol=1e-5)
