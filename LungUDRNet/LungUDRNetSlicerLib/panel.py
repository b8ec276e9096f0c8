"""What both panels of the extension share (Slicer application only: Qt, the module widget base class).

A panel binds its ``.ui`` to its module's parameter node, re-binds it after
Close Scene and on every enter, runs one child-process job at a time and
polls it with a timer. Its behaviour otherwise lives in the testable logic.
"""

from __future__ import annotations

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from .dependencies import TORCH_REQUIREMENT, unmet

POLL_INTERVAL_MS = 200


class JobPanelWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """A module panel bound to a parameter node, with one background job (``_job``) polled by a timer.

    Subclasses set ``self.logic`` in ``setupLogic``, connect their buttons in
    ``setupButtons``, and implement ``_updateButtons`` (called on every
    parameter change), ``_onPoll`` (while a job runs), ``_cancelJob`` and
    ``_initializeParameters`` (defaults such as the first volume of the scene).
    """

    uiFile = ""
    pollIntervalMs = POLL_INTERVAL_MS
    cancelOnSceneClose = True  # a registration belongs to the scene's volumes; a training run does not

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._pollTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath(f"UI/{self.uiFile}"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        if hasattr(uiWidget, "setMRMLScene"):  # a qMRMLWidget passes the scene on to its node selectors
            uiWidget.setMRMLScene(slicer.mrmlScene)
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(self.pollIntervalMs)
        self._pollTimer.connect("timeout()", self._onPoll)
        self.setupLogic()
        self.setupButtons()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._cancelJob()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        if self.cancelOnSceneClose:
            self._cancelJob()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Bind the panel to the module's parameter node of the current scene (a new one after Close Scene)."""
        self.setParameterNode(self.logic.getParameterNode())
        self._initializeParameters(self._parameterNode)

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode, self._parameterNodeGuiTag = parameterNode, None
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()

    def startPolling(self, job) -> None:
        self._job = job
        self.ui.progressBar.value = 0
        self._pollTimer.start()
        self._updateButtons()

    def stopPolling(self):
        """Stop the timer and forget the job; returns it."""
        job, self._job = self._job, None
        self._pollTimer.stop()
        self._updateButtons()
        return job

    # -- to implement --------------------------------------------------------------------------------

    def setupLogic(self) -> None:
        raise NotImplementedError

    def setupButtons(self) -> None:
        raise NotImplementedError

    def _initializeParameters(self, parameterNode) -> None:
        pass

    def _updateButtons(self, caller=None, event=None) -> None:
        raise NotImplementedError

    def _onPoll(self) -> None:
        raise NotImplementedError

    def _cancelJob(self) -> None:
        raise NotImplementedError


def ensureRequirements(requirements: list[str]) -> bool:
    """True when torch and ``requirements`` are installed at suitable versions; otherwise offer to install
    them (PyTorch through the PyTorch extension, the rest with pip, with a progress dialog) and return
    whether that worked. Never installs in testing mode: there it says what is missing and returns False."""
    problems = unmet([TORCH_REQUIREMENT, *requirements])
    if not problems:
        return True
    if slicer.app.testingEnabled():
        slicer.util.errorDisplay(_("Not installed (tests never install packages): {packages}").format(
            packages=", ".join(problems)))
        return False
    torchProblems = [problem for problem in problems if problem.startswith("torch")]
    others = [problem.split(" ")[0] for problem in problems if not problem.startswith("torch")]
    if torchProblems and not installTorch(torchProblems[0]):
        return False
    if others and not slicer.util.confirmOkCancelDisplay(
            _("LungUDRNet needs these Python packages: {packages}. Download and install them now?").format(
                packages=", ".join(others)), windowTitle=_("Install Python packages")):
        return False
    progress = slicer.util.createProgressDialog(labelText=_("Installing Python packages..."), maximum=len(others))
    try:
        for index, requirement in enumerate(others):
            progress.labelText = _("Installing {package} ({index} of {count})...").format(
                package=requirement, index=index + 1, count=len(others))
            progress.value = index
            slicer.app.processEvents()
            slicer.util.pip_install(requirement)
    finally:
        progress.close()
    return not unmet(requirements)


def installTorch(problem: str) -> bool:
    """Install or upgrade PyTorch with the PyTorch extension (it picks the CUDA build), after asking."""
    try:
        import PyTorchUtils
    except ModuleNotFoundError:
        slicer.util.errorDisplay(_("LungUDRNet needs PyTorch ({problem}): install the 'PyTorch' extension from the "
                                   "Extensions Manager, restart Slicer and try again.").format(problem=problem))
        return False
    upgrade = "found" in problem
    question = (_("LungUDRNet needs {problem}. Upgrade PyTorch now? Restart Slicer afterwards.") if upgrade else
                _("LungUDRNet needs PyTorch, which is not installed yet. Download and install it now? "
                  "This may take several minutes."))
    if not slicer.util.confirmOkCancelDisplay(question.format(problem=problem), windowTitle=_("Install PyTorch")):
        return False
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    requirement = TORCH_REQUIREMENT.removeprefix("torch")
    with slicer.util.tryWithErrorDisplay(_("PyTorch could not be installed."), waitCursor=True):
        return torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=requirement) is not None
    return False
