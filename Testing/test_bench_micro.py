"""pytest-benchmark micro-benchmarks of the forward pass and the warp (recorded, never asserted on time)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from LungUDRNetLib.model import UDRNet  # noqa: E402
from LungUDRNetLib.warp import warp  # noqa: E402

SHAPE = (64, 64, 64)


def test_forward_pass_benchmark(benchmark):
    model = UDRNet().eval()
    moving, fixed = torch.rand(1, 1, *SHAPE), torch.rand(1, 1, *SHAPE)
    with torch.inference_mode():
        flow = benchmark(model, moving, fixed)
    assert flow.shape == (1, 3, *SHAPE)


def test_warp_benchmark(benchmark):
    moving, flow = torch.rand(1, 1, *SHAPE), torch.randn(1, 3, *SHAPE)
    warped = benchmark(warp, moving, flow)
    assert warped.shape == moving.shape
