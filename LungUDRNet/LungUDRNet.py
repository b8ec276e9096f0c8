"""LungUDRNet: unsupervised deformable registration of lung CT with UDRNet, as a 3D Slicer module.

The panel only edits the parameter node, starts a registration in a child
process, polls it and shows the result; everything else is in
``LungUDRNetSlicerLib`` (usable from the Python console without the
panel) and the core library.
"""

import importlib.util
import pathlib
import time
from typing import Annotated, Union

import numpy as np
import qt
import SimpleITK as sitk
import vtk

import slicer
from slicer import (vtkMRMLGridTransformNode, vtkMRMLLabelMapVolumeNode, vtkMRMLMarkupsFiducialNode,
                    vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from LungUDRNetSlicerLib.logic import RegistrationLogic
from LungUDRNetSlicerLib.volumes import image_from_volume, update_volume_from_image

BUNDLED, CHECKPOINT = "bundled weights", "checkpoint file"
DEVICES = ["auto", "cuda", "cpu"]
TORCH_REQUIREMENT = ">=2.1"
# The core library's requirements (pyproject.toml) by import name, except torch (from the PyTorch extension)
# and numpy and SimpleITK (bundled with Slicer).
REQUIREMENTS = {"nibabel": "nibabel>=5.0", "scipy": "scipy>=1.10", "tqdm": "tqdm>=4.60",
                "matplotlib": "matplotlib>=3.7", "yaml": "pyyaml>=6.0", "psutil": "psutil>=5.9"}
POLL_INTERVAL_MS = 200


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
        self.parent.contributors = ["LungUDRNet developers"]
        self.parent.helpText = _("""
Deformable registration of two lung CT scans (two breathing phases, or two dates) with UDRNet, an
unsupervised network: pick the fixed and the moving CT (optionally their lung masks) and click Apply.
The result is the moving scan warped onto the fixed grid and a displacement-field transform that can be
applied to anything drawn on the moving scan; the Lesion tracking section moves a segmentation or
markups from the moving scan into the fixed one and reports how far each lesion moved.
See the <a href="https://github.com/LungUDRNet/SlicerLungUDRNet#use-in-3d-slicer">documentation</a>.
""")
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
    fixedMask, movingMask - optional lung masks: the fixed one focuses the network on the lungs;
        both give the lung Dice before and after.
    warpedVolume - output: the moving scan on the fixed grid (a new volume if empty).
    outputTransform - output: the displacement-field transform (a new transform if empty).
    showAligned - put the moving volume under the output transform.
    model - the bundled weights, or a checkpoint file of the LungUDRNet trainer (checkpoint).
    device - auto (CUDA GPU if available, else CPU), cuda, or cpu (force the CPU).
    refineSteps - 0: the network's field; N > 0: refine it on the pair (N + 2N optimisation steps).
    lesions - a segmentation or markups drawn on the moving scan, to follow into the fixed scan.
    """

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedMask: vtkMRMLLabelMapVolumeNode
    movingMask: vtkMRMLLabelMapVolumeNode
    warpedVolume: vtkMRMLScalarVolumeNode
    outputTransform: vtkMRMLGridTransformNode
    showAligned: bool = True
    model: Annotated[str, Choice([BUNDLED, CHECKPOINT])] = BUNDLED
    checkpoint: pathlib.Path
    device: Annotated[str, Choice(DEVICES)] = "auto"
    refineSteps: int = 0
    lesions: Union[vtkMRMLSegmentationNode, vtkMRMLMarkupsFiducialNode]


#
# LungUDRNetWidget
#


class JobPanelWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """What both panels of the extension share: the .ui bound to a parameter node, whose changes call
    ``_updateButtons``, and a timer that calls ``_onPoll`` while a child-process job (``_job``) runs."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._pollTimer = None

    def setupPanel(self, uiFile: str, pollIntervalMs: int = POLL_INTERVAL_MS) -> "qt.QWidget":
        """Load ``Resources/UI/<uiFile>`` into the panel (``self.ui``) and create the poll timer."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath(f"UI/{uiFile}"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(pollIntervalMs)
        self._pollTimer.connect("timeout()", self._onPoll)
        return uiWidget

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        raise NotImplementedError

    def _onPoll(self) -> None:
        raise NotImplementedError


class LungUDRNetWidget(JobPanelWidget):
    """The panel: parameter node bound to the .ui widgets, Apply/Cancel, progress, lesion tracking."""

    def setup(self) -> None:
        uiWidget = self.setupPanel("LungUDRNet.ui")
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LungUDRNetLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.trackButton.connect("clicked(bool)", self.onTrackButton)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._cancelRun()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelRun()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.fixedVolume:
            self._parameterNode.fixedVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

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
            self._cancelRun()
            self.ui.statusLabel.text = _("Cancelled; nothing was changed.")
            return
        if not ensureDependencies():
            return
        parameters = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the registration."), waitCursor=True):
            model = parameters.checkpoint if parameters.model == CHECKPOINT else None
            if model is not None and not model.is_file():
                raise ValueError(_("Choose a checkpoint file (.pt) of the LungUDRNet trainer."))
            self._job = self.logic.start(parameters.fixedVolume, parameters.movingVolume, parameters.fixedMask,
                                         parameters.movingMask, model=model, device=parameters.device,
                                         warped_volume=parameters.warpedVolume,
                                         transform=parameters.outputTransform, show_aligned=parameters.showAligned,
                                         refine_steps=parameters.refineSteps)
            self.ui.progressBar.value = 0
            self._pollTimer.start()
        self._updateButtons()

    def _onPoll(self) -> None:
        ended = self._job.poll()
        self.ui.progressBar.value = round(100 * self._job.fraction)
        self.ui.statusLabel.text = self._job.message
        if not ended:
            return
        job, self._job = self._job, None
        self._pollTimer.stop()
        self._updateButtons()
        self.ui.statusLabel.text = _("Registration failed.")
        with slicer.util.tryWithErrorDisplay(_("Registration failed."), waitCursor=True):
            output = job.finish()
            self._parameterNode.warpedVolume = output.warped_volume
            self._parameterNode.outputTransform = output.transform
            slicer.util.setSliceViewerLayers(background=self._parameterNode.fixedVolume,
                                             foreground=output.warped_volume, foregroundOpacity=0.5)
            self.ui.statusLabel.text = output.summary()

    def _cancelRun(self) -> None:
        if self._job:
            self._pollTimer.stop()
            self._job.cancel()
            self._job = None
            self._updateButtons()

    def onTrackButton(self) -> None:
        parameters = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Lesion tracking failed."), waitCursor=True):
            tracking = self.logic.track_lesions(parameters.lesions, parameters.outputTransform)
            self.ui.lesionTableView.setMRMLTableNode(tracking.table)
            self.ui.statusLabel.text = _("{name}: moved into the fixed scan; {count} lesion(s) measured.").format(
                name=tracking.node.GetName(), count=len(tracking.motions))


def ensureDependencies() -> bool:
    """Install what the registration needs, after asking; False if the user declines or nothing could be done."""
    if importlib.util.find_spec("torch") is None and not installTorch():
        return False
    missing = [requirement for name, requirement in REQUIREMENTS.items() if importlib.util.find_spec(name) is None]
    if missing and not slicer.util.confirmOkCancelDisplay(
            _("LungUDRNet needs these Python packages: {packages}. Install them now?").format(
                packages=", ".join(missing)), windowTitle=_("Install Python packages")):
        return False
    for requirement in missing:
        slicer.util.pip_install(requirement)
    return True


def installTorch() -> bool:
    """Install PyTorch with the PyTorch extension's installer (it picks the CUDA build), after asking."""
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        slicer.util.errorDisplay(_("LungUDRNet needs PyTorch: install the 'PyTorch' extension from the "
                                   "Extensions Manager, restart Slicer and try again."))
        return False
    if not slicer.util.confirmOkCancelDisplay(
            _("LungUDRNet needs PyTorch, which is not installed yet. Download and install it now? "
              "This may take several minutes."), windowTitle=_("Install PyTorch")):
        return False
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    return torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT) is not None


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
        self.assertGreater(output.report["after"]["ncc_percent"], output.report["before"]["ncc_percent"])

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
