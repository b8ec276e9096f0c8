"""The README's lines that read ``displacement.nii.gz`` as a transform (with ``LungUDRNetLib.read_transform`` and
with SimpleITK alone), run as they stand on the output of ``lungudrnet register``."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from LungUDRNetLib.cli import main
from LungUDRNetLib.geometry import index_to_points, ras_to_lps, resample_field
from LungUDRNetLib.report import overlap_mask

from result_cases import SHIFT_MM, write_shifted_pair

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet() -> str:
    """The README's Python block that reads ``displacement.nii.gz`` (section "The displacement-field
    convention"), as it stands there."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    matching = [block for block in blocks if "read_transform" in block]
    assert len(matching) == 1, "the README holds one Python block with read_transform"
    return matching[0]


SNIPPET = readme_snippet()

WARPED_TOLERANCE_HU = 0.01  # measured: 1.2e-4 HU at most (float32 rounding near -1000 HU)


@pytest.fixture
def snippet_run(tmp_path, monkeypatch) -> dict:
    """``lungudrnet register`` on a shifted phantom pair in the current folder, then the snippet's variables."""
    paths = write_shifted_pair(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["register", "--fixed", "exhale.nii.gz", "--moving", "inhale.nii.gz", "--out", "result",
                 "--model", str(paths["model"]), "--device", "cpu"]) == 0
    namespace: dict = {}
    exec(SNIPPET, namespace)
    return namespace


def test_snippet_resamples_the_moving_scan_into_warped_nii_gz(snippet_run):
    """Where the moving scan has data (elsewhere the snippet fills -1024, register the moving scan's minimum)."""
    fixed, moving, warped = snippet_run["fixed"], snippet_run["moving"], snippet_run["warped"]
    field = resample_field(sitk.ReadImage("result/displacement.nii.gz", sitk.sitkVectorFloat64), fixed)  # native grid
    inside = overlap_mask(fixed, moving, field)
    assert inside.mean() > 0.6
    written = sitk.GetArrayFromImage(sitk.ReadImage("result/warped.nii.gz"))
    difference = np.abs(sitk.GetArrayFromImage(warped) - written)[inside]
    assert difference.max() < WARPED_TOLERANCE_HU, difference.max()
    assert np.all(sitk.GetArrayFromImage(warped)[~inside] == -1024)
    # Both readers give the same transform.
    plain = sitk.Resample(moving, fixed, snippet_run["tx_sitk"], sitk.sitkLinear, -1024, sitk.sitkFloat32)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(plain), sitk.GetArrayFromImage(warped))


def test_snippet_transforms_map_fixed_points_by_the_stored_field(snippet_run):
    """At the field's voxel centres p: p -> p + u(p), with u read by nibabel from the NIfTI file (RAS) and
    turned into LPS here, independently of SimpleITK's reader."""
    nifti = nib.load("result/displacement.nii.gz")
    vectors_ras = np.asarray(nifti.dataobj)[:, :, :, 0, :]  # (x, y, z, 3)
    rng = np.random.default_rng(0)
    indices = np.stack([rng.integers(0, n, 200) for n in vectors_ras.shape[:3]], axis=1)
    field = sitk.ReadImage("result/displacement.nii.gz", sitk.sitkVectorFloat64)
    points = index_to_points(indices.astype(float), field)
    expected = points + ras_to_lps(vectors_ras[tuple(indices.T)])
    for name in ("tx", "tx_sitk"):
        mapped = np.array([snippet_run[name].TransformPoint(tuple(p)) for p in points])
        np.testing.assert_allclose(mapped, expected, atol=1e-4)
    shift = (expected - points).mean(axis=0)
    np.testing.assert_allclose(shift, SHIFT_MM, atol=0.5)  # the known motion, so the signs are checked too
    assert snippet_run["moving_point"] == snippet_run["tx"].TransformPoint((10.0, -20.0, 30.0))


def test_simpleitk_needs_the_field_as_64_bit_floats(snippet_run):
    """Why the snippet reads the field as VectorFloat64: the file's own float32 is refused."""
    with pytest.raises(RuntimeError, match="must be of pixel type: vector of 64-bit float"):
        sitk.DisplacementFieldTransform(sitk.ReadImage("result/displacement.nii.gz"))
