"""The voxelmorph package's network trained by our trainer and run by the bench peer."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LungUDRNetBench.peers import Options, voxelmorph_package
from LungUDRNetLib.checkpoint import load_model, read_checkpoint
from LungUDRNetLib.errors import ModelError
from LungUDRNetLib.io import read_image
from LungUDRNetLib.metrics import ncc
from LungUDRNetTrainerLib.config import resolve_config
from LungUDRNetTrainerLib.toydata import write_toy_learn2reg
from LungUDRNetTrainerLib.training import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-epoch smoke run of ``--model voxelmorph-package`` on the toy Learn2Reg data."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    toy = write_toy_learn2reg(tmp_path_factory.mktemp("toy"))
    run = tmp_path_factory.mktemp("run")
    config = resolve_config("smoke", overrides={"data": str(toy), "model": "voxelmorph-package", "epochs": 3,
                                                "learning_rate": 1e-3})
    progress = train(config, run)
    torch.set_num_threads(threads)
    return toy, run, progress


def test_trainer_trains_the_package_network(trained):
    _, run, progress = trained
    history = progress.history
    assert history[-1]["val_loss"] < 0.95 * history[0]["val_loss"]
    state = read_checkpoint(run / "best.pt")
    assert state["model_config"] == {"features": (4, 8, 8, 8), "architecture": "voxelmorph-package"}
    assert any(key.startswith("network.") for key in state["state_dict"])


def test_register_refuses_the_package_network_by_name(trained):
    _, run, _ = trained
    with pytest.raises(ModelError, match="voxelmorph package's network.*--voxelmorph-weights"):
        load_model(run / "best.pt")


def test_bench_peer_uses_the_trained_network_in_our_field_convention(trained):
    toy, run, _ = trained
    fixed = read_image(toy / "imagesTr" / "Toy_0006_0000.nii.gz")
    moving = read_image(toy / "imagesTr" / "Toy_0006_0001.nii.gz")
    field = voxelmorph_package(fixed, moving, Options(voxelmorph_weights=str(run / "best.pt")))
    assert field.GetSize() == fixed.GetSize() and field.GetOrigin() == fixed.GetOrigin()
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    warped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, -1024.0)
    as_array = lambda image: sitk.GetArrayFromImage(image).astype(np.float32)  # noqa: E731
    # the pipeline's pull field, applied by SimpleITK, moves the moving image towards the fixed one
    assert ncc(as_array(fixed), as_array(warped)) > ncc(as_array(fixed), as_array(moving)) + 0.002
