"""The Slicer module's files agree with each other: widgets, parameters, CMake lists, extension description.

The Qt panel cannot run here (no Slicer application), so what can go wrong in
it without running it is checked from the sources: names used in
``LungUDRNet.py`` against the ``.ui`` file, the parameter node against the
widgets bound to it, and the packaging files against the repository.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import struct
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from LungUDRNetSlicerLib.dependencies import (REGISTRATION_REQUIREMENTS, TORCH_REQUIREMENT, TRAINING_REQUIREMENTS,
                                              unmet)

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "LungUDRNet"
MODULE_FILE = MODULE / "LungUDRNet.py"
PANEL_FILE = MODULE / "LungUDRNetSlicerLib" / "panel.py"
TRAINER_FILE = ROOT / "LungUDRNetTrainer" / "LungUDRNetTrainer.py"
UI_FILE = MODULE / "Resources" / "UI" / "LungUDRNet.ui"
CATALOG_PROPERTIES = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                      "dicom_support_rule", "build_subdirectory", "enabled", "tier"}  # catalog entry schema v1.0.2


def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def ui_widgets() -> dict[str, ET.Element]:
    return {widget.get("name"): widget for widget in ET.parse(UI_FILE).iter("widget")}


def parameter_name(widget: ET.Element) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == "SlicerParameterName":
            return prop.findtext("string")
    return None


def parameter_fields(path: Path = MODULE_FILE, class_name: str = "LungUDRNetParameterNode") -> dict[str, str]:
    """Fields of a module's parameter node class -> their annotations (source text)."""
    node_class = next(node for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                      if isinstance(node, ast.ClassDef) and node.name == class_name)
    return {statement.target.id: ast.unparse(statement.annotation)
            for statement in node_class.body if isinstance(statement, ast.AnnAssign)}


def widget_class_for(annotation: str) -> str:
    """The widget class that Slicer's parameterNodeWrapper binds to a parameter of this type."""
    if "vtkMRML" in annotation:
        return "qMRMLNodeComboBox"
    if "Choice(" in annotation:
        return "QComboBox"
    if "WithinRange(" in annotation:
        return "QSpinBox"
    return {"bool": "QCheckBox", "int": "QSpinBox", "str": "ctkPathLineEdit"}[annotation]


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


def calls_by_function(tree: ast.Module) -> dict[str, set[str]]:
    """Called name -> the functions of ``tree`` that call it."""
    callers: dict[str, set[str]] = {}
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef):
            for call in ast.walk(function):
                if isinstance(call, ast.Call):
                    name = call.func.attr if isinstance(call.func, ast.Attribute) else getattr(call.func, "id", "")
                    callers.setdefault(name, set()).add(function.name)
    return callers


def test_packages_are_installed_only_after_apply_or_start():
    """torch and pip packages are installed by ensureRequirements, called from Apply or Start only (never at
    import, never from a self-test)."""
    panel = calls_by_function(ast.parse(PANEL_FILE.read_text(encoding="utf-8")))
    assert panel["pip_install"] == {"ensureRequirements"}
    assert panel["installTorch"] == {"ensureRequirements", "installTorch"}  # the method of PyTorchUtilsLogic
    assert calls_by_function(module_tree())["ensureRequirements"] == {"onApplyButton"}
    assert calls_by_function(ast.parse(TRAINER_FILE.read_text(encoding="utf-8")))["ensureRequirements"] == {"onStartButton"}
    for tree in (module_tree(), ast.parse(PANEL_FILE.read_text(encoding="utf-8"))):
        top_level_calls = [node for statement in tree.body
                           if not isinstance(statement, (ast.FunctionDef, ast.ClassDef))
                           for node in ast.walk(statement) if isinstance(node, ast.Call)]
        assert not top_level_calls


def test_registration_needs_only_what_its_child_process_imports():
    """The packages the panel installs for registration are core dependencies (same bounds as pyproject.toml),
    not what only the trainer and the demo use; torch comes from the PyTorch extension."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    assert set(REGISTRATION_REQUIREMENTS) <= set(dependencies)
    assert set(TRAINING_REQUIREMENTS) <= set(dependencies)
    assert TORCH_REQUIREMENT in dependencies
    names = {requirement.split(">")[0] for requirement in REGISTRATION_REQUIREMENTS}
    assert not names & {"matplotlib", "tqdm", "pyyaml"}


def test_every_node_parameter_may_be_empty():
    """Slicer's parameterNodeWrapper writes None as the default of a node parameter: a Union of node types
    without None fails in getParameterNode() ("Unable to write value 'None'") and leaves the panel unbound."""
    for path, class_name in ((MODULE_FILE, "LungUDRNetParameterNode"),
                             (TRAINER_FILE, "LungUDRNetTrainerParameterNode")):
        for name, annotation in parameter_fields(path, class_name).items():
            if "vtkMRML" in annotation:
                assert annotation.startswith("Optional[") or annotation.endswith(", None]"), (class_name, name)
            if annotation.startswith(("int", "Annotated[int")):
                assert "WithinRange(" in annotation, (class_name, name, "an int without a range accepts -5")


def test_self_tests_skip_before_anything_else_when_requirements_are_missing():
    for path, requirements in ((MODULE_FILE, "REGISTRATION_REQUIREMENTS"), (TRAINER_FILE, "TRAINING_REQUIREMENTS")):
        run_test = next(node for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                        if isinstance(node, ast.FunctionDef) and node.name == "runTest")
        assert ast.unparse(run_test.body[0]) == f"skipReason = self_test_skip_reason({requirements})", path.name
        assert ast.unparse(run_test.body[1].test) == "skipReason"
        assert isinstance(run_test.body[1].body[-1], ast.Return)


SKIP_CHECK = """
from LungUDRNetSlicerLib.dependencies import REGISTRATION_REQUIREMENTS, self_test_skip_reason
print(self_test_skip_reason(REGISTRATION_REQUIREMENTS))
"""


@pytest.mark.parametrize("blocked", [False, True])
def test_the_skip_reason_names_torch_when_it_cannot_be_imported(blocked):
    code = ("import sys; sys.modules['torch'] = None\n" if blocked else "") + SKIP_CHECK
    reason = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    if blocked:
        assert reason.startswith("self-test skipped: not installed: torch") and "never install" in reason
    else:
        assert reason == "None"


def test_unmet_requirements_name_the_version_found():
    numpy_version = importlib.metadata.version("numpy")
    assert unmet([f"numpy>={numpy_version}"]) == []
    assert unmet(["numpy<1.0"]) == [f"numpy<1.0 (found {numpy_version})"]
    assert unmet(["surely-not-installed-package>=1"]) == ["surely-not-installed-package>=1"]


def test_the_contributors_name_their_organisation():
    for path in (MODULE_FILE, TRAINER_FILE):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        contributors = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                            and getattr(node.targets[0], "id", "") == "CONTRIBUTORS")
        assert contributors and all(re.fullmatch(r"[^()]+ \([^()]+\)", name) for name in contributors), contributors


def test_the_panel_and_readme_carry_the_research_use_disclaimer():
    assert ui_widgets()["disclaimerLabel"].find("property/string").text.startswith("For research use only")
    assert "for research use only" in (ROOT / "README.md").read_text(encoding="utf-8").lower()


def test_module_metadata():
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert 'translate("qSlicerAbstractCoreModule", "Registration")' in source
    assert "https://github.com/LungUDRNet/SlicerLungUDRNet#use-in-3d-slicer" in source
    assert "Unsupervised deformable registration of lung CT images with a" in source
    assert "class LungUDRNetTest(ScriptedLoadableModuleTest)" in source


def top_level_imports(path: Path) -> set[str]:
    """The top-level packages a file imports at module level (relative imports excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
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
        source = path.read_text(encoding="utf-8")
        for forbidden in ("slicer", "vtk", "qt", "LungUDRNetTrainerLib", "LungUDRNetBench", "LungUDRNetSlicerLib"):
            assert not re.search(rf"^\s*(import|from) {forbidden}\b", source, re.MULTILINE), (path.name, forbidden)


def test_the_module_logic_imports_without_torch():
    code = "import sys, LungUDRNetSlicerLib.logic; sys.exit(int('torch' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def cmake_list(text: str, variable: str) -> set[str]:
    body = re.search(rf"set\({variable}\s(.*?)\)", text, re.DOTALL)[1]
    return {item.replace("${MODULE_NAME}", "LungUDRNet") for item in body.split()}


def test_cmake_lists_every_python_file_and_resource():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    python_files = {MODULE_FILE, *(MODULE / "LungUDRNetLib").rglob("*.py"), *(MODULE / "LungUDRNetSlicerLib").rglob("*.py")}
    resources = {path for path in (MODULE / "Resources").rglob("*") if path.is_file()}
    assert cmake_list(text, "MODULE_PYTHON_SCRIPTS") == {p.relative_to(MODULE).as_posix() for p in python_files}
    assert cmake_list(text, "MODULE_PYTHON_RESOURCES") == {p.relative_to(MODULE).as_posix() for p in resources}
    assert "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    assert re.search(r"add_subdirectory\(LungUDRNet\)", (ROOT / "CMakeLists.txt").read_text(encoding="utf-8"))


def test_extension_index_description():
    entry = json.loads((ROOT / "LungUDRNet.json").read_text(encoding="utf-8"))
    assert set(entry) <= CATALOG_PROPERTIES and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["category"] == "Registration"
    assert entry["build_dependencies"] == ["PyTorch"]
    extension = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    homepage = re.search(r'EXTENSION_HOMEPAGE "([^"#]+)', extension)[1]
    assert entry["scm_url"].removesuffix(".git") == homepage
    assert re.search(r'EXTENSION_CATEGORY "Registration"', extension)
    assert re.search(r'EXTENSION_DEPENDS "PyTorch"', extension)


def test_icon_is_a_128_pixel_png():
    data = (MODULE / "Resources" / "Icons" / "LungUDRNet.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_the_panel_help_and_readme_quote_one_speed_figure():
    """The trade-off of the Fast option, measured once: the same sentence in the panel's tooltip, in
    ``register --help`` and in the README."""
    from LungUDRNetLib.cli import SPEED_NOTE

    tooltip = ui_widgets()["fastCheckBox"].find("property[@name='toolTip']/string").text
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert re.search(r"bench of \d{4}-\d{2}-\d{2}", SPEED_NOTE)
    assert SPEED_NOTE in tooltip
    assert SPEED_NOTE in readme
