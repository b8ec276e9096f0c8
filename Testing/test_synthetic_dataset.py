"""Wide-variation training pairs: the ground truth stays exact after set-up differences and the affine stage."""

from __future__ import annotations

import dataclasses

import numpy as np

from LungUDRNetLib.geometry import transform_points
from LungUDRNetTrainerLib.synthetic_dataset import WIDE, make_varied_pair

from test_synth import chest_ct


def test_affine_aligned_pairs_keep_an_exact_field_and_leave_less_motion_than_the_set_up_difference():
    variation = dataclasses.replace(WIDE, amplitude_mm=(10.0, 10.0), setup_angle_deg=6.0, setup_shift_mm=15.0,
                                    thickness_mm=(0.0, 0.0), noise_hu=(5.0, 5.0))
    ct = chest_ct()
    aligned, _ = make_varied_pair(ct, variation, np.random.default_rng(3))
    raw, _ = make_varied_pair(ct, dataclasses.replace(variation, affine_aligned=False), np.random.default_rng(3))
    for pair in (aligned, raw):  # the written field maps each fixed landmark onto its moving landmark
        np.testing.assert_allclose(transform_points(pair.fixed_points, pair.displacement), pair.moving_points,
                                   atol=1e-3)
    np.testing.assert_allclose(aligned.fixed_points, raw.fixed_points)
    motion = {name: float(np.linalg.norm(pair.moving_points - pair.fixed_points, axis=1).mean())
              for name, pair in (("aligned", aligned), ("raw", raw))}
    print(motion)
    assert motion["aligned"] < 0.6 * motion["raw"]
