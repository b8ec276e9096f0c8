"""``RegistrationResult.save`` and ``RegistrationResult.metrics``: the files and the report of ``lungudrnet
register``, from Python, made by the same code as the command line."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import SimpleITK as sitk

from LungUDRNetLib import register, registration
from LungUDRNetLib.cli import main
from LungUDRNetLib.errors import OutputError
from LungUDRNetLib.io import read_displacement_field

from result_cases import write_shifted_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_shifted_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture(scope="module")
def result(pair):
    return register(pair["fixed"], pair["moving"], model=pair["model"], device="cpu")


def assert_same_grid(image: sitk.Image, reference: sitk.Image) -> None:
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)


def test_save_writes_the_warped_scan_and_the_field_as_the_result_holds_them(result, tmp_path):
    paths = result.save(tmp_path / "new" / "folder", displacement_grid="fixed")
    assert sorted(paths) == ["displacement.nii.gz", "warped.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "new" / "folder").iterdir()) == sorted(paths)
    warped = sitk.ReadImage(str(paths["warped.nii.gz"]))
    assert_same_grid(warped, result.warped)
    assert warped.GetPixelID() == result.warped.GetPixelID()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(result.warped))
    field = read_displacement_field(paths["displacement.nii.gz"])
    assert_same_grid(field, result.displacement)
    np.testing.assert_allclose(sitk.GetArrayFromImage(field), sitk.GetArrayFromImage(result.displacement), atol=1e-6)
    assert np.abs(sitk.GetArrayFromImage(field)).max() > 5.0  # a real motion (the phantom's 6 mm shift)


def test_save_writes_the_native_field_by_default(result, tmp_path):
    paths = result.save(tmp_path)
    field = read_displacement_field(paths["displacement.nii.gz"])
    assert_same_grid(field, result.native_displacement)
    assert field.GetSize() != result.displacement.GetSize()
    np.testing.assert_allclose(sitk.GetArrayFromImage(field), sitk.GetArrayFromImage(result.native_displacement),
                               atol=1e-6)


def test_save_refuses_existing_files_unless_overwrite(result, pair, tmp_path):
    (tmp_path / "warped.nii.gz").write_bytes(b"keep me")
    with pytest.raises(OutputError, match="warped.nii.gz: already exists"):
        result.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["warped.nii.gz"]
    assert (tmp_path / "warped.nii.gz").read_bytes() == b"keep me"
    metrics = result.metrics(pair["fixed"], pair["moving"])
    paths = result.save(tmp_path, overwrite=True, metrics=metrics)
    assert sorted(paths) == ["displacement.nii.gz", "metrics.json", "warped.nii.gz"]
    assert json.loads(paths["metrics.json"].read_text()) == json.loads(json.dumps(metrics))


def test_metrics_computed_while_the_images_are_written(result, pair, tmp_path):
    """A Future of the metrics is awaited after the images; if it fails, no file is left and its error shows."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        paths = result.save(tmp_path / "ok", metrics=pool.submit(result.metrics, pair["fixed"], pair["moving"]))
    written = json.loads(paths["metrics.json"].read_text())
    assert written["after"]["ncc_percent"] == pytest.approx(result.metrics(pair["fixed"], pair["moving"])["after"]["ncc_percent"])

    def broken() -> dict:
        raise RuntimeError("report failed")

    with ThreadPoolExecutor(max_workers=1) as pool, pytest.raises(RuntimeError, match="report failed"):
        result.save(tmp_path / "failed", metrics=pool.submit(broken))
    assert not (tmp_path / "failed").exists()


def test_metrics_are_what_the_command_line_writes(pair, tmp_path, monkeypatch):
    """The same result, caught from inside ``lungudrnet register``: its ``metrics()`` is metrics.json."""
    results = []

    def register_and_keep(*args, **kwargs):
        results.append(register(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(registration, "register", register_and_keep)
    assert main(["register", "--fixed", str(pair["fixed"]), "--moving", str(pair["moving"]), "--out",
                 str(tmp_path), "--model", str(pair["model"]), "--device", "cpu"]) == 0
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == json.loads(json.dumps(results[0].metrics(pair["fixed"], pair["moving"])))
    assert written["stages"]["kept"] == "affine + network + instance optimisation"
    assert written["after"]["lung_ncc_percent"] > written["before"]["lung_ncc_percent"] + 50
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "warped.nii.gz"))),
                                  sitk.GetArrayFromImage(results[0].warped))
