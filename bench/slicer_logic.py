"""Time and memory of the Slicer module's registration on a clinical-size scan, as the panel runs it.

``python -m LungUDRNetBench.slicer_logic [--size 512 512 300] [--spacing 0.7 0.7 1.0]`` makes a chest
phantom pair of that size (a known smooth breathing-like motion), puts both volumes in a real MRML scene
(slicer-core), and measures what a user of the panel waits for: from Apply (:meth:`RegistrationLogic.start`,
the inputs copied for the child process) until the warped volume and the transform node are in the scene
(:meth:`RegistrationJob.finish`). Printed as JSON: wall seconds, the parent's and the child's peak resident
memory (MB; the parent's includes the scene's two input volumes; the child's sampled every 50 ms), and the size of
the transform grid. Needs slicer-core (the test extra) and Linux (the parent's peak from ``/proc``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import numpy as np
import psutil
import slicer

from LungUDRNetLib.geometry import warp_image
from LungUDRNetLib.phantom import analytic_field, chest_phantom, make_grid
from LungUDRNetSlicerLib.logic import RegistrationLogic
from LungUDRNetSlicerLib.volumes import update_volume_from_image


def peak_rss_mb() -> float:
    """This process's own high-water mark of resident memory (Linux ``VmHWM``), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1]) / 1024.0
    raise RuntimeError("no /proc/self/status: this measurement needs Linux")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=(512, 512, 300), help="voxels (x y z)")
    parser.add_argument("--spacing", type=float, nargs=3, default=(0.7, 0.7, 1.0), help="mm (x y z)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--refine-steps", type=int, default=0, help="instance refinement steps (default: 0)")
    args = parser.parse_args()

    extent = np.asarray(args.size) * np.asarray(args.spacing)
    grid = make_grid(tuple(args.size), tuple(args.spacing), tuple(-extent / 2))
    moving = chest_phantom(grid, seed=1)
    fixed = warp_image(moving, analytic_field(grid, translation_mm=(0.0, 0.0, 6.0), amplitude_mm=4.0))
    scene = slicer.vtkMRMLScene()
    volumes = {}
    for name, image in (("fixed", fixed), ("moving", moving)):
        volumes[name] = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        update_volume_from_image(volumes[name], image)
    del fixed, moving
    before_mb = peak_rss_mb()

    started = time.perf_counter()
    job = RegistrationLogic().start(volumes["fixed"], volumes["moving"], device=args.device,
                                    refine_steps=args.refine_steps)
    child_peak = 0.0
    while not job.poll():
        for child in psutil.Process().children(recursive=True):  # sampled: its high-water mark dies with it
            with contextlib.suppress(psutil.NoSuchProcess):
                child_peak = max(child_peak, child.memory_info().rss / 2**20)
        time.sleep(0.05)
    ended_child = time.perf_counter()
    output = job.finish()
    wall = time.perf_counter() - started

    transform_grid = output.transform.GetTransformFromParent().GetDisplacementGrid()
    print(json.dumps({
        "size": list(args.size), "spacing_mm": list(args.spacing), "device": output.report["device"],
        "apply_to_nodes_s": round(wall, 2), "child_s": round(ended_child - started, 2),
        "nodes_from_results_s": round(wall - (ended_child - started), 2),
        "registration_in_child_s": output.report["runtime_s"]["total"],
        "parent_peak_rss_mb_before_apply": round(before_mb), "parent_peak_rss_mb": round(peak_rss_mb()),
        "child_peak_rss_mb_sampled": round(child_peak),
        "transform_grid": list(transform_grid.GetDimensions()),
        "transform_mb": round(transform_grid.GetNumberOfPoints() * 3 * 4 / 2**20, 1),
        "summary": output.summary(),
    }, indent=2))


if __name__ == "__main__":
    main()
