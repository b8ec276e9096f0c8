"""The Slicer module's files agree with each other: widgets, parameters, CMake lists, extension description.

The Qt panel cannot run here (no Slicer application), so what can go wrong in
it without running it is checked from the sources: names used in
``LungUDRNet.py`` against the ``.ui`` file, the parameter node against the
widgets bound to it, and the packaging files against the repository.
"""

from __future__ import annotations

import ast
import json
import re
import struct
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "LungUDRNet"
MODULE_FILE = MODULE / "LungUDRNet.py"
UI_FILE = MODULE / "Resources" / "UI" / "LungUDRNet.ui"
CATALOG_PROPERTIES = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                      "dicom_support_rule", "build_subdirectory", "enabled", "tier"}  # catalog entry schema v1.0.2


def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text())


def ui_widgets() -> dict[str, ET.Element]:
    return {widget.get("name"): widget for widget in ET.parse(UI_FILE).iter("widget")}


def parameter_name(widget: ET.Element) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == "SlicerParameterName":
            return prop.findtext("string")
    return None


def parameter_fields() -> dict[str, str]:
    """Fields of the module's parameter node class -> their annotations (source text)."""
    node_class = next(node for node in ast.walk(module_tree())
                      if isinstance(node, ast.ClassDef) and node.name == "LungUDRNetParameterNode")
    return {statement.target.id: ast.unparse(statement.annotation)
            for statement in node_class.body if isinstance(statement, ast.AnnAssign)}


def widget_class_for(annotation: str) -> str:
    """The widget class that Slicer's parameterNodeWrapper binds to a parameter of this type."""
    if "vtkMRML" in annotation:
        return "qMRMLNodeComboBox"
    if "Choice(" in annotation:
        return "QComboBox"
    return {"bool": "QCheckBox", "int": "QSpinBox", "pathlib.Path": "ctkPathLineEdit"}[annotation]


def test_every_widget_the_module_uses_is_in_the_ui_file():
    used = {node.attr for node in ast.walk(module_tree())
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"}
    assert {"applyButton", "progressBar", "statusLabel", "trackButton"} <= used
    assert used <= set(ui_widgets()), f"not in {UI_FILE.name}: {sorted(used - set(ui_widgets()))}"


def test_every_parameter_widget_maps_to_a_parameter_node_field_of_its_type():
    fields = parameter_fields()
    bound = {parameter_name(widget): widget.get("class") for widget in ui_widgets().values() if parameter_name(widget)}
    assert set(bound) == set(fields), f"widgets without field: {set(bound) - set(fields)}, " \
                                      f"fields without widget: {set(fields) - set(bound)}"
    for name, widget_class in bound.items():
        assert widget_class == widget_class_for(fields[name]), (name, widget_class, fields[name])


def test_every_mrml_widget_gets_the_scene():
    receivers = {connection.findtext("receiver") for connection in ET.parse(UI_FILE).iter("connection")
                 if connection.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    mrml_widgets = {name for name, widget in ui_widgets().items()
                    if widget.get("class") in ("qMRMLNodeComboBox", "qMRMLTableView")}
    assert receivers == mrml_widgets


def test_packages_are_installed_only_after_apply():
    """torch and pip packages are installed by ensureDependencies, called from Apply only (never at import)."""
    tree = module_tree()
    callers: dict[str, set[str]] = {}
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef):
            for call in ast.walk(function):
                if isinstance(call, ast.Call):
                    name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
                    callers.setdefault(name, set()).add(function.name)
    assert callers["pip_install"] == {"ensureDependencies"}
    assert callers["installTorch"] == {"ensureDependencies", "installTorch"}  # the method of PyTorchUtilsLogic
    assert callers["ensureDependencies"] == {"onApplyButton"}
    top_level_calls = [node for statement in tree.body if not isinstance(statement, (ast.FunctionDef, ast.ClassDef))
                       for node in ast.walk(statement) if isinstance(node, ast.Call)]
    assert not top_level_calls


def module_constant(name: str):
    """The value of a constant assigned at the top level of ``LungUDRNet.py``."""
    assignment = next(node for node in module_tree().body
                      if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == name)
    return ast.literal_eval(assignment.value)


def test_the_panel_installs_the_core_requirements():
    """The packages installed on Apply are the core's dependencies, less those that Slicer provides
    and those only older Pythons than Slicer's need (an environment marker)."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    provided_by_slicer = ("torch", "numpy", "SimpleITK")
    assert set(module_constant("REQUIREMENTS").values()) == {
        requirement for requirement in dependencies
        if not requirement.startswith(provided_by_slicer) and ";" not in requirement}
    assert "torch" + module_constant("TORCH_REQUIREMENT") in dependencies


def test_module_metadata():
    source = MODULE_FILE.read_text()
    assert 'translate("qSlicerAbstractCoreModule", "Registration")' in source
    assert "https://github.com/LungUDRNet/SlicerLungUDRNet#use-in-3d-slicer" in source
    assert "Unsupervised deformable registration of lung CT images with a" in source
    assert "class LungUDRNetTest(ScriptedLoadableModuleTest)" in source


def top_level_imports(path: Path) -> set[str]:
    """The top-level packages a file imports at module level (relative imports excluded)."""
    tree = ast.parse(path.read_text())
    imported = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    return imported | {node.module.split(".")[0] for node in tree.body
                       if isinstance(node, ast.ImportFrom) and node.level == 0}


def test_slicer_logic_imports_only_mrml_vtk_numpy_and_the_core():
    standard = {"__future__", "contextlib", "dataclasses", "functools", "logging", "pathlib", "typing"}
    for name in ("logic", "volumes", "lesions"):
        imported = top_level_imports(MODULE / "LungUDRNetSlicerLib" / f"{name}.py") - standard
        assert imported <= {"numpy", "SimpleITK", "slicer", "vtk", "LungUDRNetLib"}, (name, imported)


def test_the_core_imports_no_slicer_no_trainer_no_bench():
    for path in (MODULE / "LungUDRNetLib").rglob("*.py"):
        source = path.read_text()
        for forbidden in ("slicer", "vtk", "qt", "LungUDRNetTrainerLib", "LungUDRNetBench", "LungUDRNetSlicerLib"):
            assert not re.search(rf"^\s*(import|from) {forbidden}\b", source, re.MULTILINE), (path.name, forbidden)


def test_the_module_logic_imports_without_torch():
    code = "import sys, LungUDRNetSlicerLib.logic; sys.exit(int('torch' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def cmake_list(text: str, variable: str) -> set[str]:
    body = re.search(rf"set\({variable}\s(.*?)\)", text, re.DOTALL)[1]
    return {item.replace("${MODULE_NAME}", "LungUDRNet") for item in body.split()}


def test_cmake_lists_every_python_file_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text()
    python_files = {MODULE_FILE, *(MODULE / "LungUDRNetLib").rglob("*.py"), *(MODULE / "LungUDRNetSlicerLib").rglob("*.py")}
    resources = {path for path in (MODULE / "Resources").rglob("*") if path.is_file()}
    assert cmake_list(text, "MODULE_PYTHON_SCRIPTS") == {p.relative_to(MODULE).as_posix() for p in python_files}
    assert cmake_list(text, "MODULE_PYTHON_RESOURCES") == {p.relative_to(MODULE).as_posix() for p in resources}
    assert "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert re.search(r"add_subdirectory\(LungUDRNet\)", (ROOT / "CMakeLists.txt").read_text())


def test_extension_index_description():
    entry = json.loads((ROOT / "LungUDRNet.json").read_text())
    assert set(entry) <= CATALOG_PROPERTIES and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["category"] == "Registration"
    assert entry["build_dependencies"] == ["PyTorch"]
    extension = (ROOT / "CMakeLists.txt").read_text()
    homepage = re.search(r'EXTENSION_HOMEPAGE "([^"#]+)', extension)[1]
    assert entry["scm_url"].removesuffix(".git") == homepage
    assert re.search(r'EXTENSION_CATEGORY "Registration"', extension)
    assert re.search(r'EXTENSION_DEPENDS "PyTorch"', extension)


def test_icon_is_a_128_pixel_png():
    data = (MODULE / "Resources" / "Icons" / "LungUDRNet.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
