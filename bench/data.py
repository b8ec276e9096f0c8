"""The benchmark pairs, written once to a cache folder that every method's child process reads.

A pair folder holds ``fixed.mha``, ``moving.mha``, optional ``fixed_mask.mha``
and ``moving_mask.mha``, and ``points.npz`` with corresponding ``fixed`` and
``moving`` points (N, 3) in LPS mm (fixed point i corresponds to moving point i).

Sources: breathing pairs from real chest CTs (the project's sample CTs, or
the elastix test CT) resampled to the Learn2Reg LungCT grid, and any
Learn2Reg-layout folder (real images with keypoints or landmarks).

The **unseen** group (:data:`UNSEEN_PLAN`, folders ``unseen_*``) holds pairs
unlike the bundled weights' training pairs, from the two CTs no training run
or setting was chosen on (``lung2`` and the elastix CT): whole field of view
without masks, native or 5 mm slices, rigid set-up differences up to 10 degrees
and 30 mm on top of breathing up to 35 mm, and the same pairs stored with
flipped or permuted axes (:attr:`UnseenPair.storage_of`). Nothing is tuned on
it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from LungUDRNetLib.geometry import index_to_points, transform_points
from LungUDRNetLib.io import read_image, read_points, rounded_to_integer, write_image
from LungUDRNetLib.phantom import chest_phantom, make_grid

log = logging.getLogger(__name__)

# (source CT, seed, amplitude mm): 2 real volumes x several seeds and motion amplitudes.
SYNTHETIC_PLAN = [("lung1", 0, 8.0), ("lung2", 1, 12.0), ("lung1", 2, 16.0),
                  ("lung2", 3, 8.0), ("lung1", 4, 12.0), ("lung2", 5, 16.0)]
ELASTIX_CT = Path("3DCT_lung_baseline_small.mha")
MIN_LANDMARKS = 50
UNSEEN_PREFIX = "unseen_"


@dataclass(frozen=True)
class UnseenPair:
    """One pair of the unseen group: a breathing pair from ``source`` (``"lung2"`` or ``"elastix"``) on its
    native grid or the Learn2Reg grid, the moving patient moved by a rigid set-up difference (degrees
    about LPS x, y, z through the body centre; mm), both scans given ``thickness_mm`` slices; or, with
    ``storage_of``, that pair's images stored with axes ``order`` and ``flips`` (same physical content)."""

    name: str
    source: str = "lung2"
    seed: int = 0
    amplitude_mm: float = 15.0
    anterior_fraction: float = 0.0
    angles_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    thickness_mm: float = 0.0
    native_grid: bool = False
    storage_of: str | None = None
    order: tuple[int, int, int] = (0, 1, 2)
    flips: tuple[bool, bool, bool] = (False, False, False)


UNSEEN_PLAN = [
    UnseenPair("unseen_lung2_native_25mm", seed=11, amplitude_mm=25.0, anterior_fraction=0.3, native_grid=True),
    UnseenPair("unseen_lung2_5mm_setup", seed=12, amplitude_mm=18.0, anterior_fraction=0.2,
               angles_deg=(6.0, -4.0, 8.0), shift_mm=(20.0, -15.0, 25.0), thickness_mm=5.0),
    UnseenPair("unseen_lung2_5mm_setup_flipped", storage_of="unseen_lung2_5mm_setup", order=(0, 1, 2),
               flips=(True, True, False)),
    UnseenPair("unseen_lung2_35mm_setup", seed=13, amplitude_mm=35.0, anterior_fraction=0.4,
               angles_deg=(-10.0, 3.0, -5.0), shift_mm=(-10.0, 30.0, -20.0)),
    UnseenPair("unseen_elastix_30mm_setup", source="elastix", seed=14, amplitude_mm=30.0, anterior_fraction=0.3,
               angles_deg=(4.0, 9.0, -6.0), shift_mm=(30.0, 10.0, -30.0), thickness_mm=3.0),
    UnseenPair("unseen_elastix_30mm_setup_permuted", storage_of="unseen_elastix_30mm_setup", order=(2, 0, 1),
               flips=(False, True, True)),
]


@dataclass
class BenchPair:
    """One benchmark pair as read back from its cache folder (images in HU, points LPS mm)."""

    name: str
    fixed: sitk.Image
    moving: sitk.Image
    fixed_mask: sitk.Image | None
    moving_mask: sitk.Image | None
    fixed_points: np.ndarray | None
    moving_points: np.ndarray | None


def write_pair(folder: Path, fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image | None = None,
               moving_mask: sitk.Image | None = None, fixed_points: np.ndarray | None = None,
               moving_points: np.ndarray | None = None) -> Path:
    """Store one pair in ``folder`` (created), images in their pixel types; points are (N, 3) LPS mm."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in (("fixed_mask", fixed_mask), ("moving_mask", moving_mask), ("moving", moving)):
        if image is not None:
            write_image(image, folder / f"{name}.mha")
    if fixed_points is not None and moving_points is not None:
        np.savez(folder / "points.npz", fixed=fixed_points, moving=moving_points)
    write_image(fixed, folder / "fixed.mha")  # written last: its presence marks a complete pair
    return folder


def as_scanner_ct(image: sitk.Image) -> sitk.Image:
    """A generated CT (float HU) as scanners store CT: int16 HU, rounded. The bench's generated pairs are
    stored so, so that every method reads and writes files of the size users have."""
    return rounded_to_integer(image, np.int16)


def read_pair(folder: Path) -> BenchPair:
    """Read a pair written by :func:`write_pair`."""
    def optional(name: str) -> sitk.Image | None:
        path = folder / f"{name}.mha"
        return read_image(path, name) if path.is_file() else None

    points = np.load(folder / "points.npz") if (folder / "points.npz").is_file() else None
    return BenchPair(folder.name, read_image(folder / "fixed.mha", "fixed"), read_image(folder / "moving.mha", "moving"),
                     optional("fixed_mask"), optional("moving_mask"),
                     None if points is None else points["fixed"], None if points is None else points["moving"])


def _write_breathing_pair(folder: Path, pair, seed: int, minimum: int = MIN_LANDMARKS) -> Path:
    """Store a :class:`..synth.BreathingPair`. When the generator found fewer than ``minimum``
    landmarks (a phantom has few vessels), random fixed lung voxels mapped through the exact
    displacement are added, so the TRE always has ground truth behind it."""
    fixed_points, moving_points = pair.fixed_points, pair.moving_points
    if len(fixed_points) < minimum:
        lung = np.argwhere(sitk.GetArrayViewFromImage(pair.fixed_mask) > 0)[:, ::-1]  # (i, j, k)
        chosen = np.random.default_rng(seed).choice(len(lung), size=min(minimum, len(lung)), replace=False)
        extra = index_to_points(lung[chosen].astype(float), pair.fixed_mask)
        fixed_points = np.concatenate([fixed_points.reshape(-1, 3), extra])
        moving_points = np.concatenate([moving_points.reshape(-1, 3), transform_points(extra, pair.displacement)])
    return write_pair(folder, as_scanner_ct(pair.fixed), as_scanner_ct(pair.moving), pair.fixed_mask,
                      pair.moving_mask, fixed_points, moving_points)


def _source_ct(name: str) -> tuple[sitk.Image, str]:
    """A real chest CT by name (project sample data), or a phantom when it cannot be had."""
    try:
        from LungUDRNetLib.sample_data import load_sample_ct
        return load_sample_ct(name), name
    except Exception as error:  # not installed yet, offline, ...
        log.warning("sample CT %s unavailable (%s); using a chest phantom instead", name, error)
        seed = int(name[-1]) if name[-1].isdigit() else 0
        return chest_phantom(make_grid((160, 128, 120), (2.0, 2.0, 2.5)), seed=seed), f"phantom{seed}"


def synthetic_pairs(cache: Path, count: int, learn2reg_grid: bool = True) -> list[Path]:
    """The first ``count`` pairs of :data:`SYNTHETIC_PLAN`, generated once into ``cache``."""
    from LungUDRNetLib.synth import learn2reg_like_grid, make_breathing_pair

    folders, sources = [], {}
    for source, seed, amplitude in SYNTHETIC_PLAN[:count]:
        if source not in sources:
            sources[source] = _source_ct(source)
        ct, label = sources[source]
        folder = cache / f"{label}_s{seed}_a{amplitude:g}{'' if learn2reg_grid else '_native'}"
        if not (folder / "fixed.mha").is_file():
            reference = learn2reg_like_grid(ct) if learn2reg_grid else None
            _write_breathing_pair(folder, make_breathing_pair(ct, seed=seed, amplitude_mm=amplitude,
                                                              reference=reference), seed)
        folders.append(folder)
    return folders


def elastix_ct_pair(cache: Path, folder: Path, amplitude_mm: float = 12.0) -> list[Path]:
    """A breathing pair from the elastix test chest CT on the Learn2Reg grid, when ``folder`` has it."""
    from LungUDRNetLib.synth import learn2reg_like_grid, make_breathing_pair

    if not (folder / ELASTIX_CT).is_file():
        return []
    out = cache / f"elastix_lung_a{amplitude_mm:g}"
    if not (out / "fixed.mha").is_file():
        ct = read_image(folder / ELASTIX_CT, "elastix lung CT")
        _write_breathing_pair(out, make_breathing_pair(ct, seed=7, amplitude_mm=amplitude_mm,
                                                       reference=learn2reg_like_grid(ct)), seed=7)
    return [out]


def unseen_pairs(cache: Path, elastix_folder: Path) -> list[Path]:
    """The pairs of :data:`UNSEEN_PLAN` whose source CT is available, generated once into ``cache``."""
    from LungUDRNetLib import scan_variants
    from LungUDRNetLib.sample_data import load_sample_ct
    from LungUDRNetLib.synth import body_centre, learn2reg_like_grid, make_breathing_pair

    def source_ct(name: str) -> sitk.Image | None:
        if name == "elastix":
            path = elastix_folder / ELASTIX_CT
            return read_image(path, "elastix lung CT") if path.is_file() else None
        try:
            return load_sample_ct(name)
        except Exception as error:  # offline before the first download
            log.warning("unseen group: sample CT %s unavailable (%s); its pairs are left out", name, error)
            return None

    folders: dict[str, Path] = {}
    for spec in UNSEEN_PLAN:
        out = cache / spec.name
        if spec.storage_of is not None:
            if spec.storage_of in folders and not (out / "fixed.mha").is_file():
                base = read_pair(folders[spec.storage_of])
                write_pair(out, *(scan_variants.restore(image, spec.order, spec.flips)
                                  for image in (base.fixed, base.moving)),
                           fixed_points=base.fixed_points, moving_points=base.moving_points)
            if spec.storage_of in folders:
                folders[spec.name] = out
            continue
        if not (out / "fixed.mha").is_file():
            ct = source_ct(spec.source)
            if ct is None:
                continue
            pair = make_breathing_pair(ct, seed=spec.seed, amplitude_mm=spec.amplitude_mm,
                                       anterior_fraction=spec.anterior_fraction,
                                       reference=None if spec.native_grid else learn2reg_like_grid(ct))
            setup = scan_variants.rigid_transform(spec.angles_deg, spec.shift_mm, body_centre(pair.moving))
            pair = scan_variants.with_setup_difference(pair, setup)
            fixed, moving = (scan_variants.thick_slices(image, spec.thickness_mm) for image in (pair.fixed, pair.moving))
            write_pair(out, as_scanner_ct(fixed), as_scanner_ct(moving), fixed_points=pair.fixed_points,
                       moving_points=pair.moving_points)
        folders[spec.name] = out
    return list(folders.values())


def storage_variants() -> dict[str, str]:
    """{pair stored otherwise: the pair it stores} of the unseen group."""
    return {spec.name: spec.storage_of for spec in UNSEEN_PLAN if spec.storage_of}


def _voxel_points(path: Path, image: sitk.Image) -> np.ndarray:
    """Learn2Reg keypoint/landmark CSV (voxel x, y, z) -> LPS mm."""
    return index_to_points(read_points(path), image)


def learn2reg_pairs(cache: Path, root: Path) -> list[Path]:
    """Pairs ``*_0000`` (fixed) / ``*_0001`` (moving) of a Learn2Reg-layout folder, with masks and
    real correspondences (``landmarksTr/`` preferred, else ``keypointsTr/``)."""
    folders = []
    for fixed_path in sorted((root / "imagesTr").glob("*_0000.nii.gz")):
        moving_path = fixed_path.with_name(fixed_path.name.replace("_0000", "_0001"))
        if not moving_path.is_file():
            continue
        out = cache / f"l2r_{fixed_path.name.split('_0000')[0]}"
        if not (out / "fixed.mha").is_file():
            fixed, moving = read_image(fixed_path, "fixed"), read_image(moving_path, "moving")
            masks = [root / "masksTr" / p.name for p in (fixed_path, moving_path)]
            masks = [read_image(p, "mask") if p.is_file() else None for p in masks]
            points = [None, None]
            for kind in ("landmarksTr", "keypointsTr"):
                csvs = [root / kind / p.name.replace(".nii.gz", ".csv") for p in (fixed_path, moving_path)]
                if all(p.is_file() for p in csvs):
                    points = [_voxel_points(csvs[0], fixed), _voxel_points(csvs[1], moving)]
                    break
            write_pair(out, fixed, moving, masks[0], masks[1], points[0], points[1])
        folders.append(out)
    return folders


def tiny_pairs(cache: Path, count: int = 2) -> list[Path]:
    """Small phantom breathing pairs (about 48 x 40 x 36 voxels) for smoke tests."""
    from LungUDRNetLib.synth import make_breathing_pair

    folders = []
    for seed in range(count):
        folder = cache / f"tiny{seed}"
        if not (folder / "fixed.mha").is_file():
            ct = chest_phantom(make_grid((48, 40, 36), (4.0, 4.0, 5.0), (-96.0, -80.0, -90.0)), seed=seed)
            _write_breathing_pair(folder, make_breathing_pair(ct, seed=seed, amplitude_mm=8.0, n_landmarks=20,
                                                              noise_hu=5.0), seed, minimum=20)
        folders.append(folder)
    return folders
