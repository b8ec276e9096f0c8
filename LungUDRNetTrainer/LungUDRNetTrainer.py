"""LungUDRNetTrainer: a small 3D Slicer panel that runs the headless UDRNet trainer in a background process.

Pick a dataset folder (Learn2Reg layout) and a run folder, Start; the panel
shows the epoch progress and the last validation scores. Stop lets the trainer
finish its step and write ``last.pt`` (a second click kills it); tick Resume to
continue a stopped run. Multi-GPU training is done headless with ``torchrun``
(see the README); everything here is in ``LungUDRNetTrainerLib``.
"""

import pathlib
from typing import Annotated

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest

from LungUDRNetSlicerLib.dependencies import TRAINING_REQUIREMENTS, python_slicer, self_test_skip_reason
from LungUDRNetSlicerLib.panel import JobPanelWidget, ensureRequirements

PRESETS = ["paper", "fast", "smoke"]
MODELS = ["udrnet", "voxelmorph", "attunet", "resunet", "transunet"]
DEVICES = ["auto", "cuda", "cpu"]
POLL_INTERVAL_MS = 500
CONTRIBUTORS = ["LungUDRNet developers (LungUDRNet open-source project)"]


class LungUDRNetTrainer(ScriptedLoadableModule):
    """Module description, shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("LungUDRNet Trainer")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = ["LungUDRNet"]
        self.parent.contributors = CONTRIBUTORS
        self.parent.helpText = _("""
Train UDRNet (or the 3D VoxelMorph baseline) on a folder of lung CT pairs in the Learn2Reg layout, in a
background process. The run folder receives config.yaml, log.csv, last.pt and best.pt; use best.pt as the
checkpoint of the LungUDRNet module. For several GPUs, run the trainer headless with torchrun (see the
<a href="https://github.com/LungUDRNet/SlicerLungUDRNet#training">documentation</a>).
""")
        self.parent.acknowledgementText = _("""
The training follows "Unsupervised deformable registration of lung CT images with a hybrid attention
mechanism (UDRNet)". The Learn2Reg LungCT data are by Hering et al. (CC BY 4.0).
""")


@parameterNodeWrapper
class LungUDRNetTrainerParameterNode:
    """
    dataFolder - a Learn2Reg dataset folder (dataset JSON, imagesTr/, masksTr/, keypointsTr/ ...).
    runFolder - where the run writes its configuration, log and checkpoints.
    preset - paper (the paper's settings), fast (64^3, CPU-sized) or smoke (seconds, a pipeline check).
    model - udrnet (with scHAF), voxelmorph (the baseline of the ablation) or a comparison network of the
            paper: attunet, resunet, transunet.
    device - auto (CUDA GPU if available, else CPU), cuda or cpu.
    resume - continue the run in runFolder from its last.pt instead of starting a new one.
    """

    dataFolder: str = ""
    runFolder: str = ""
    preset: Annotated[str, Choice(PRESETS)] = "paper"
    model: Annotated[str, Choice(MODELS)] = "udrnet"
    device: Annotated[str, Choice(DEVICES)] = "auto"
    resume: bool = False


class LungUDRNetTrainerWidget(JobPanelWidget):
    """The panel: parameter node bound to the .ui widgets, Start/Stop/Kill, progress and last scores."""

    uiFile = "LungUDRNetTrainer.ui"
    pollIntervalMs = POLL_INTERVAL_MS
    cancelOnSceneClose = False  # training goes on after Close Scene; the panel binds to the new scene

    def setupLogic(self) -> None:
        self.logic = LungUDRNetTrainerLogic()

    def setupButtons(self) -> None:
        self.ui.startButton.connect("clicked(bool)", self.onStartButton)

    def _updateButtons(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        if self._job:
            self.ui.startButton.text = _("Kill") if self._job.stopping else _("Stop")
            self.ui.startButton.enabled = True
            return
        self.ui.startButton.text = _("Start")
        ready = bool(parameters and parameters.runFolder)
        self.ui.startButton.enabled = ready and (parameters.resume or bool(parameters.dataFolder))

    def onStartButton(self) -> None:
        """Start a run; while it runs the button asks it to stop, and then kills it."""
        if self._job:
            if self._job.stopping:
                self._job.kill()
            else:
                self._job.stop()
            self._updateButtons()
            return
        if not ensureRequirements(TRAINING_REQUIREMENTS):
            return
        parameters = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the training."), waitCursor=True):
            from LungUDRNetTrainerLib.process import TrainingProcess, train_arguments
            arguments = train_arguments(parameters.runFolder, parameters.dataFolder, parameters.preset,
                                        parameters.model, parameters.device, parameters.resume)
            self.ui.summaryLabel.text = ""
            self.startPolling(TrainingProcess(parameters.runFolder, arguments, python=python_slicer()))

    def _onPoll(self) -> None:
        ended = self._job.poll()
        self.ui.progressBar.value = round(100 * self._job.fraction)
        self.ui.statusLabel.text = self._job.message
        self.ui.summaryLabel.text = self._job.summary
        if ended:
            self.stopPolling()
        else:
            self._updateButtons()

    def _cancelJob(self) -> None:
        if self._job:
            self.stopPolling().kill()


class LungUDRNetTrainerLogic(ScriptedLoadableModuleLogic):
    """Only the parameter node: the training itself is ``LungUDRNetTrainerLib.process.TrainingProcess``."""

    def getParameterNode(self):
        return LungUDRNetTrainerParameterNode(super().getParameterNode())


class LungUDRNetTrainerTest(ScriptedLoadableModuleTest):
    """Trains the smoke preset on a generated phantom dataset through the panel."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        skipReason = self_test_skip_reason(TRAINING_REQUIREMENTS)
        if skipReason:
            self.delayDisplay(skipReason)
            return
        self.setUp()
        self.test_panel_trains_a_smoke_run()

    def test_panel_trains_a_smoke_run(self):
        import tempfile
        import time

        from LungUDRNetTrainerLib.toydata import write_toy_learn2reg

        folder = pathlib.Path(tempfile.mkdtemp(prefix="LungUDRNetTrainerTest-"))
        self.delayDisplay("Training the smoke preset on phantom pairs")
        slicer.util.selectModule("LungUDRNetTrainer")
        widget = slicer.modules.LungUDRNetTrainerWidget
        parameters = widget.logic.getParameterNode()
        parameters.dataFolder = str(write_toy_learn2reg(folder / "data", cases=4, val_cases=1))
        parameters.runFolder = str(folder / "run")
        parameters.preset, parameters.device, parameters.resume = "smoke", "cpu", False
        widget.ui.startButton.click()
        self.assertEqual(widget.ui.startButton.text, "Stop")
        deadline = time.monotonic() + 600
        while widget._job is not None:
            self.assertLess(time.monotonic(), deadline, "training did not finish in 10 minutes")
            slicer.app.processEvents()
            time.sleep(0.1)
        self.assertTrue((folder / "run" / "best.pt").is_file(), widget.ui.statusLabel.text)
        self.assertEqual(widget.ui.progressBar.value, 100)
        self.delayDisplay(widget.ui.summaryLabel.text)
