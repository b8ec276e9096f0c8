"""A 3D Slicer scene file (``.mrml``) that opens result files together, written without Slicer.

MRML is Slicer's XML scene format: one element per node, named by the node's
class without ``vtkMRML`` and ``Node`` (``Volume`` for vtkMRMLScalarVolumeNode,
``GridTransform`` for vtkMRMLGridTransformNode), with an ``id`` and attributes
that refer to other nodes by id (``storageNodeRef``, ``displayNodeRef``,
``backgroundVolumeID``: the names that Slicer 4 and 5 both read). The data stay
in their files: a volume or transform node refers to a storage node whose
``fileName``, relative to the scene file's folder, Slicer reads when it loads
the scene (drag and drop, or *File > Add Data*). IDs are local to the file;
Slicer renames them, and the attributes that refer to them, when they are
already taken in the open scene. The three slice views (singleton nodes, one
per view) can be set to show two of the volumes, one over the other.

Volumes are read by a ``VolumeArchetypeStorage`` node (NIfTI, NRRD, ...), with
their geometry from the file. A displacement field file (LPS mm, ITK
convention) is read by a ``TransformStorage`` node as a grid transform in the
resampling direction ("from parent"): it maps a fixed point to its moving point,
both in Slicer's RAS; Slicer converts between LPS and RAS itself.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from .io import atomic_path

MRML_VERSION = "Slicer4.4.0"  # the scene format version that Slicer 4.4 to 5.x write
CT_WINDOW = (1500.0, -600.0)  # HU: window width and level of the volumes (the network's CT window)
SLICE_VIEWS = ("Red", "Yellow", "Green")  # Slicer's axial, sagittal and coronal views


def _node(parent: ElementTree.Element, tag: str, node_id: str, **attributes: str) -> None:
    ElementTree.SubElement(parent, tag, {"id": node_id, **attributes})


def scene_xml(volumes: dict[str, str], transforms: dict[str, str] | None = None,
              background: str | None = None, foreground: str | None = None) -> str:
    """The MRML text of a scene of scalar volumes and displacement-field transforms.

    ``volumes`` and ``transforms`` map node names to file names relative to the
    scene file's folder. ``background`` and ``foreground`` name volumes to show
    in the three slice views, the foreground at 50 % opacity over the background.
    """
    scene = ElementTree.Element("MRML", {"version": MRML_VERSION, "userTags": ""})
    volume_ids = {}
    for n, (name, file_name) in enumerate(volumes.items(), start=1):
        volume, storage, display = (f"vtkMRMLScalarVolumeNode{n}", f"vtkMRMLVolumeArchetypeStorageNode{n}",
                                    f"vtkMRMLScalarVolumeDisplayNode{n}")
        volume_ids[name] = volume
        _node(scene, "Volume", volume, name=name, displayNodeRef=display, storageNodeRef=storage)
        _node(scene, "VolumeArchetypeStorage", storage, name=f"{name} storage", fileName=file_name)
        _node(scene, "VolumeDisplay", display, name=f"{name} display", colorNodeID="vtkMRMLColorTableNodeGrey",
              autoWindowLevel="0", window=f"{CT_WINDOW[0]:g}", level=f"{CT_WINDOW[1]:g}")
    for n, (name, file_name) in enumerate((transforms or {}).items(), start=1):
        transform, storage = f"vtkMRMLGridTransformNode{n}", f"vtkMRMLTransformStorageNode{n}"
        _node(scene, "GridTransform", transform, name=name, storageNodeRef=storage)
        _node(scene, "TransformStorage", storage, name=f"{name} storage", fileName=file_name)
    shown = {attribute: volume_ids[name] for attribute, name in (("backgroundVolumeID", background),
                                                                 ("foregroundVolumeID", foreground)) if name}
    if shown:
        for view in SLICE_VIEWS:
            _node(scene, "SliceComposite", f"vtkMRMLSliceCompositeNode{view}", singletonTag=view, layoutName=view,
                  foregroundOpacity="0.5" if foreground else "0", **shown)
    ElementTree.indent(scene)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ElementTree.tostring(scene, encoding="unicode") + "\n"


def write_scene(path: str | os.PathLike, volumes: dict[str, str], transforms: dict[str, str] | None = None,
                background: str | None = None, foreground: str | None = None) -> Path:
    """Write :func:`scene_xml` to ``path`` (atomically); file names are relative to its folder."""
    with atomic_path(path) as temporary:
        temporary.write_text(scene_xml(volumes, transforms, background, foreground), encoding="utf-8")
    return Path(path)
