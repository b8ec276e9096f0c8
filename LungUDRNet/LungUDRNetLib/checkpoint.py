"""Saving and safely loading UDRNet checkpoints.

A checkpoint is a ``torch.save`` dictionary of plain tensors and
JSON-like values: the format version, the model and preprocessing configs,
the weights and free-form metadata (training provenance). Loading always
uses ``torch.load(weights_only=True)``, so a file cannot run code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .voxelmorph_net import is_voxelmorph_config
from .errors import CancelledError, ModelError
from .input_files import check_input_path
from .io import atomic_path
from .model import RegistrationUNet, UDRNet
from .networks import network_from_config
from .preprocess import PreprocessConfig

FORMAT_VERSION = 1
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "Resources" / "Models" / "udrnet_lung_default.pt"


def save_checkpoint(path: str | os.PathLike, model: RegistrationUNet, preprocess: PreprocessConfig,
                    metadata: dict | None = None, extra: dict | None = None) -> Path:
    """Atomically write ``model`` with its configs; ``extra`` adds trainer state (optimizer, RNG...)."""
    state = {
        "format_version": FORMAT_VERSION,
        "model_config": model.config.to_dict(),
        "preprocess_config": preprocess.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": metadata or {},
        **(extra or {}),
    }
    with atomic_path(path) as temporary:
        torch.save(state, temporary)
    return Path(path)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint dictionary safely, checking its format version."""
    path = check_input_path(path, "model", folder=True, error=ModelError)
    if path.is_dir():
        if not os.path.lexists(path / "best.pt"):
            raise ModelError(f"model {path}: folder holds no best.pt; pass a checkpoint file or a training run folder")
        path = check_input_path(path / "best.pt", "model", error=ModelError)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except CancelledError:  # SIGTERM while loading: not a problem of the file
        raise
    except Exception as error:  # truncated zip, unpickling refused, ...
        raise ModelError(f"model {path}: not a loadable LungUDRNet checkpoint: {_load_failure(error)}") from None
    if not isinstance(state, dict) or "state_dict" not in state or "model_config" not in state:
        raise ModelError(f"model {path}: not a LungUDRNet checkpoint (no model_config/state_dict)")
    version = state.get("format_version", 0)
    if not isinstance(version, int):
        raise ModelError(f"model {path}: format version {version!r} is not a number; not a LungUDRNet checkpoint")
    if version > FORMAT_VERSION:
        raise ModelError(f"model {path}: checkpoint format {version} is newer than this LungUDRNet "
                         f"supports ({FORMAT_VERSION}); update LungUDRNet")
    return state


def _load_failure(error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in words for the user."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()  # torch's messages hold terminal colour codes
    if "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        return ("it holds Python objects other than weights" + (f" (here {found[1]})" if found else "")
                + ", which could run code when loaded, so it was refused and nothing in it was run; "
                "use a checkpoint saved by LungUDRNet, from a source you trust")
    reason = text.split(". ")[0].splitlines()[0] if text else type(error).__name__
    return f"the file is truncated, corrupt or not a PyTorch file ({reason[:200]}); copy or download it again"


def load_model(path: str | os.PathLike | None = None) -> tuple[RegistrationUNet, PreprocessConfig, dict]:
    """Build the network from a checkpoint (default: the bundled weights): UDRNet, its VoxelMorph baseline
    or a comparison network (:mod:`LungUDRNetLib.networks`).

    Returns ``(model in eval mode on CPU, preprocessing config, metadata)``.
    """
    if path is None and not DEFAULT_WEIGHTS.is_file():
        raise ModelError(f"model: the bundled weights ({DEFAULT_WEIGHTS.name}) are not in this installation; "
                         "pass --model CHECKPOINT (e.g. one trained with `lungudrnet train`)")
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    state = read_checkpoint(path)
    if is_voxelmorph_config(state["model_config"]):
        raise ModelError(f"model {path}: holds the voxelmorph package's network (a benchmark baseline), which "
                         "register does not load; use it with `lungudrnet bench --voxelmorph-weights`")
    try:
        preprocess = PreprocessConfig.from_dict(state["preprocess_config"])
    except (TypeError, KeyError, ValueError) as error:
        raise ModelError(f"model {path}: its preprocessing settings are not valid ({error}); the file was edited: "
                         "use a checkpoint as `lungudrnet train` saved it") from None
    try:
        model = network_from_config(state["model_config"])
        model.load_state_dict(state["state_dict"])
    except (TypeError, KeyError, ValueError, RuntimeError, AttributeError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
        reason = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]
        raise ModelError(f"model {path}: weights do not match its architecture config ({reason[:200].rstrip('.')}); "
                         "the file was edited or mixes two models: use a checkpoint as `lungudrnet train` saved it"
                         ) from None
    check_finite_weights(state["state_dict"], f"model {path}")
    metadata = dict(state.get("metadata", {}))
    metadata.setdefault("path", str(path))
    return model.eval(), preprocess, metadata


def check_finite_weights(state_dict: dict, where: str) -> None:
    """Raise :class:`ModelError` naming ``where`` if a weight tensor holds NaN or Inf values."""
    tensors = [(name, value) for name, value in state_dict.items()
               if torch.is_tensor(value) and value.is_floating_point()]
    bad = [name for name, value in tensors if not bool(torch.isfinite(value).all())]
    if bad:
        raise ModelError(f"{where}: its weights hold NaN or Inf values ({len(bad)} of {len(tensors)} tensors, e.g. "
                         f"{bad[0]}): the training diverged or the file is damaged; use another checkpoint (e.g. the "
                         "run's best.pt, or the bundled weights)")


def untrained_model(preprocess: PreprocessConfig | None = None) -> tuple[UDRNet, PreprocessConfig, dict]:
    """A freshly initialised UDRNet (near-zero output), for phantoms and tests."""
    torch.manual_seed(0)
    return UDRNet().eval(), preprocess or PreprocessConfig(), {"path": None, "trained": False}
