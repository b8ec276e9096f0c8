"""The bundled default weights register a fresh breathing pair from a CT they were not trained on.

The pair is made from the real ``lung2`` CT (held out from training, which used ``lung1`` only) with a
seed and amplitude that neither the training nor the validation set used. An untrained network must
fail the same bound, so the test measures the weights, not the pipeline.
"""

from __future__ import annotations

import numpy as np
import pytest

from LungUDRNetLib.checkpoint import DEFAULT_WEIGHTS, load_model, untrained_model
from LungUDRNetLib.geometry import transform_points
from LungUDRNetLib.metrics import jacobian_statistics, target_registration_error
from LungUDRNetLib.geometry import field_to_voxel_flow
from LungUDRNetLib.registration import register

TRE_RATIO_BOUND = 0.5  # mean TRE after / before
FOLDING_BOUND_PERCENT = 1.0


@pytest.fixture(scope="module")
def held_out_pair(lung2_breathing_pair):
    if not DEFAULT_WEIGHTS.is_file():
        pytest.skip(f"no bundled weights at {DEFAULT_WEIGHTS.name}")
    return lung2_breathing_pair


def _tre_ratio_and_folding(pair, model) -> tuple[float, float]:
    """The network alone (no affine pre-alignment, no instance optimisation), as in the paper: the weights are
    measured."""
    result = register(pair.fixed, pair.moving, model=model, device="cpu", fixed_mask=pair.fixed_mask, affine=False,
                      fast=True)
    before = target_registration_error(pair.fixed_points, pair.moving_points).mean()
    after = target_registration_error(transform_points(pair.fixed_points, result.displacement),
                                      pair.moving_points).mean()
    folding = jacobian_statistics(field_to_voxel_flow(result.displacement))["folding_percent"]
    return after / before, folding


def test_default_weights_halve_the_tre_without_folding(held_out_pair):
    ratio, folding = _tre_ratio_and_folding(held_out_pair, DEFAULT_WEIGHTS)
    assert ratio <= TRE_RATIO_BOUND, f"mean TRE after/before = {ratio:.2f}"
    assert folding < FOLDING_BOUND_PERCENT


def test_an_untrained_network_does_not_meet_the_bound(held_out_pair):
    _, preprocess, _ = load_model(DEFAULT_WEIGHTS)
    ratio, _ = _tre_ratio_and_folding(held_out_pair, untrained_model(preprocess)[0])
    assert ratio > TRE_RATIO_BOUND
    assert np.isclose(ratio, 1.0, atol=0.05)
