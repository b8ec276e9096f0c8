"""``lungudrnet demo`` end to end, on a phantom CT instead of the sample CT (no download) and a small grid:
the files it writes, the Slicer scene that opens them (loaded by a real MRML scene, slicer-core), and the
field-of-view mask of its figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from LungUDRNetLib import demo, read_transform, synth
from LungUDRNetLib.figure import DPI, FIGURE_INCHES
from LungUDRNetLib.geometry import index_to_points, index_to_ras_matrix, lps_to_ras, points_to_index, ras_to_lps

from result_cases import demo_ct, demo_grid, tiny_model

DEMO_FILES = ["demo_scene.mrml", "displacement.nii.gz", "fixed.nii.gz", "metrics.json", "moving.nii.gz",
              "registration.png", "warped.nii.gz"]
# What the test extras add (slicer-core and vtk, pytest, ...): the demo must run without them.
TEST_ONLY_MODULES = ["_pytest", "h5py", "hypothesis", "neurite", "pytest", "pytest_benchmark", "skimage", "slicer",
                     "slicer_core", "voxelmorph", "vtk", "vtkmodules"]
# `lungudrnet demo` in a child process in which those cannot be imported, on the phantom instead of the sample CT.
DEMO_CHILD = f"""
import sys
sys.modules.update(dict.fromkeys({TEST_ONLY_MODULES!r}))  # importing one of them raises ImportError
sys.path.insert(0, {str(Path(__file__).parent)!r})
from result_cases import demo_ct, demo_grid
from LungUDRNetLib import sample_data, synth
from LungUDRNetLib.cli import main
sample_data.load_sample_ct = lambda name: demo_ct()
synth.learn2reg_like_grid = demo_grid
sys.exit(main(sys.argv[1:]))
"""


def demo_pair():
    """The CT and the pair as the demo makes them (bit-identical for the same arguments)."""
    ct = demo_ct()
    return ct, synth.make_breathing_pair(ct, seed=demo.DEMO_SEED, amplitude_mm=demo.DEMO_AMPLITUDE_MM,
                                         reference=demo_grid(ct))


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo")
    args = ["demo", "--out", str(folder / "out"), "--model", str(tiny_model(folder / "model.pt")), "--device", "cpu"]
    completed = subprocess.run([sys.executable, "-c", DEMO_CHILD, *args], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert "demo_scene.mrml (drag and drop into 3D Slicer)" in completed.stdout
    return folder / "out"


def test_demo_writes_the_pair_beside_the_results(demo_output):
    assert sorted(path.name for path in demo_output.iterdir()) == DEMO_FILES
    _, pair = demo_pair()
    for name, image in (("fixed", pair.fixed), ("moving", pair.moving)):
        written = sitk.ReadImage(str(demo_output / f"{name}.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(image))
        np.testing.assert_allclose(written.GetOrigin(), image.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(written.GetSpacing(), image.GetSpacing(), atol=1e-6)
    report = json.loads((demo_output / "metrics.json").read_text())
    assert report["after"]["tre_mm"]["mean"] < report["before"]["tre_mm"]["mean"]
    assert set(report["field_error_mm"]) == {"mean", "p90"}
    with Image.open(demo_output / "registration.png") as picture:
        assert picture.size == (round(FIGURE_INCHES[0] * DPI), round(FIGURE_INCHES[1] * DPI))


def test_demo_scene_opens_the_three_scans_and_the_transform_in_slicer(demo_output):
    slicer = pytest.importorskip("slicer")  # slicer-core, a test extra
    vtk = pytest.importorskip("vtk")
    scene = slicer.vtkMRMLScene()
    scene.SetURL(str(demo_output / demo.SCENE_FILE))
    assert scene.Import()
    volumes = {node.GetName(): node for node in scene.GetNodesByClass("vtkMRMLScalarVolumeNode")}
    assert sorted(volumes) == ["fixed", "moving", "warped"]
    for name, node in volumes.items():
        image = sitk.ReadImage(str(demo_output / f"{name}.nii.gz"))
        assert node.GetImageData().GetDimensions() == image.GetSize()
        np.testing.assert_allclose(node.GetSpacing(), image.GetSpacing(), atol=1e-5)
        ijk_to_ras = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(ijk_to_ras)
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(ijk_to_ras), index_to_ras_matrix(image), atol=1e-4)
    views = list(scene.GetNodesByClass("vtkMRMLSliceCompositeNode"))
    assert [(view.GetBackgroundVolumeID(), view.GetForegroundVolumeID()) for view in views] == \
        [(volumes["fixed"].GetID(), volumes["warped"].GetID())] * 3
    assert scene.GetNumberOfNodesByClass("vtkMRMLTransformNode") == 1
    transform = scene.GetFirstNodeByClass("vtkMRMLGridTransformNode")
    assert transform.GetName() == "displacement"

    # Slicer's transform maps a fixed point to its moving point in RAS; the file's field does so in LPS.
    field = sitk.ReadImage(str(demo_output / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    rng = np.random.default_rng(1)
    nodes = np.stack([rng.integers(2, n - 2, 100) for n in field.GetSize()], axis=1).astype(float)
    points_lps = index_to_points(nodes, field)  # grid nodes, where Slicer's cubic and ITK's linear interpolation agree
    expected_lps = np.array([read_transform(demo_output / "displacement.nii.gz").TransformPoint(tuple(p))
                             for p in points_lps])
    assert np.linalg.norm(expected_lps - points_lps, axis=1).max() > 5.0  # a real motion, so signs are checked
    from_parent = transform.GetTransformFromParent()
    mapped_ras = np.array([from_parent.TransformPoint(*p) for p in lps_to_ras(points_lps)])
    np.testing.assert_allclose(ras_to_lps(mapped_ras), expected_lps, atol=1e-3)


def test_in_view_keeps_the_voxels_with_ct_data_on_both_sides():
    """With no registration (u = 0), a fixed voxel p is in view when p and p + u_true(p) lie in the CT's box
    (and in the pair's grid): the padding above and below the CT is left out."""
    ct, pair = demo_pair()
    zero = sitk.Image(pair.fixed.GetSize(), sitk.sitkVectorFloat32, 3)
    zero.CopyInformation(pair.fixed)
    in_view = demo.in_view(pair, ct, zero)

    size = pair.fixed.GetSize()
    k, j, i = np.meshgrid(*(np.arange(n) for n in size[::-1]), indexing="ij")
    points = index_to_points(np.stack([i, j, k], axis=-1).reshape(-1, 3).astype(float), pair.fixed)
    pulled = points + sitk.GetArrayFromImage(pair.displacement).reshape(-1, 3)
    expected = np.ones(len(points), bool)
    for image, where in ((ct, points), (ct, pulled), (pair.fixed, pulled)):
        index = points_to_index(where, image)
        expected &= np.all((index >= -0.5) & (index < np.asarray(image.GetSize()) - 0.5), axis=1)
    np.testing.assert_array_equal(in_view, expected.reshape(size[::-1]))
    assert not in_view[0].any() and not in_view[-1].any()  # the slices above and below the CT
    assert 0.5 < in_view.mean() < 0.95
