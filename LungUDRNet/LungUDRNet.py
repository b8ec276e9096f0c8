"""LungUDRNet: unsupervised deformable registration of lung CT with UDRNet, as a 3D Slicer module.

The panel only edits the parameter node, starts a registration in a child
process, polls it and shows the result; everything else is in
``LungUDRNetSlicerLib`` (usable from the Python console without the
panel) and the core library.
"""

import pathlib
import time
from typing import Annotated, Optional, Union

import numpy as np
import SimpleITK as sitk
import vtk

import slicer
from slicer import (vtkMRMLGridTransformNode, vtkMRMLLabelMapVolumeNode, vtkMRMLMarkupsFiducialNode,
                    vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest

from LungUDRNetSlicerLib.dependencies import REGISTRATION_REQUIREMENTS, python_slicer, self_test_skip_reason
from LungUDRNetSlicerLib.logic import RegistrationLogic
from LungUDRNetSlicerLib.panel import JobPanelWidget, ensureRequirements
from LungUDRNetSlicerLib.volumes import image_from_volume, update_volume_from_image

BUNDLED, CHECKPOINT = "bundled weights", "checkpoint file"
DEVICES = ["auto", "cuda", "cpu"]
CONTRIBUTORS = ["LungUDRNet developers (LungUDRNet open-source project)"]
DISCLAIMER = ("For research use only: not a medical device, not for diagnosis or treatment decisions. Check every "
              "result against the images.")


#
# LungUDRNet
#


class LungUDRNet(ScriptedLoadableModule):
    """Module description, shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("LungUDRNet")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = CONTRIBUTORS
        self.parent.helpText = _("""
Deformable registration of two lung CT scans (two breathing phases, or two dates) with UDRNet, an
unsupervised network: pick the fixed and the moving CT (optionally their lung masks) and click Apply.
The result is the moving scan warped onto the fixed grid and a displacement-field transform that can be
applied to anything drawn on the moving scan; the Lesion tracking section moves a segmentation or
markups from the moving scan into the fixed one and reports how far each lesion moved.
See the <a href="https://github.com/LungUDRNet/SlicerLungUDRNet#use-in-3d-slicer">documentation</a>.
""") + "<p>" + _(DISCLAIMER) + "</p>"
        self.parent.acknowledgementText = _("""
LungUDRNet implements the method of "Unsupervised deformable registration of lung CT images with a
hybrid attention mechanism (UDRNet)": a VoxelMorph-style encoder-decoder with scHAF spatial and channel
hybrid attention on its skip connections. The Learn2Reg LungCT data it was evaluated on are by
Hering et al. (CC BY 4.0).
""")


#
# LungUDRNetParameterNode
#


@parameterNodeWrapper
class LungUDRNetParameterNode:
    """
    fixedVolume, movingVolume - the CT scans; the moving one is registered onto the fixed one.
    fixedMask, movingMask - optional lung masks (labelmap, or segmentation: all its segments); empty: automatic
        lung masks. They place the network grid and the affine pre-alignment on the lungs, the similarity is
        reported inside the fixed lungs, and both give the lung Dice.
    warpedVolume - output: the moving scan on the fixed grid (a new volume if empty).
    outputTransform - output: the displacement-field transform (a new transform if empty).
    showAligned - put the moving volume under the output transform.
    model - the bundled weights, or a checkpoint file of the LungUDRNet trainer (checkpoint; "" when unset).
    device - auto (CUDA GPU if available, else CPU), cuda, or cpu (force the CPU).
    fast - the network's field only, without instance optimisation on this pair.
    lesions - a segmentation or markups drawn on the moving scan, to follow into the fixed scan.
    """

    fixedVolume: Optional[vtkMRMLScalarVolumeNode]
    movingVolume: Optional[vtkMRMLScalarVolumeNode]
    fixedMask: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None]
    movingMask: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None]
    warpedVolume: Optional[vtkMRMLScalarVolumeNode]
    outputTransform: Optional[vtkMRMLGridTransformNode]
    showAligned: bool = True
    model: Annotated[str, Choice([BUNDLED, CHECKPOINT])] = BUNDLED
    checkpoint: str = ""
    device: Annotated[str, Choice(DEVICES)] = "auto"
    fast: bool = False
    lesions: Union[vtkMRMLSegmentationNode, vtkMRMLMarkupsFiducialNode, None]


#
# LungUDRNetWidget
#


class LungUDRNetWidget(JobPanelWidget):
    """The panel: parameter node bound to the .ui widgets, Apply/Cancel, progress, lesion tracking."""

    uiFile = "LungUDRNet.ui"

    def setupLogic(self) -> None:
        self.logic = LungUDRNetLogic()

    def setupButtons(self) -> None:
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.trackButton.connect("clicked(bool)", self.onTrackButton)

    def _initializeParameters(self, parameters) -> None:
        if not parameters.fixedVolume:
            parameters.fixedVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def _updateButtons(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        running = self._job is not None
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = running or bool(parameters and parameters.fixedVolume and parameters.movingVolume)
        self.ui.checkpointPathLineEdit.enabled = bool(parameters) and parameters.model == CHECKPOINT
        self.ui.trackButton.enabled = (not running and bool(parameters and parameters.lesions
                                                            and parameters.outputTransform))

    def onApplyButton(self) -> None:
        """Apply starts a registration in a child process; while it runs, the same button cancels it."""
        if self._job:
            self._cancelJob()
            self.ui.statusLabel.text = _("Cancelled; nothing was changed.")
            return
        if not ensureRequirements(REGISTRATION_REQUIREMENTS):
            return
        parameters = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the registration."), waitCursor=True):
            model = pathlib.Path(parameters.checkpoint) if parameters.model == CHECKPOINT else None
            if model is not None and not model.is_file():
                raise ValueError(_("Choose a checkpoint file (.pt) of the LungUDRNet trainer."))
            job = self.logic.start(parameters.fixedVolume, parameters.movingVolume, parameters.fixedMask,
                                   parameters.movingMask, model=model, device=parameters.device,
                                   warped_volume=parameters.warpedVolume, transform=parameters.outputTransform,
                                   show_aligned=parameters.showAligned, fast=parameters.fast,
                                   python=python_slicer())
            self.startPolling(job)

    def _onPoll(self) -> None:
        ended = self._job.poll()
        self.ui.progressBar.value = round(100 * self._job.fraction)
        self.ui.statusLabel.text = self._job.message
        if not ended:
            return
        job = self.stopPolling()
        self.ui.statusLabel.text = _("Registration failed.")
        with slicer.util.tryWithErrorDisplay(_("Registration failed."), waitCursor=True):
            output = job.finish()
            self._parameterNode.warpedVolume = output.warped_volume
            self._parameterNode.outputTransform = output.transform
            slicer.util.setSliceViewerLayers(background=self._parameterNode.fixedVolume,
                                             foreground=output.warped_volume, foregroundOpacity=0.5)
            self.ui.statusLabel.text = output.summary()

    def _cancelJob(self) -> None:
        if self._job:
            self.stopPolling().cancel()

    def onTrackButton(self) -> None:
        parameters = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Lesion tracking failed."), waitCursor=True):
            tracking = self.logic.track_lesions(parameters.lesions, parameters.outputTransform)
            self.ui.lesionTableView.setMRMLTableNode(tracking.table)
            self.ui.statusLabel.text = _("{name}: moved into the fixed scan; {count} lesion(s) measured.").format(
                name=tracking.node.GetName(), count=len(tracking.motions))


#
# LungUDRNetLogic
#


class LungUDRNetLogic(ScriptedLoadableModuleLogic, RegistrationLogic):
    """The module's logic: ``process``, ``start`` and ``track_lesions`` of
    :class:`LungUDRNetSlicerLib.logic.RegistrationLogic`, plus the module's parameter node.
    """

    def getParameterNode(self):
        return LungUDRNetParameterNode(super().getParameterNode())


#
# LungUDRNetTest
#


class LungUDRNetTest(ScriptedLoadableModuleTest):
    """Registers a generated phantom pair (no downloads) with the logic and through the panel."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        skipReason = self_test_skip_reason(REGISTRATION_REQUIREMENTS)
        if skipReason:
            self.delayDisplay(skipReason)
            return
        self.setUp()
        self.test_logic_registers_a_phantom_pair()
        self.setUp()
        self.test_panel_runs_cancels_and_tracks()

    def phantomPair(self):
        """A moving chest phantom and the fixed one made from it by a known smooth deformation."""
        from LungUDRNetLib.geometry import warp_image
        from LungUDRNetLib.phantom import analytic_field, chest_phantom, make_grid

        grid = make_grid((64, 56, 48), (5.0, 5.0, 6.0), origin=(-160.0, -140.0, -144.0))
        moving = chest_phantom(grid, seed=1)
        fixed = warp_image(moving, analytic_field(grid, translation_mm=(0.0, 0.0, 6.0), amplitude_mm=4.0))
        nodes = []
        for name, image in (("phantom fixed", fixed), ("phantom moving", moving)):
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
            update_volume_from_image(node, image)
            node.CreateDefaultDisplayNodes()
            nodes.append(node)
        return nodes

    def test_logic_registers_a_phantom_pair(self):
        self.delayDisplay("Registering a phantom pair with the bundled weights")
        fixed, moving = self.phantomPair()
        output = LungUDRNetLogic().process(fixed, moving)
        self.assertIsInstance(output.transform, slicer.vtkMRMLGridTransformNode)
        self.assertEqual(moving.GetTransformNodeID(), output.transform.GetID())
        # Never worse than doing nothing: a stage that lowers the similarity in the lungs is not kept.
        self.assertIn(output.report["stages"]["kept"], ("identity", "affine", "network", "affine + network"))
        keptScore = next(score["lung_ncc_percent"] for score in output.report["stages"]["scores"]
                         if score["stage"] == output.report["stages"]["kept"])
        identityScore = output.report["stages"]["scores"][0]["lung_ncc_percent"]
        self.assertGreaterEqual(keptScore, identityScore)

        # Hardening the transform on a copy of the moving volume reproduces the warped volume. Slicer
        # resamples onto a grid of its own, so compare after resampling it onto the fixed grid.
        copy = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "hardened")
        update_volume_from_image(copy, image_from_volume(moving))
        copy.SetAndObserveTransformNodeID(output.transform.GetID())
        slicer.vtkSlicerTransformLogic.hardenTransform(copy)
        fixedImage = image_from_volume(fixed)
        hardened = sitk.Resample(image_from_volume(copy), fixedImage, sitk.Transform(), sitk.sitkLinear, np.nan)
        hardened, warped = sitk.GetArrayFromImage(hardened), slicer.util.arrayFromVolume(output.warped_volume)
        inside = np.isfinite(hardened)
        self.assertGreater(np.corrcoef(hardened[inside], warped[inside])[0, 1], 0.99)
        self.delayDisplay(output.summary())

    def test_panel_runs_cancels_and_tracks(self):
        self.delayDisplay("Running, cancelling and re-running from the panel")
        fixed, moving = self.phantomPair()
        slicer.util.selectModule("LungUDRNet")
        widget = slicer.modules.LungUDRNetWidget
        parameters = widget.logic.getParameterNode()
        parameters.fixedVolume, parameters.movingVolume = fixed, moving
        parameters.warpedVolume, parameters.outputTransform = None, None
        nodeCount = slicer.mrmlScene.GetNumberOfNodes()

        widget.ui.applyButton.click()
        self.assertEqual(widget.ui.applyButton.text, "Cancel")
        widget.ui.applyButton.click()
        self.assertEqual(widget.ui.applyButton.text, "Apply")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodeCount)

        widget.ui.applyButton.click()
        deadline = time.monotonic() + 600
        while widget._job is not None:
            self.assertLess(time.monotonic(), deadline, "registration did not finish in 10 minutes")
            slicer.app.processEvents()
            time.sleep(0.05)
        self.assertIsNotNone(parameters.outputTransform)
        self.assertEqual(widget.ui.progressBar.value, 100)

        markups = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "nodule")
        markups.AddControlPoint(vtk.vtkVector3d(0.0, 0.0, 0.0))
        parameters.lesions = markups
        widget.ui.trackButton.click()
        self.assertEqual(widget.ui.lesionTableView.mrmlTableNode().GetNumberOfRows(), 1)
        self.delayDisplay("Test passed")
