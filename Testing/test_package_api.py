"""The public API of ``LungUDRNetLib``: listed by ``dir()`` and ``__all__`` although it loads lazily."""

from __future__ import annotations

import subprocess
import sys

import LungUDRNetLib

PUBLIC_API = ["LungUDRNetError", "PreprocessConfig", "RegistrationResult", "SCHAF", "UDRNet", "UDRNetConfig",
              "__version__", "load_model", "read_transform", "register", "save_checkpoint"]


def test_dir_and_all_list_the_public_api():
    assert LungUDRNetLib.__all__ == PUBLIC_API
    assert dir(LungUDRNetLib) == PUBLIC_API
    assert "importlib" not in dir(LungUDRNetLib)


def test_every_listed_name_resolves_to_its_object():
    from LungUDRNetLib.io import read_transform
    from LungUDRNetLib.registration import RegistrationResult, register

    namespace: dict = {}
    exec("from LungUDRNetLib import *", namespace)
    assert sorted(name for name in namespace if name != "__builtins__") == PUBLIC_API
    assert (namespace["read_transform"], namespace["register"]) == (read_transform, register)
    assert namespace["RegistrationResult"] is RegistrationResult
    assert namespace["__version__"] == LungUDRNetLib.__version__


def test_listing_the_api_does_not_import_torch():
    code = "import sys, LungUDRNetLib; names = dir(LungUDRNetLib); print(len(names), 'torch' in sys.modules)"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert completed.stdout.split() == [str(len(PUBLIC_API)), "False"]
