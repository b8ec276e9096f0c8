"""The LungUDRNetTrainer Slicer panel's files agree: widgets, parameter node, CMake list, choices.

The Qt panel cannot run here (no Slicer application); these checks read its sources.
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from LungUDRNetTrainerLib.config import FIELDS, PRESETS

MODULE = Path(__file__).resolve().parents[1] / "LungUDRNetTrainer"
TREE = ast.parse((MODULE / "LungUDRNetTrainer.py").read_text(encoding="utf-8"))
UI = ET.parse(MODULE / "Resources" / "UI" / "LungUDRNetTrainer.ui")
WIDGET_FOR_TYPE = {"str": "ctkPathLineEdit", "bool": "QCheckBox"}


def _parameter_fields() -> dict[str, str]:
    node_class = next(node for node in ast.walk(TREE)
                      if isinstance(node, ast.ClassDef) and node.name == "LungUDRNetTrainerParameterNode")
    return {s.target.id: ast.unparse(s.annotation) for s in node_class.body if isinstance(s, ast.AnnAssign)}


def _constant(name: str):
    assignment = next(n for n in TREE.body if isinstance(n, ast.Assign) and n.targets[0].id == name)
    return ast.literal_eval(assignment.value)


def test_the_panel_uses_only_widgets_of_its_ui_file():
    widgets = {w.get("name") for w in UI.iter("widget")}
    used = {node.attr for node in ast.walk(TREE)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"}
    assert {"startButton", "progressBar", "statusLabel", "summaryLabel"} <= used <= widgets


def test_every_parameter_has_one_widget_of_its_type():
    bound = {}
    for widget in UI.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = widget.get("class")
    fields = _parameter_fields()
    assert set(bound) == set(fields)
    for name, annotation in fields.items():
        assert bound[name] == ("QComboBox" if "Choice(" in annotation else WIDGET_FOR_TYPE[annotation]), name


def test_the_panel_choices_are_the_trainers():
    assert set(_constant("PRESETS")) == set(PRESETS)
    # every trainer model except the bench-only voxelmorph-package (its package is not a Slicer dependency)
    assert _constant("MODELS") == [m for m in FIELDS["model"].metadata["choices"] if m != "voxelmorph-package"]


def test_cmake_lists_every_python_file_and_resource():
    listed = set(re.findall(r"\$\{MODULE_NAME\}(\S+)", (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")))
    # LungUDRNetTrainer.py -> ".py", LungUDRNetTrainerLib/training.py -> "Lib/training.py" (after ${MODULE_NAME})
    files = {p.relative_to(MODULE).as_posix()[len("LungUDRNetTrainer"):] for p in MODULE.rglob("*.py")}
    assert {".py", "Lib/training.py"} <= files
    assert files <= listed, f"not in CMakeLists.txt: {sorted(files - listed)}"
    assert "Resources/UI/${MODULE_NAME}.ui" in (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")


def test_closing_the_scene_does_not_stop_a_training_run():
    """Close Scene rebinds the panel (JobPanelWidget.onSceneStartClose) but a training run does not belong
    to the scene: the trainer panel opts out of cancelling its job there."""
    widget = next(node for node in ast.walk(TREE)
                  if isinstance(node, ast.ClassDef) and node.name == "LungUDRNetTrainerWidget")
    settings = {s.targets[0].id: ast.unparse(s.value) for s in widget.body
                if isinstance(s, ast.Assign) and isinstance(s.targets[0], ast.Name)}
    assert settings["cancelOnSceneClose"] == "False"
