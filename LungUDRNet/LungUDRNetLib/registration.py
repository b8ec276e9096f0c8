"""Register a moving CT to a fixed CT with UDRNet: images in, physical field out.

Data flow: images (any geometry) -> network grid (:mod:`.preprocess`) ->
UDRNet voxel flow -> LPS mm field on the fixed image's own grid
(:mod:`.geometry`) -> warped moving image and transform.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from .checkpoint import load_model
from .errors import DeviceError, InputError
from .geometry import field_to_transform, warp_image
from .io import read_image
from .model import UDRNet
from .preprocess import PreprocessConfig, flow_to_fixed_field, prepare_pair, replace_non_finite

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]


@dataclass
class RegistrationResult:
    """Outputs of :func:`register`, all on the fixed image's grid.

    ``displacement`` is the pull field in LPS mm (VectorFloat32): the fixed point
    p corresponds to the moving point p + u(p). ``transform`` maps fixed points
    to moving points (``TransformPoint``) and resamples moving onto fixed.
    """

    warped: sitk.Image
    displacement: sitk.Image
    transform: sitk.DisplacementFieldTransform
    grid: sitk.Image
    preprocess: PreprocessConfig
    device: str
    timings: dict[str, float] = field(default_factory=dict)
    model_info: dict = field(default_factory=dict)


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available, else Apple MPS, else CPU; an unavailable explicit choice raises."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r}: CUDA is not available on this machine; use --device cpu or auto")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError("device 'mps': Apple MPS is not available on this machine; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise DeviceError(f"device {device!r}: unknown device (use auto, cpu, cuda or mps)") from None


def predict_flow(model: UDRNet, fixed: np.ndarray, moving: np.ndarray, device: torch.device) -> np.ndarray:
    """Run the network on normalised (D, H, W) arrays; returns the voxel flow [3, D, H, W] (float32).

    On CUDA out-of-memory the prediction is retried once on the CPU with a warning.
    """
    try:
        return _forward(model, fixed, moving, device)
    except torch.OutOfMemoryError:
        if device.type == "cpu":
            raise
        log.warning("out of memory on %s; retrying on the CPU (slower)", device)
        torch.cuda.empty_cache()
        return _forward(model, fixed, moving, torch.device("cpu"))


def _forward(model: UDRNet, fixed: np.ndarray, moving: np.ndarray, device: torch.device) -> np.ndarray:
    model = model.to(device)
    with torch.inference_mode():
        fixed_t = torch.from_numpy(fixed)[None, None].to(device)
        moving_t = torch.from_numpy(moving)[None, None].to(device)
        flow = model(moving_t, fixed_t)
    return flow[0].float().cpu().numpy()


def _as_image(value, what: str) -> sitk.Image | None:
    if value is None or isinstance(value, sitk.Image):
        return value
    return read_image(value, what)


def _resolve_model(model, preprocess: PreprocessConfig | None) -> tuple[UDRNet, PreprocessConfig, dict]:
    if isinstance(model, UDRNet):
        return model.eval(), preprocess or PreprocessConfig(), {"path": None}
    loaded, stored_preprocess, info = load_model(model)
    return loaded, preprocess or stored_preprocess, info


def register(fixed, moving, model=None, device: str = "auto", fixed_mask=None, moving_mask=None,
             preprocess: PreprocessConfig | None = None, progress: Progress | None = None) -> RegistrationResult:
    """Deformably register ``moving`` onto ``fixed`` (images or file paths).

    ``model`` is a checkpoint path, a :class:`UDRNet`, or None for the bundled
    weights. ``fixed_mask`` (optional lung mask) focuses the network grid on
    the mask's bounding box. ``moving_mask`` is only checked here (used for
    evaluation by the callers). ``progress(fraction, message)`` is called
    between steps.
    """
    report = progress or (lambda fraction, message: None)
    started = time.perf_counter()
    fixed_image = replace_non_finite(_as_image(fixed, "fixed image"), "fixed image")
    moving_image = replace_non_finite(_as_image(moving, "moving image"), "moving image")
    fixed_mask = _as_image(fixed_mask, "fixed mask")
    _as_image(moving_mask, "moving mask")
    if fixed_mask is not None and not np.any(sitk.GetArrayViewFromImage(fixed_mask)):
        raise InputError("fixed mask: is empty (no voxel > 0)")
    net, config, info = _resolve_model(model, preprocess)
    target = resolve_device(device)
    timings = {"read": time.perf_counter() - started}

    report(0.1, "resampling both images onto the network grid")
    step = time.perf_counter()
    grid, fixed_net, moving_net = prepare_pair(fixed_image, moving_image, config, roi_mask=fixed_mask)
    if min(config.grid_shape) < net.minimum_size:
        raise InputError(f"network grid {config.grid_shape} is smaller than the network's minimum "
                         f"{net.minimum_size} voxels per axis")
    timings["preprocess"] = time.perf_counter() - step

    report(0.3, f"running UDRNet on {target.type}")
    step = time.perf_counter()
    flow = predict_flow(net, fixed_net, moving_net, target)
    timings["network"] = time.perf_counter() - step

    report(0.7, "mapping the displacement field to the fixed image grid")
    step = time.perf_counter()
    displacement = flow_to_fixed_field(flow, grid, fixed_image)
    timings["field"] = time.perf_counter() - step

    report(0.85, "warping the moving image")
    step = time.perf_counter()
    warped = warp_image(sitk.Cast(moving_image, sitk.sitkFloat32), displacement)
    timings["warp"] = time.perf_counter() - step
    timings["total"] = time.perf_counter() - started
    report(1.0, "done")
    return RegistrationResult(
        warped=warped,
        displacement=sitk.Cast(displacement, sitk.sitkVectorFloat32),
        transform=field_to_transform(displacement),
        grid=grid,
        preprocess=config,
        device=str(target),
        timings=timings,
        model_info=info,
    )
