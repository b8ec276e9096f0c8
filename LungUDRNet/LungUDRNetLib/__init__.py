"""LungUDRNet core: unsupervised deformable registration of lung CT with UDRNet.

Pure Python on torch, numpy and SimpleITK (no Slicer, no Qt). The usual entry
point is :func:`register`; see ``geometry`` for the coordinate conventions.
Exports load lazily, so that importing the package (e.g. when 3D Slicer loads
the module before PyTorch is installed) does not import torch.
"""

import importlib

_EXPORTS = {
    "load_model": "checkpoint", "save_checkpoint": "checkpoint", "LungUDRNetError": "errors",
    "read_transform": "io", "SCHAF": "model", "UDRNet": "model", "UDRNetConfig": "model",
    "PreprocessConfig": "preprocess", "RegistrationResult": "registration", "register": "registration",
}

__version__ = "0.1.0"
__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public API (``__all__``), which the lazy exports hide from the default ``dir()``."""
    return list(__all__)
