"""Compute device and memory: an unavailable device is refused, out of GPU memory retries once on the CPU,
and a volume too large for the memory limit is refused from its header, before any voxel is read."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LungUDRNetLib import io, register, registration
from LungUDRNetLib.cli import main
from LungUDRNetLib.errors import DeviceError, ResourceError

from robustness_cases import checksums, register_args, write_case


def test_cuda_without_cuda_is_refused_naming_the_device(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    files = write_case(tmp_path / "case")
    before = checksums(tmp_path)
    args = register_args(files, tmp_path / "out")
    args[args.index("--device") + 1] = "cuda"
    assert main(args) == DeviceError.exit_code == 2
    assert capsys.readouterr().err == ("lungudrnet: error: device 'cuda': CUDA is not available on this machine; "
                                       "use --device cpu or auto\n")
    with pytest.raises(DeviceError, match="device 'cuda:1': CUDA is not available"):
        register(files["fixed"], files["moving"], model=files["model"], device="cuda:1")
    assert not (tmp_path / "out").exists() and checksums(tmp_path) == before


@pytest.fixture
def gpu_out_of_memory(monkeypatch):
    """A 'CUDA' device whose every network run is out of memory; returns the devices the network was run on."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    forward = registration._forward
    devices = []

    def out_of_memory_off_the_cpu(model, fixed, moving, device):
        devices.append(device.type)
        if device.type != "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(model, fixed, moving, device)

    monkeypatch.setattr(registration, "_forward", out_of_memory_off_the_cpu)
    return devices


def test_out_of_gpu_memory_retries_once_on_the_cpu_and_reports_it(tmp_path, caplog, gpu_out_of_memory):
    files = write_case(tmp_path / "case")
    with caplog.at_level(logging.WARNING, logger="LungUDRNetLib"):
        result = register(files["fixed"], files["moving"], model=files["model"], device="cuda")
    # one try on the GPU, then the CPU for this and every later network run of the pipeline
    assert gpu_out_of_memory[:2] == ["cuda", "cpu"] and set(gpu_out_of_memory[2:]) <= {"cpu"}
    assert caplog.text.count("out of memory on cuda; retrying on the CPU (slower)") == 1
    assert result.device == "cpu" and np.isfinite(sitk.GetArrayViewFromImage(result.displacement)).all()

    args = register_args(files, tmp_path / "out")
    args[args.index("--device") + 1] = "cuda"
    assert main(args) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["device"] == "cpu"


def test_out_of_memory_on_the_cpu_too_is_a_resource_error(tmp_path, capsys, monkeypatch):
    def out_of_memory(*args):
        raise torch.OutOfMemoryError("DefaultCPUAllocator: not enough memory")

    monkeypatch.setattr(registration, "_forward", out_of_memory)
    files = write_case(tmp_path / "case")
    before = checksums(tmp_path)
    assert main(register_args(files, tmp_path / "out")) == ResourceError.exit_code == 4
    assert capsys.readouterr().err == ("lungudrnet: error: network: ran out of memory on the CPU for a 16x16x16 grid; "
                                       "close other programs or use a model with a smaller grid\n")
    assert not (tmp_path / "out").exists() and checksums(tmp_path) == before


# --- huge volumes ---------------------------------------------------------------------------------------------

HUGE = (512, 512, 700)


def _huge_image(folder: Path) -> Path:
    """A MetaImage header for a 512 x 512 x 700 int16 CT (367 MB) whose voxel file is sparse: no disk used."""
    voxels = folder / "huge.raw"
    with voxels.open("wb") as handle:
        handle.truncate(int(np.prod(HUGE)) * 2)
    header = folder / "huge.mha"
    header.write_text(f"ObjectType = Image\nNDims = 3\nDimSize = {' '.join(map(str, HUGE))}\n"
                      "ElementSpacing = 0.7 0.7 0.5\nElementType = MET_SHORT\nElementDataFile = huge.raw\n")
    return header


def test_a_huge_volume_over_the_memory_limit_is_refused_before_its_voxels_are_read(tmp_path, capsys, monkeypatch):
    def read_image(path, *args):
        raise AssertionError(f"the voxels of {path} were read")

    for module in (io, registration):
        monkeypatch.setattr(module, "read_image", read_image)
    files = write_case(tmp_path / "case")
    files["fixed"] = _huge_image(tmp_path / "case")
    assert io.read_image_header(files["fixed"]).size == HUGE
    before = checksums(tmp_path)
    expected = (r"registration onto the 512x512x700-voxel fixed image: needs about (\d+\.\d) GiB of memory but "
                r"{} is allowed by --max-memory; close other programs, raise --max-memory if more is free, or crop "
                r"or downsample the images")
    with pytest.raises(ResourceError, match=expected.format(r"2\.0 GiB")) as error:
        register(files["fixed"], files["moving"], model=files["model"], device="cpu", max_memory="2G")
    assert float(re.search(expected.format(".*"), str(error.value))[1]) > 2 * np.prod(HUGE) / 2 ** 30  # > the voxels

    assert main(register_args(files, tmp_path / "out", "--max-memory", "8G")) == ResourceError.exit_code == 4
    assert re.match("lungudrnet: error: " + expected.format(r"8\.0 GiB"), capsys.readouterr().err)
    assert not (tmp_path / "out").exists() and checksums(tmp_path) == before

