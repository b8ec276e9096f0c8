"""LungUDRNet core: unsupervised deformable registration of lung CT with UDRNet.

Pure Python on torch, numpy and SimpleITK (no Slicer, no Qt). The usual entry
point is :func:`register`; see ``geometry`` for the coordinate conventions.
"""

from .checkpoint import load_model, save_checkpoint
from .errors import LungUDRNetError
from .model import SCHAF, UDRNet, UDRNetConfig
from .preprocess import PreprocessConfig
from .registration import RegistrationResult, register

__version__ = "0.1.0"

__all__ = [
    "LungUDRNetError", "PreprocessConfig", "RegistrationResult", "SCHAF", "UDRNet", "UDRNetConfig",
    "load_model", "register", "save_checkpoint", "__version__",
]
