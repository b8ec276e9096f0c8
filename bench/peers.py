"""One function per registration method, each returning a displacement field in our convention.

Every method takes ``(fixed, moving, options)`` (HU images; the moving image
may be on another grid) and returns the pull field u on the fixed grid in LPS
mm: the fixed point p corresponds to the moving point p + u(p); a method that
warps the moving image itself, as ``lungudrnet register`` does, returns both
(:class:`Registered`), and the harness does not warp it again. Optional
packages (itk-elastix, antspyx, voxelmorph) are imported inside their method
so that the others run without them. Thread counts are set by the runner
(environment and :func:`set_threads`) before a method runs.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from LungUDRNetLib.checkpoint import DEFAULT_WEIGHTS, load_model, read_checkpoint, untrained_model
from LungUDRNetLib.comparison_nets import ARCHITECTURES as COMPARISON_ARCHITECTURES
from LungUDRNetLib.io import read_displacement_field
from LungUDRNetLib.networks import METHOD_NAMES, config_for, model_name, network_from_config
from LungUDRNetLib.preprocess import PreprocessConfig, flow_to_fixed_field, normalise_ct, prepare_pair
from LungUDRNetLib.registration import optimisation_for, predict_flow, register
from LungUDRNetLib.voxelmorph_net import VoxelMorphNet, VoxelMorphNetConfig

Field = sitk.Image


@dataclass(frozen=True)
class Registered:
    """A method's field (as above) with the warped moving image it made itself (on the fixed grid)."""

    displacement: Field
    warped: sitk.Image


@dataclass(frozen=True)
class Options:
    """Settings shared by the methods; weights are checkpoint paths (None: bundled or untrained)."""

    weights: str | None = None
    baseline_weights: str | None = None
    voxelmorph_weights: str | None = None
    comparison_weights: dict[str, str] = field(default_factory=dict)  # {attunet|resunet|transunet: checkpoint}
    elastix_iterations: int = 500


def set_threads(threads: int) -> None:
    """Use ``threads`` CPU threads in torch and SimpleITK/ITK (elastix and ANTs read the environment)."""
    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _field_like(vectors_zyx3: np.ndarray, reference: sitk.Image) -> Field:
    field = sitk.GetImageFromArray(np.asarray(vectors_zyx3, dtype=np.float64), isVector=True)
    field.CopyInformation(reference)
    return field


def _on_fixed_grid(moving: sitk.Image, fixed: sitk.Image) -> sitk.Image:
    """``moving`` resampled (identity transform) onto ``fixed``'s grid, for grid-bound methods."""
    return sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)


def _transform_to_field(transform: sitk.Transform, fixed: sitk.Image) -> Field:
    """A SimpleITK transform (fixed -> moving points) sampled as a pull field on ``fixed``'s grid."""
    return sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, fixed.GetSize(),
                                             fixed.GetOrigin(), fixed.GetSpacing(), fixed.GetDirection())


# ----------------------------------------------------------------------------- methods


def identity(fixed: sitk.Image, moving: sitk.Image, options: Options) -> Field:
    """No registration: u = 0 (the floor)."""
    return _field_like(np.zeros((*fixed.GetSize()[::-1], 3)), fixed)


def _network_model(path: str | None, name: str = "udrnet") -> tuple:
    """Network ``name`` (a model name of :mod:`LungUDRNetLib.networks`) as :func:`load_model` returns it: from
    checkpoint ``path`` (ValueError if it holds another network); without one, for ``udrnet`` the bundled
    weights (absent: an untrained UDRNet), for any other an untrained network (seed 0) at the bundled widths and
    on their preprocessing (runtime and memory are valid, accuracy is not)."""
    if path is not None:
        model = load_model(path)
        found = model_name(model[0].config.to_dict())
        if found != name:
            raise ValueError(f"the checkpoint holds {METHOD_NAMES[found]}, not {METHOD_NAMES[name]}"
                             + ("; pass it with --comparison-weights" if found in COMPARISON_ARCHITECTURES else ""))
        return model
    bundled, preprocess, info = load_model(None) if DEFAULT_WEIGHTS.is_file() else untrained_model()
    if name == "udrnet":
        return bundled, preprocess, info
    widths = bundled.config
    torch.manual_seed(0)
    network = network_from_config(config_for(name, widths.encoder_channels, widths.bottleneck_channels,
                                             widths.decoder_channels, widths.integration_steps,
                                             widths.reduction).to_dict())
    return network.eval(), preprocess, {**info, "trained": False}


def _network_field(fixed: sitk.Image, moving: sitk.Image, weights: str | None, name: str = "udrnet",
                   pipeline: bool = False, fast: bool = True, iterations_factor: int = 1) -> Registered:
    """:func:`LungUDRNetLib.register`'s displacement on the fixed grid and warped image, with network
    ``name`` of checkpoint ``weights`` (:func:`_network_model`).

    ``pipeline=False``: the paper's method, the network as it is, without
    affine pre-alignment, instance optimisation or stage choice; True: the
    lung masks, affine and stage choice of ``register``, with instance
    optimisation unless ``fast`` (its model's iterations times ``iterations_factor``).
    """
    model, preprocess, info = _network_model(weights, name)
    optimisation = optimisation_for(info, fast)
    if optimisation is not None:
        optimisation = replace(optimisation, iterations=optimisation.iterations * iterations_factor,
                               refinement_iterations=optimisation.refinement_iterations * iterations_factor)
    result = register(fixed, moving, model=(model, preprocess, info), device="cpu", fast=fast,
                      optimisation=optimisation, affine=pipeline, never_worse=pipeline)
    return Registered(result.displacement, result.warped)


def udrnet(fixed: sitk.Image, moving: sitk.Image, options: Options) -> Registered:
    """UDRNet alone, as in the paper."""
    return _network_field(fixed, moving, options.weights)


def udrnet_pipeline(fixed: sitk.Image, moving: sitk.Image, options: Options) -> Registered:
    """``lungudrnet register`` with its defaults: lung masks, affine, network, instance optimisation, the
    most similar stage kept."""
    return _network_field(fixed, moving, options.weights, pipeline=True, fast=False)


def udrnet_pipeline_fast(fixed: sitk.Image, moving: sitk.Image, options: Options) -> Registered:
    """``lungudrnet register --fast``: as :func:`udrnet_pipeline` without instance optimisation."""
    return _network_field(fixed, moving, options.weights, pipeline=True)


def udrnet_pipeline_2x(fixed: sitk.Image, moving: sitk.Image, options: Options) -> Registered:
    """:func:`udrnet_pipeline` with twice the instance optimisation iterations (the accuracy-time curve)."""
    return _network_field(fixed, moving, options.weights, pipeline=True, fast=False, iterations_factor=2)


def udrnet_pipeline_4x(fixed: sitk.Image, moving: sitk.Image, options: Options) -> Registered:
    """:func:`udrnet_pipeline` with four times the instance optimisation iterations."""
    return _network_field(fixed, moving, options.weights, pipeline=True, fast=False, iterations_factor=4)


def voxelmorph_baseline(fixed: sitk.Image, moving: sitk.Image, options: Options) -> Registered:
    """Our own VoxelMorph baseline: ``UDRNet(attention=False)`` through the same pipeline."""
    return _network_field(fixed, moving, options.baseline_weights, "voxelmorph")


def attunet(fixed: sitk.Image, moving: sitk.Image, options: Options) -> Registered:
    """The paper's 3D AttUNet (``lungudrnet train --model attunet``), the network alone like :func:`udrnet`."""
    return _network_field(fixed, moving, options.comparison_weights.get("attunet"), "attunet")


def resunet(fixed: sitk.Image, moving: sitk.Image, options: Options) -> Registered:
    """The paper's 3D ResUNet, the network alone."""
    return _network_field(fixed, moving, options.comparison_weights.get("resunet"), "resunet")


def transunet(fixed: sitk.Image, moving: sitk.Image, options: Options) -> Registered:
    """The paper's 3D TransUNet, the network alone."""
    return _network_field(fixed, moving, options.comparison_weights.get("transunet"), "transunet")


def voxelmorph_package(fixed: sitk.Image, moving: sitk.Image, options: Options) -> Field:
    """VoxelMorph from the ``voxelmorph`` package (PyTorch) through our pipeline.

    Weights: a checkpoint written by ``lungudrnet train --model voxelmorph-package``
    (its own preprocessing); without one the network is freshly initialised on
    UDRNet's preprocessing (runtime and memory are valid, accuracy is not).
    """
    if options.voxelmorph_weights:
        state = read_checkpoint(options.voxelmorph_weights)
        network = VoxelMorphNet(VoxelMorphNetConfig.from_dict(state["model_config"]))
        network.load_state_dict(state["state_dict"])
        preprocess = PreprocessConfig.from_dict(state["preprocess_config"])
    else:
        network, (_, preprocess, _) = VoxelMorphNet(), _network_model(options.weights)
    grid, fixed01, moving01 = prepare_pair(fixed, moving, preprocess)
    flow = predict_flow(network.eval(), fixed01, moving01, torch.device("cpu"))
    return flow_to_fixed_field(flow, grid, fixed)


def sitk_bspline(fixed: sitk.Image, moving: sitk.Image, options: Options) -> Field:
    """SimpleITK multi-resolution cubic B-spline (Mattes MI, L-BFGS), 3 levels, ~20 mm control grid."""
    fixed_f, moving_f = sitk.Cast(fixed, sitk.sitkFloat32), sitk.Cast(moving, sitk.sitkFloat32)
    extent = np.asarray(fixed.GetSize()) * np.asarray(fixed.GetSpacing())
    mesh = [max(int(e / 80.0), 1) for e in extent]  # 80 mm at the coarsest level, x2 twice: 20 mm
    initial = sitk.BSplineTransformInitializer(fixed_f, mesh, order=3)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.05, seed=1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsLBFGS2(solutionAccuracy=1e-4, numberOfIterations=50)
    method.SetInitialTransformAsBSpline(initial, inPlace=True, scaleFactors=[1, 2, 4])
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2, 1, 0])
    return _transform_to_field(method.Execute(fixed_f, moving_f), fixed)


def sitk_demons(fixed: sitk.Image, moving: sitk.Image, options: Options) -> Field:
    """SimpleITK fast symmetric forces demons, multi-resolution (shrink 4, 2, 1), on normalised intensities."""
    fixed01 = _normalised(fixed, fixed)
    moving01 = _normalised(_on_fixed_grid(moving, fixed), fixed)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(50)
    demons.SetStandardDeviations(1.5)
    field = None
    for shrink in (4, 2, 1):
        level_fixed = sitk.Shrink(fixed01, [shrink] * 3)
        level_moving = sitk.Shrink(moving01, [shrink] * 3)
        initial = (sitk.Image(level_fixed.GetSize(), sitk.sitkVectorFloat64) if field is None else
                   sitk.Resample(field, level_fixed, sitk.Transform(), sitk.sitkLinear, 0.0,
                                 sitk.sitkVectorFloat64, True))
        initial.CopyInformation(level_fixed)
        field = demons.Execute(level_fixed, level_moving, initial)
    return field


def _normalised(image: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """CT windowed and normalised to [0, 1] (the network's preprocessing), float32, on ``image``'s grid."""
    from LungUDRNetLib.preprocess import PreprocessConfig

    result = sitk.GetImageFromArray(normalise_ct(sitk.GetArrayViewFromImage(image), PreprocessConfig()))
    result.CopyInformation(image)
    return result


def elastix_parameters(itk, iterations: int):
    """B-spline registration after the elastix Model Zoo's Par0011 (Staring et al., EMPIRE10 lung CT,
    ``Parameters.Par0011.bspline1_s``): normalised correlation + 0.05 bending energy, 5 resolutions,
    10 mm final grid, adaptive stochastic gradient descent on 2000 random samples. The iteration
    count per resolution (1000 in Par0011) is ``iterations`` here, stated in the results."""
    parameters = itk.ParameterObject.New()
    bspline = parameters.GetDefaultParameterMap("bspline", 5, 10.0)
    settings = {
        "Registration": ["MultiMetricMultiResolutionRegistration"],
        "Metric": ["AdvancedNormalizedCorrelation", "TransformBendingEnergyPenalty"],
        "Metric0Weight": ["1.0"], "Metric1Weight": ["0.05"],
        "ImagePyramidSchedule": [str(v) for v in (16, 16, 16, 8, 8, 8, 4, 4, 4, 2, 2, 2, 1, 1, 1)],
        "FinalGridSpacingInPhysicalUnits": ["10.0"],
        "GridSpacingSchedule": ["8.0", "8.0", "4.0", "2.0", "1.0"],
        "Optimizer": ["AdaptiveStochasticGradientDescent"],
        "MaximumNumberOfIterations": [str(iterations)],
        "ImageSampler": ["RandomCoordinate"], "NumberOfSpatialSamples": ["2000"],
        "NewSamplesEveryIteration": ["true"], "BSplineInterpolationOrder": ["1"],
        "WriteResultImage": ["false"],
    }
    for key, value in settings.items():
        bspline[key] = value
    parameters.AddParameterMap(bspline)
    return parameters


def _to_itk(image: sitk.Image, itk):
    result = itk.GetImageFromArray(sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32)))
    result.SetOrigin(image.GetOrigin())
    result.SetSpacing(image.GetSpacing())
    result.SetDirection(np.asarray(image.GetDirection()).reshape(3, 3))
    return result


def elastix_bspline(fixed: sitk.Image, moving: sitk.Image, options: Options) -> Field:
    """elastix (itk-elastix) B-spline with the Par0011-based parameters of :func:`elastix_parameters`."""
    import itk

    fixed_itk, moving_itk = _to_itk(fixed, itk), _to_itk(moving, itk)
    _, transform = itk.elastix_registration_method(fixed_itk, moving_itk, parameter_object=elastix_parameters(
        itk, options.elastix_iterations), log_to_console=False)
    # transformix also writes deformationField.nii into the working folder: keep that in a scratch folder.
    working_folder = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="lungudrnet-transformix-") as scratch:
        os.chdir(scratch)
        try:
            field = itk.transformix_deformation_field(moving_itk, transform)  # on the fixed grid, fixed -> moving
        finally:
            os.chdir(working_folder)
    return _field_like(itk.array_from_image(field), fixed)


def ants_syn(fixed: sitk.Image, moving: sitk.Image, options: Options) -> Field:
    """ANTs (antspyx) ``registration(type_of_transform="SyN")`` with its default settings; the forward
    transforms (affine + SyN warp) are composed by ANTs into one field on the fixed grid."""
    import ants

    def to_ants(image: sitk.Image):
        result = ants.from_numpy(sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32)).transpose(2, 1, 0))
        result.set_origin(image.GetOrigin())
        result.set_spacing(image.GetSpacing())
        result.set_direction(np.asarray(image.GetDirection()).reshape(3, 3))
        return result

    fixed_ants, moving_ants = to_ants(fixed), to_ants(moving)
    result = ants.registration(fixed_ants, moving_ants, type_of_transform="SyN")
    with tempfile.TemporaryDirectory() as folder:
        composed = ants.apply_transforms(fixed_ants, moving_ants, result["fwdtransforms"],
                                         compose=str(Path(folder) / "composed_"))
        field = read_displacement_field(composed)
    return _field_like(sitk.GetArrayFromImage(field), fixed)


METHODS: dict[str, Callable[[sitk.Image, sitk.Image, Options], Field | Registered]] = {  # fastest first
    "identity": identity,
    "udrnet": udrnet,
    "udrnet-fast": udrnet_pipeline_fast,
    "udrnet-pipeline": udrnet_pipeline,
    "udrnet-pipeline-2x": udrnet_pipeline_2x,
    "udrnet-pipeline-4x": udrnet_pipeline_4x,
    "udrnet-noattention": voxelmorph_baseline,
    "attunet": attunet,
    "resunet": resunet,
    "transunet": transunet,
    "voxelmorph": voxelmorph_package,
    "sitk-demons": sitk_demons,
    "elastix-bspline": elastix_bspline,
    "sitk-bspline": sitk_bspline,
    "ants-syn": ants_syn,
}
