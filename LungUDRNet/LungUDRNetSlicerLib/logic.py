"""The registration logic of the Slicer module on MRML nodes, usable without its GUI.

Needs only Slicer's MRML libraries (the Slicer application or the ``slicer-core``
package), VTK, numpy and the core library; torch is imported when a
registration runs. Nothing here uses ``slicer.mrmlScene``: the scene is taken
from the input nodes.

Coordinates: MRML nodes are in RAS millimetres, the core in LPS millimetres;
every conversion goes through :mod:`LungUDRNetLib.geometry`. Volumes are taken
in their own coordinates (the voxels and the full IJK->RAS matrix; parent
transforms are not applied) and all outputs are in the fixed volume's
coordinates:

* the warped volume: the moving volume resampled onto the fixed volume's grid;
* the transform: a grid transform covering the fixed volume at the resolution
  the field really has (the network grid, 66^3 nodes for a 64^3 network,
  instead of every fixed voxel), whose "from parent"
  displacement u (RAS mm) maps a fixed point p to the corresponding moving
  point p + u(p). As the parent of the moving volume it shows that volume
  aligned with the fixed one; hardened on a node drawn on the moving scan it
  moves the node into the fixed scan (Slicer inverts the field for that).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import SimpleITK as sitk
import slicer

from LungUDRNetLib.errors import InputError

from .lesions import LesionTracking, track_lesions
from .volumes import image_from_volume, mask_from_node, update_grid_transform_from_field, update_volume_from_image

Progress = Callable[[float, str], None]
ATTRIBUTE_PREFIX = "LungUDRNet."


@dataclass
class RegistrationOutput:
    """The nodes made by a registration, its metrics (as in ``metrics.json``) and notes for the user."""

    warped_volume: object
    transform: object
    report: dict
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """:func:`~LungUDRNetLib.report.summary_line` (similarity before -> after with its region, runtime,
        device); then the notes, one per line."""
        from LungUDRNetLib.report import summary_line

        return summary_line(self.report) + "".join(f"\n{note}" for note in self.notes)


class RegistrationLogic:
    """Register a moving CT volume node onto a fixed one with UDRNet; track lesions through the result.

    :meth:`process` runs in the calling thread (Python console, scripts,
    tests); :meth:`start` runs the same registration in a child process and
    returns a :class:`RegistrationJob` to poll or cancel (the module's panel).
    """

    def process(self, fixed_volume, moving_volume, fixed_mask=None, moving_mask=None, model=None,
                device: str = "auto", warped_volume=None, transform=None, show_aligned: bool = True,
                progress: Progress | None = None, fast: bool = False) -> RegistrationOutput:
        """Register ``moving_volume`` onto ``fixed_volume`` and add the warped volume and transform.

        ``model``: checkpoint path, a network (UDRNet or a comparison network) or None for the bundled weights;
        ``device``: ``"auto"`` (CUDA if available, else CPU), ``"cuda"`` or ``"cpu"``.
        ``warped_volume``/``transform``: nodes to fill, or None for new ones.
        ``show_aligned`` puts the moving volume under the transform.
        ``fast`` keeps the network's field, without instance optimisation on this pair (see ``register``).
        ``progress(fraction, message)`` is called between steps; an exception
        raised by it (e.g. :class:`~LungUDRNetLib.errors.CancelledError`)
        stops the run with the scene unchanged: nodes are made only at the end.
        """
        from LungUDRNetLib.registration import register
        from LungUDRNetLib.report import registration_report

        images = input_images(fixed_volume, moving_volume, fixed_mask, moving_mask)
        plan = OutputPlan(fixed_volume, moving_volume, warped_volume, transform, show_aligned, device)
        notes: list[str] = []
        with warnings_as_notes(notes):
            result = register(images["fixed"], images["moving"], model=model, device=device,
                              fixed_mask=images["fixed_mask"], moving_mask=images["moving_mask"], progress=progress,
                              fast=fast)
            report = registration_report(images["fixed"], images["moving"], result,
                                         images["fixed_mask"], images["moving_mask"])
        return plan.make(result.warped, result.native_displacement, report, notes)

    def start(self, fixed_volume, moving_volume, fixed_mask=None, moving_mask=None,
              model: str | Path | None = None, device: str = "auto", warped_volume=None, transform=None,
              show_aligned: bool = True, fast: bool = False, python: str | None = None) -> RegistrationJob:
        """Like :meth:`process`, but in a child process (``lungudrnet register``); returns at once.

        The input volumes are copied now; the outputs are made by
        :meth:`RegistrationJob.finish`. ``model`` is a checkpoint path or None;
        ``python`` the interpreter of the child (default: this one; in the
        Slicer application, ``PythonSlicer``).
        """
        from LungUDRNetLib.background import RegistrationProcess

        images = input_images(fixed_volume, moving_volume, fixed_mask, moving_mask)
        plan = OutputPlan(fixed_volume, moving_volume, warped_volume, transform, show_aligned, device)
        process = RegistrationProcess(images, model=model, device=device, python=python, fast=fast)
        return RegistrationJob(process, plan)

    def track_lesions(self, lesions, transform) -> LesionTracking:
        """Move lesions drawn on the moving scan into the fixed scan (see :func:`.lesions.track_lesions`)."""
        return track_lesions(lesions, transform)


def input_images(fixed_volume, moving_volume, fixed_mask=None, moving_mask=None) -> dict[str, sitk.Image | None]:
    """The input nodes as SimpleITK images (LPS), keyed like ``register()``'s arguments."""
    if moving_volume is not None and moving_volume is fixed_volume:
        raise InputError("moving volume: is the fixed volume; choose two different scans")
    images = {"fixed": image_from_volume(fixed_volume, "fixed volume"),
              "moving": image_from_volume(moving_volume, "moving volume")}
    for key, mask, volume in (("fixed_mask", fixed_mask, fixed_volume), ("moving_mask", moving_mask, moving_volume)):
        images[key] = None if mask is None else mask_from_node(mask, volume, key.replace("_", " "))
    return images


@dataclass
class OutputPlan:
    """Where the results of one registration go, checked before it runs.

    :meth:`make` is the only step of a registration that changes the scene.
    """

    fixed_volume: object
    moving_volume: object
    warped_volume: object = None
    transform: object = None
    show_aligned: bool = True
    requested_device: str = "auto"

    def __post_init__(self) -> None:
        if self.warped_volume is not None and self.warped_volume in (self.fixed_volume, self.moving_volume):
            raise InputError("warped volume: choose a new volume, not one of the inputs")

    def make(self, warped: sitk.Image, displacement: sitk.Image, report: dict,
             notes: list[str]) -> RegistrationOutput:
        """Fill (or add) the warped volume and the transform from the core's results (LPS mm): the warped
        image on the fixed grid, the displacement on its native grid (the resolution the field really has,
        covering the fixed image; Slicer interpolates it linearly, as SimpleITK does)."""
        fixed, moving = self.fixed_volume, self.moving_volume
        scene = fixed.GetScene()
        if scene is None or moving.GetScene() is not scene:
            raise InputError("fixed/moving volume: was removed from the scene during the registration")
        warped_volume, transform = self.warped_volume, self.transform
        if warped_volume is None:
            warped_volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                                    scene.GenerateUniqueName(f"{moving.GetName()} warped"))
        update_volume_from_image(warped_volume, warped)
        warped_volume.CreateDefaultDisplayNodes()
        if transform is None:
            name = f"{moving.GetName()} to {fixed.GetName()} (LungUDRNet)"
            transform = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", scene.GenerateUniqueName(name))
        update_grid_transform_from_field(transform, displacement)
        for node in (transform, warped_volume):
            _describe_result(node, fixed, moving, report)
        if self.show_aligned:
            moving.SetAndObserveTransformNodeID(transform.GetID())
        return RegistrationOutput(warped_volume, transform, report,
                                  device_notes(self.requested_device, report["device"]) + notes)


def _describe_result(node, fixed_volume, moving_volume, report: dict) -> None:
    """Reference the inputs (Slicer's registration roles) and record the model and device."""
    node.SetNodeReferenceID(slicer.vtkMRMLTransformNode.GetFixedNodeReferenceRole(), fixed_volume.GetID())
    node.SetNodeReferenceID(slicer.vtkMRMLTransformNode.GetMovingNodeReferenceRole(), moving_volume.GetID())
    node.SetAttribute(ATTRIBUTE_PREFIX + "model", str(report["model"].get("path") or "in-memory model"))
    node.SetAttribute(ATTRIBUTE_PREFIX + "device", str(report["device"]))


def device_notes(requested: str, used: str) -> list[str]:
    """A note when ``auto`` found no GPU and the registration ran on the CPU."""
    if requested == "auto" and used == "cpu":
        return ["No CUDA GPU available: ran on the CPU (slower)."]
    return []


@contextlib.contextmanager
def warnings_as_notes(notes: list[str]) -> Iterator[None]:
    """Collect the core's warnings (CPU fallback after GPU out-of-memory, NaN voxels...) into ``notes``."""

    class Collector(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notes.append(record.getMessage())

    logger = logging.getLogger("LungUDRNetLib")
    handler = Collector(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


class RegistrationJob:
    """A registration running in a child process (see :meth:`RegistrationLogic.start`).

    Call :meth:`poll` (e.g. from a GUI timer) until it returns True, then
    :meth:`finish` to make the output nodes; :meth:`cancel` stops the child
    and deletes its files. Only :meth:`finish` touches the scene.
    """

    def __init__(self, process, plan: OutputPlan) -> None:
        self._process = process
        self._plan = plan

    @property
    def fraction(self) -> float:
        """Progress in [0, 1]."""
        return self._process.fraction

    @property
    def message(self) -> str:
        """The current step, for a status line."""
        return self._process.message

    def poll(self) -> bool:
        """Read the child's new output; True once it has ended."""
        return self._process.poll()

    def finish(self) -> RegistrationOutput:
        """Read the results of the ended child and make the output nodes (raises the child's error)."""
        warped, displacement, report = self._process.results()
        return self._plan.make(warped, displacement, report, list(self._process.warnings))

    def cancel(self) -> None:
        """Stop the child and everything it started; the scene stays as it was."""
        self._process.cancel()


