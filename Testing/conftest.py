"""Shared fixtures: small images with awkward geometry (anisotropic, offset, rotated and flipped), a folder
any user can enter (for permission tests), and a tiny Learn2Reg dataset with the smoke training preset for the
trainer tests."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LungUDRNetLib.checkpoint import save_checkpoint, untrained_model
from LungUDRNetLib.geometry import warp_image
from LungUDRNetLib.io import write_image
from LungUDRNetLib.phantom import analytic_field, chest_phantom, lung_mask_phantom, make_grid
from LungUDRNetLib.preprocess import PreprocessConfig
from LungUDRNetTrainerLib.config import TrainConfig, resolve_config
from LungUDRNetTrainerLib.toydata import write_toy_learn2reg

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHARED_DATA_CONTENTS = {
    "learn2reg_lungct": "Learn2Reg LungCT masks, keypoints and landmarks (cases 0001-0003 as the challenge's public "
                        "evaluation repository has them; no CT images)",
    "elastix_lung": "the elastix lung CT with landmark pairs (elastix test data: a small baseline chest CT, two lung "
                    "masks and 100 corresponding landmarks in mm)",
}

torch.set_num_threads(2)


def oblique_direction(degrees: float = 20.0) -> np.ndarray:
    """A rotation about an oblique axis composed with a left-right flip (det = -1)."""
    axis = np.array([1.0, 2.0, 2.0]) / 3.0
    angle = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    return rotation @ np.diag([-1.0, 1.0, 1.0])


@pytest.fixture
def oblique_grid() -> sitk.Image:
    """40 x 36 x 30 voxels, spacing 1.5 x 2.0 x 2.5 mm, origin (-30, 12, 50), oblique flipped direction."""
    return make_grid((40, 36, 30), (1.5, 2.0, 2.5), (-30.0, 12.0, 50.0), oblique_direction())


@pytest.fixture
def world_dir():
    """A folder that an unprivileged user can enter (pytest's own tmp_path is private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="lungudrnet-test-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def shared_data(*parts: str) -> Path:
    """Path under the shared reference data, or skip the test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared reference data not available here ({'/'.join(parts)}): "
                    f"{SHARED_DATA_CONTENTS[parts[0]]}, expected in a folder shared/data "
                    "beside the repository (see CONTRIBUTING.md)")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: the trainer's 32^3 networks gain nothing from a second, and lose a lot on a busy
    machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """6 phantom pairs (4 training, 2 validation), 40 x 36 x 32 voxels, known smooth deformations."""
    return write_toy_learn2reg(tmp_path_factory.mktemp("toy"))


def smoke(data: Path, **overrides) -> TrainConfig:
    """The smoke preset (tiny network on a 32^3 grid) on the Learn2Reg folder ``data``."""
    return resolve_config("smoke", overrides={"data": str(data), **overrides})


@pytest.fixture
def phantom_files(tmp_path):
    """A fixed/moving phantom pair on different oblique grids, a lung mask, and a tiny checkpoint."""
    moving = chest_phantom(make_grid((40, 36, 30), (1.8, 2.0, 2.6), (-36.0, -36.0, -39.0)), seed=1)
    fixed_grid = make_grid((36, 34, 28), (2.0, 2.2, 2.8), (-35.0, -38.0, -40.0), oblique_direction(10.0))
    fixed = warp_image(moving, analytic_field(fixed_grid, translation_mm=(0.0, 0.0, 3.0), amplitude_mm=2.0))
    model, _, _ = untrained_model()
    paths = {
        "fixed": write_image(fixed, tmp_path / "fixed.nrrd"),
        "moving": write_image(moving, tmp_path / "moving.mha"),
        "fixed_mask": write_image(lung_mask_phantom(fixed), tmp_path / "fixed_mask.nii.gz"),
        "model": save_checkpoint(tmp_path / "model.pt", model, PreprocessConfig(grid_shape=(32, 32, 32))),
    }
    return paths


@pytest.fixture(scope="session")
def lung2_breathing_pair():
    """A breathing pair (exact correspondence, 100 landmarks) from the real lung2 CT on a 2.5 mm grid, with a
    seed and amplitude that neither the bundled weights' training nor their validation used."""
    from LungUDRNetLib.sample_data import SampleDataError, default_cache_dir, sample_ct_paths
    from LungUDRNetLib.synth import make_breathing_pair, resample_to_grid
    try:
        paths = sample_ct_paths()
    except SampleDataError:
        pytest.skip(f"sample CTs not in {default_cache_dir()} (run: python -m LungUDRNetLib.sample_data)")
    ct = resample_to_grid(sitk.ReadImage(str(paths["lung2"])), (134, 96, 146), (2.5, 2.5, 2.5))
    return make_breathing_pair(ct, seed=777, amplitude_mm=14.0)
