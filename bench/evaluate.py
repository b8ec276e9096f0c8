"""Accuracy of one method on one pair, from the field and warped image its child process wrote."""

from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from LungUDRNetLib.geometry import field_to_transform
from LungUDRNetLib.io import read_displacement_field, read_image
from LungUDRNetLib.preprocess import PreprocessConfig
from LungUDRNetLib.registration import RegistrationResult
from LungUDRNetLib.report import registration_report
from .data import BenchPair


def evaluate(pair: BenchPair, out: Path) -> dict:
    """Before/after metrics (:func:`LungUDRNetLib.report.registration_report`) of ``out/field.mha``."""
    field = read_displacement_field(out / "field.mha")
    result = RegistrationResult(warped=read_image(out / "warped.mha", "warped"),
                                fixed_grid_displacement=sitk.Cast(field, sitk.sitkVectorFloat32),
                                transform=field_to_transform(field), grid=pair.fixed,
                                preprocess=PreprocessConfig(), device="cpu")
    return registration_report(pair.fixed, pair.moving, result, pair.fixed_mask, pair.moving_mask,
                               pair.fixed_points, pair.moving_points)
