"""Affine pre-alignment: capture range, accuracy, storage independence and its safeguards, on real CTs.

Each moving image is the fixed CT resampled through a known transform ``T``
(fixed LPS mm -> moving LPS mm), so ``T`` is the exact answer; errors are
measured at fixed lung voxels as ``|T_found(p) - T(p)|`` in mm.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import oblique_direction, shared_data

from LungUDRNetLib import affine, sample_data, synth
from LungUDRNetLib.affine import AffineConfig, prealign
from LungUDRNetLib.geometry import affine_points, compose_affine, transform_to_field
from LungUDRNetLib.errors import InputError
from LungUDRNetLib.geometry import index_to_points, transform_points

RIGID_MEAN_MM = 1.5  # mean error at the fixed lung voxels allowed for a pure rigid set-up difference
RIGID_MAX_MM = 4.0
AIR_HU = -1024.0


# ----------------------------------------------------------------------------- helpers


def cached_ct(name: str) -> sitk.Image:
    path = sample_data.default_cache_dir() / sample_data.SAMPLE_FILES[name]
    if not path.is_file() or sample_data.sha256(path) != sample_data.CHECKSUMS[path.name]:
        pytest.skip(f"sample CT {name} not in the cache; fetch it with: python -m LungUDRNetLib.sample_data")
    return sitk.ReadImage(str(path))




def truth(angles_deg=(0.0, 0.0, 0.0), translation_mm=(0.0, 0.0, 0.0), centre=(0.0, 0.0, 0.0),
          scales=(1.0, 1.0, 1.0)) -> sitk.AffineTransform:
    """Fixed -> moving: rotations about x, y, z (degrees) about ``centre`` after ``scales``, then a translation."""
    euler = sitk.Euler3DTransform(tuple(map(float, centre)), *np.deg2rad(angles_deg), tuple(map(float, translation_mm)))
    transform = sitk.AffineTransform(3)
    transform.SetCenter(euler.GetCenter())
    transform.SetMatrix(tuple((np.asarray(euler.GetMatrix()).reshape(3, 3) @ np.diag(scales)).ravel()))
    transform.SetTranslation(euler.GetTranslation())
    return transform


def apply(transform: sitk.AffineTransform, points: np.ndarray) -> np.ndarray:
    """``transform`` at (N, 3) LPS mm points."""
    matrix = np.asarray(transform.GetMatrix()).reshape(3, 3)
    centre = np.asarray(transform.GetCenter())
    return (points - centre) @ matrix.T + centre + np.asarray(transform.GetTranslation())


def lung_points(mask: sitk.Image, count: int = 3000) -> np.ndarray:
    """About ``count`` evenly spread fixed lung voxel centres, LPS mm."""
    k, j, i = np.nonzero(sitk.GetArrayViewFromImage(mask))
    step = max(1, len(i) // count)
    return index_to_points(np.stack([i, j, k], axis=1)[::step].astype(float), mask)


def errors(found: sitk.AffineTransform, expected: sitk.AffineTransform, points: np.ndarray) -> np.ndarray:
    return np.linalg.norm(apply(found, points) - apply(expected, points), axis=1)


def covering_grid(image: sitk.Image, transform: sitk.Transform, spacing=(2.0, 2.0, 2.5),
                  direction=np.eye(3)) -> sitk.Image:
    """A grid with ``spacing`` and ``direction`` that holds ``transform`` of all of ``image``'s field of view."""
    size = np.asarray(image.GetSize()) - 1
    corners = np.array([[i, j, k] for i in (0, size[0]) for j in (0, size[1]) for k in (0, size[2])], float)
    moved = np.array([transform.TransformPoint(tuple(p)) for p in index_to_points(corners, image)])
    along_axes = moved @ direction  # coordinates along the grid's axes
    low, high = along_axes.min(axis=0) - 10.0, along_axes.max(axis=0) + 10.0
    grid = sitk.Image([int(n) for n in np.ceil((high - low) / spacing) + 1], sitk.sitkUInt8)
    grid.SetSpacing(tuple(map(float, spacing)))
    grid.SetDirection(tuple(np.asarray(direction, float).ravel()))
    grid.SetOrigin(tuple(direction @ low))
    return grid


def move(ct: sitk.Image, mask: sitk.Image, transform: sitk.AffineTransform,
         grid: sitk.Image | None = None) -> tuple[sitk.Image, sitk.Image]:
    """The moving CT and mask for a fixed -> moving ``transform``: ``moving(T(p)) = fixed(p)``."""
    grid = grid or covering_grid(ct, transform)
    inverse = transform.GetInverse()
    moving = sitk.Resample(ct, grid, inverse, sitk.sitkLinear, AIR_HU, sitk.sitkInt16)
    return moving, sitk.Resample(mask, grid, inverse, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)


def centroid(mask: sitk.Image) -> np.ndarray:
    return lung_points(mask).mean(axis=0)


@pytest.fixture(scope="module")
def lung2() -> tuple[sitk.Image, sitk.Image]:
    """pyradiomics' lung2 at 1.25 x 1.25 x 5 mm (256 x 256 x 61) and its lung mask."""
    ct = sitk.BinShrink(cached_ct("lung2"), [2, 2, 1])
    return ct, synth.lung_mask(ct)


@pytest.fixture(scope="module")
def lung1() -> tuple[sitk.Image, sitk.Image]:
    """pyradiomics' lung1 at 1.14 x 1.14 x 5 mm; its lungs touch the bottom of the field of view."""
    ct = sitk.BinShrink(cached_ct("lung1"), [2, 2, 1])
    return ct, synth.lung_mask(ct)


@pytest.fixture(scope="module")
def elastix() -> tuple[sitk.Image, sitk.Image]:
    """One lung (elastix example, 2.7 x 2.7 x 5 mm) and its mask on a finer grid of its own."""
    return (sitk.ReadImage(str(shared_data("elastix_lung", "3DCT_lung_baseline_small.mha"))),
            sitk.ReadImage(str(shared_data("elastix_lung", "3DCT_lung_baseline_mask.mha"))))


def check_recovered(fixed, fixed_mask, transform, moving, moving_mask, mean_mm=RIGID_MEAN_MM, max_mm=RIGID_MAX_MM):
    result = prealign(fixed, moving, fixed_mask, moving_mask)
    error = errors(result.transform, transform, lung_points(fixed_mask))
    assert error.mean() <= mean_mm and error.max() <= max_mm, (error.mean(), error.max(), result)
    assert result.stage == "affine", result.messages
    assert result.overlap_after > result.overlap_before
    assert result.correlation["result"] > 0.9
    return result, error


# ----------------------------------------------------------------------------- capture range and accuracy

SETUPS = {  # name: (rotations about x, y, z in degrees, translation in mm)
    "rx+20": ((20, 0, 0), (0, 0, 0)), "rx-20": ((-20, 0, 0), (0, 0, 0)),
    "ry+20": ((0, 20, 0), (0, 0, 0)), "ry-20": ((0, -20, 0), (0, 0, 0)),
    "rz+20": ((0, 0, 20), (0, 0, 0)), "rz-20": ((0, 0, -20), (0, 0, 0)),
    "tx+40": ((0, 0, 0), (40, 0, 0)), "ty-40": ((0, 0, 0), (0, -40, 0)), "tz+40": ((0, 0, 0), (0, 0, 40)),
    "t-40-40-40": ((0, 0, 0), (-40, -40, -40)),
    "r12-12+12,t25-25+25": ((12, -12, 12), (25, -25, 25)),
    "r20+20+20,t40+40+40": ((20, 20, 20), (40, 40, 40)),
    "r-20+20-20,t-40+40-40": ((-20, 20, -20), (-40, 40, -40)),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_recovers_rigid_setup_differences(lung2, setup):
    ct, mask = lung2
    angles, translation = SETUPS[setup]
    # rotation about a point away from the lungs' centre, as a couch would turn
    transform = truth(angles, translation, centroid(mask) + (20.0, 30.0, 10.0))
    check_recovered(ct, mask, transform, *move(ct, mask, transform))


@pytest.mark.parametrize("setup", ["rx+20", "ry-20", "rz+20", "r-20+20-20,t-40+40-40"])
def test_recovers_one_lung_with_a_mask_on_its_own_grid(elastix, setup):
    ct, mask = elastix
    angles, translation = SETUPS[setup]
    transform = truth(angles, translation, centroid(mask))
    check_recovered(ct, mask, transform, *move(ct, mask, transform))


@pytest.mark.parametrize("setup", ["ry+20", "r12-12+12,t25-25+25"])
def test_recovers_lungs_cut_by_the_field_of_view(lung1, setup):
    ct, mask = lung1
    angles, translation = SETUPS[setup]
    transform = truth(angles, translation, centroid(mask))
    check_recovered(ct, mask, transform, *move(ct, mask, transform))


@pytest.mark.parametrize("direction", [np.diag([-1.0, 1.0, -1.0]), np.array([[0, 1.0, 0], [0, 0, -1], [-1, 0, 0]]),
                                       oblique_direction(30.0)], ids=["flipped", "permuted", "oblique"])
def test_moving_storage_does_not_matter(lung2, direction):
    ct, mask = lung2
    transform = truth((10, -15, 5), (20, 30, -40), centroid(mask))
    grid = covering_grid(ct, transform, spacing=(1.5, 2.5, 2.0), direction=direction)
    check_recovered(ct, mask, transform, *move(ct, mask, transform, grid))


def test_fixed_mask_on_a_grid_of_its_own(lung2):
    """Masks need not share their CT's grid: here the fixed one is finer, shifted and stored flipped."""
    ct, mask = lung2
    transform = truth((-10, 10, 15), (-30, 20, 10), centroid(mask))
    moving, moving_mask = move(ct, mask, transform)
    other_grid = covering_grid(ct, sitk.Transform(), spacing=(0.9, 1.1, 2.0), direction=np.diag([1.0, -1.0, -1.0]))
    fixed_mask = sitk.Resample(mask, other_grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    check_recovered(ct, fixed_mask, transform, moving, moving_mask)


def test_partial_field_of_view(lung2):
    """The moving scan misses the top 30 mm of the lungs (and the moments are biased by it)."""
    ct, mask = lung2
    transform = truth((5, -5, 3), (10, -10, 40), centroid(mask))
    moving, moving_mask = move(ct, mask, transform)
    slices = np.nonzero(sitk.GetArrayViewFromImage(moving_mask).any(axis=(1, 2)))[0]
    top = slices.max() + 1 - int(30.0 / moving.GetSpacing()[2])
    check_recovered(ct, mask, transform, moving[:, :, :top], moving_mask[:, :, :top])


def test_breathing_on_top_of_a_setup_difference(lung2):
    """Synthetic exhale/inhale pair whose inhale scan is also turned and shifted, and stored flipped.

    The affine pre-alignment removes the set-up difference and the affine part
    of the breathing: the landmark error drops below the breathing motion itself.
    """
    ct, _ = lung2
    pair = synth.make_breathing_pair(ct, seed=1, amplitude_mm=12.0,
                                     reference=synth.grid_image((128, 100, 80), (2.6, 2.6, 4.0), synth.body_centre(ct)))
    setup = truth((15, -10, 8), (30, -25, 35), pair.fixed_points.mean(axis=0) + (10.0, 20.0, -15.0))
    grid = covering_grid(pair.moving, setup, spacing=(2.0, 2.0, 3.0), direction=np.diag([-1.0, 1.0, -1.0]))
    moving, moving_mask = move(pair.moving, pair.moving_mask, setup, grid)
    result = prealign(pair.fixed, moving, pair.fixed_mask, moving_mask)
    expected = apply(setup, pair.moving_points)
    tre = np.linalg.norm(apply(result.transform, pair.fixed_points) - expected, axis=1)
    breathing = np.linalg.norm(pair.moving_points - pair.fixed_points, axis=1)
    assert breathing.mean() > 5.0
    assert tre.mean() <= 2.5 and tre.mean() <= 0.4 * breathing.mean(), (tre.mean(), breathing.mean())
    assert tre.max() <= 5.0
    assert result.overlap_after > result.overlap_before


def test_a_breathing_pair_is_aligned_although_the_lung_dice_dips(lung1):
    """Exhale lungs are smaller than inhale lungs: on this pair (20 mm, automatic masks of both phases) the
    affine result halves the landmark error while the lung Dice drops below the identity's by less than the
    tolerance; it is kept (it was discarded for that dip until 2026-12-05)."""
    ct, _ = lung1
    pair = synth.make_breathing_pair(synth.resample_to_grid(ct, (134, 96, 146), (2.5, 2.5, 2.5)), seed=5,
                                     amplitude_mm=20.0)
    masks = synth.lung_mask(pair.fixed), synth.lung_mask(pair.moving)
    result = prealign(pair.fixed, pair.moving, *masks)
    before = np.linalg.norm(pair.moving_points - pair.fixed_points, axis=1).mean()
    after = np.linalg.norm(apply(result.transform, pair.fixed_points) - pair.moving_points, axis=1).mean()
    print(f"TRE {before:.2f} -> {after:.2f} mm; overlap {result.overlap}, messages {result.messages}")
    assert result.stage == "affine", result.messages
    assert after < 0.6 * before
    assert result.correlation["result"] > result.correlation["identity"] + 0.05


def test_a_converged_stage_stops_early_with_the_same_result(lung1):
    """The affine stage stops once its metric has settled: fewer iterations than its limit, and a transform
    within 0.1 mm on average and 0.5 mm at most (a twelfth of its 6 mm voxels) at the lung voxels of the
    one the limit's iterations give."""
    ct, _ = lung1
    pair = synth.make_breathing_pair(synth.resample_to_grid(ct, (134, 96, 146), (2.5, 2.5, 2.5)), seed=5,
                                     amplitude_mm=12.0)
    early = prealign(pair.fixed, pair.moving, pair.fixed_mask, pair.moving_mask)
    full = prealign(pair.fixed, pair.moving, pair.fixed_mask, pair.moving_mask, AffineConfig(convergence=-np.inf))
    assert early.stage == full.stage == "affine"
    assert early.iterations["affine"] < full.iterations["affine"] == AffineConfig().affine_iterations
    points = lung_points(pair.fixed_mask)
    difference = np.linalg.norm(apply(early.transform, points) - apply(full.transform, points), axis=1)
    assert difference.mean() < 0.1 and difference.max() < 0.5, (difference.mean(), difference.max())


# ----------------------------------------------------------------------------- special inputs and safeguards


def test_identical_images_give_the_identity(lung2):
    ct, mask = lung2
    result = prealign(ct, ct, mask, mask)
    points = lung_points(mask)
    assert np.abs(apply(result.transform, points) - points).max() < 0.1
    assert result.overlap_after == pytest.approx(1.0)


def test_lungs_that_do_not_overlap_at_first(lung2):
    """Scanners with different origins: the moving lungs lie 400 mm away, with no overlap at the start."""
    ct, mask = lung2
    transform = truth((0, 12, -8), (15, 400, -20), centroid(mask))
    result, _ = check_recovered(ct, mask, transform, *move(ct, mask, transform))
    assert result.overlap_before == 0.0


def test_one_lung_in_view_where_the_centroids_mislead(lung2):
    """The moving scan holds the right lung only: matching centroids would overlap less than the
    identity, so that stage is dropped and the rigid fit starts from the identity."""
    ct, mask = lung2
    centre = centroid(mask)
    transform = truth((5, -5, 3), (10, -10, 20), centre)
    moving, moving_mask = move(ct, mask, transform)
    midline = transform.TransformPoint(tuple(centre))[0] - 10.0  # LPS: the right lung lies at smaller x
    right = int(round((midline - moving.GetOrigin()[0]) / moving.GetSpacing()[0]))
    result = prealign(ct, moving[:right], mask, moving_mask[:right])
    assert any(message.startswith("moments stage dropped") for message in result.messages)
    points = lung_points(mask)
    error = errors(result.transform, transform, points[points[:, 0] < centre[0] - 20.0])
    assert error.mean() <= 2.0 and error.max() <= 4.0, (error.mean(), error.max())


def test_a_diverging_optimisation_returns_the_identity(lung1):
    """Steps of 400 mm throw the lungs out of view; with every stage let through, the final check against
    the identity's overlap still holds and says so."""
    ct, mask = lung1
    transform = truth((3, 0, 0), (5, 0, 0), centroid(mask))
    moving, moving_mask = move(ct, mask, transform)
    result = prealign(ct, moving, mask, moving_mask,
                      AffineConfig(rigid_step_mm=400.0, image_step_mm=400.0, overlap_tolerance=1.0))
    assert result.stage == "identity"
    assert any(message.startswith("kept the identity") for message in result.messages)
    assert np.allclose(np.asarray(result.transform.GetParameters()), np.eye(4)[:3, :3].ravel().tolist() + [0, 0, 0])


def test_never_worse_than_the_identity(lung1, lung2):
    """Two different patients: whatever it finds overlaps the lungs about as well as doing nothing (within the
    tolerance) and correlates better."""
    (fixed, fixed_mask), (moving, moving_mask) = lung2, lung1
    result = prealign(fixed, moving, fixed_mask, moving_mask)
    assert result.overlap_after >= result.overlap_before - AffineConfig().overlap_tolerance
    identity = result.correlation["identity"]  # NaN: the moving CT covers none of the fixed lungs at first
    assert result.stage == "identity" or result.correlation["result"] > np.nan_to_num(identity, nan=-1.0)


def test_deterministic(lung2):
    ct, mask = lung2
    transform = truth((10, 5, -5), (10, 20, 30), centroid(mask))
    moving, moving_mask = move(ct, mask, transform)
    first = prealign(ct, moving, mask, moving_mask)
    second = prealign(ct, moving, mask, moving_mask)
    assert first.transform.GetParameters() == second.transform.GetParameters()
    assert first.transform.GetFixedParameters() == second.transform.GetFixedParameters()


class _SlowClock:
    """A ``time`` module whose clock advances 10 s at every reading: a machine under heavy load."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 10.0
        return self.now


def test_the_result_does_not_depend_on_the_machines_speed(lung2, monkeypatch):
    """A loaded machine gets the same transform, after the same iterations, as an idle one (a wall-clock
    budget once cut the stages short under load: the same pair then gave 2 to 11 mm from run to run)."""
    ct, mask = lung2
    moving, moving_mask = move(ct, mask, truth((10, 5, -5), (10, 20, 30), centroid(mask)))
    idle = prealign(ct, moving, mask, moving_mask)
    monkeypatch.setattr(affine, "time", _SlowClock())
    loaded = prealign(ct, moving, mask, moving_mask)
    assert loaded.timings["total"] > 30.0  # the clock was the slow one
    assert loaded.iterations == idle.iterations and idle.iterations["affine"] > 5
    assert loaded.transform.GetParameters() == idle.transform.GetParameters()


def test_scales_are_found_within_the_limit_and_clamped_beyond(lung2):
    ct, mask = lung2
    centre = centroid(mask)
    breathing_like = truth((5, 5, 5), (10, 10, 10), centre, scales=(0.92, 1.05, 0.9))
    check_recovered(ct, mask, breathing_like, *move(ct, mask, breathing_like))
    too_large = truth((5, 5, 5), (10, 10, 10), centre, scales=(1.0, 1.0, 1.3))
    moving, moving_mask = move(ct, mask, too_large)
    result = prealign(ct, moving, mask, moving_mask)
    scales = np.linalg.svd(np.asarray(result.transform.GetMatrix()).reshape(3, 3), compute_uv=False)
    assert scales.max() == pytest.approx(1.15, abs=1e-6) and scales.min() >= 0.85
    assert any("clamped" in message for message in result.messages)


def test_empty_mask_is_an_input_error(lung2):
    ct, mask = lung2
    empty = sitk.Image(mask.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(mask)
    with pytest.raises(InputError, match="moving lung mask is empty"):
        prealign(ct, ct, mask, empty)


# ----------------------------------------------------------------------------- displacement fields


def test_displacement_field_is_the_pull_field(oblique_grid):
    transform = truth((10, -5, 20), (3, -4, 5), (-10, 20, 60), scales=(1.1, 0.9, 1.0))
    field = transform_to_field(transform, oblique_grid)
    assert field.GetPixelID() == sitk.sitkVectorFloat32
    points = index_to_points(np.array([[1, 1, 1], [38, 34, 28], [20, 7, 13]], float), oblique_grid)
    np.testing.assert_allclose(transform_points(points, field), apply(transform, points), atol=1e-3)


def test_compose_applies_the_field_first_then_the_affine(oblique_grid):
    rng = np.random.default_rng(0)
    vectors = rng.normal(0.0, 2.0, (*oblique_grid.GetSize()[::-1], 3))
    field = sitk.GetImageFromArray(vectors, isVector=True)
    field.CopyInformation(oblique_grid)
    transform = truth((8, 0, -12), (5, 6, -7), (0, 20, 50), scales=(1.05, 1.0, 0.95))
    composed = compose_affine(transform, field)
    indices = np.array([[1, 1, 1], [38, 34, 28], [20, 7, 13], [5, 30, 2]], float)  # inside: no edge effects
    points = index_to_points(indices, oblique_grid)
    expected = apply(transform, transform_points(points, field))  # T(p + u(p))
    np.testing.assert_allclose(transform_points(points, composed), expected, atol=1e-3)


def test_affine_points_is_simpleitks_transform_point():
    transform = truth((12, -7, 20), (30, -4, 5), (-10, 20, 60), scales=(1.1, 0.9, 1.05))
    points = np.random.default_rng(3).uniform(-150, 150, (50, 3))
    expected = np.array([transform.TransformPoint(tuple(point)) for point in points])
    np.testing.assert_allclose(affine_points(transform, points.reshape(5, 10, 3)).reshape(-1, 3), expected, atol=1e-9)
