"""Time and memory of the Slicer module's registration on a clinical-size scan, as the panel runs it.

``python -m LungUDRNetBench.slicer_logic [--size 512 512 300] [--spacing 0.7 0.7 1.0]`` makes a chest
phantom pair of that size (int16, a known smooth breathing-like motion; written once, by a child process, to
``--data``), reads both volumes into a real MRML scene
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
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import SimpleITK as sitk
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


def make_pair(folder: Path, size: tuple[int, int, int], spacing: tuple[float, float, float]) -> dict[str, Path]:
    """Write a chest phantom pair (int16 HU, a known smooth motion) of that size to ``folder``, once."""
    paths = {name: folder / f"{name}_{'x'.join(map(str, size))}.nrrd" for name in ("fixed", "moving")}
    if all(path.is_file() for path in paths.values()):
        return paths
    extent = np.asarray(size) * np.asarray(spacing)
    grid = make_grid(size, spacing, tuple(-extent / 2))
    moving = chest_phantom(grid, seed=1)
    fixed = warp_image(moving, analytic_field(grid, translation_mm=(0.0, 0.0, 6.0), amplitude_mm=4.0))
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in (("fixed", fixed), ("moving", moving)):
        sitk.WriteImage(sitk.Cast(image, sitk.sitkInt16), str(paths[name]))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=(512, 512, 300), help="voxels (x y z)")
    parser.add_argument("--spacing", type=float, nargs=3, default=(0.7, 0.7, 1.0), help="mm (x y z)")
    parser.add_argument("--data", default="bench_results/slicer_pair", help="folder for the generated pair")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--fast", action="store_true", help="the network only, without instance optimisation")
    parser.add_argument("--make-pair", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_pair:  # in a child process, so that making the pair does not count in the peak memory
        make_pair(Path(args.data), tuple(args.size), tuple(args.spacing))
        return
    subprocess.run([sys.executable, "-m", "LungUDRNetBench.slicer_logic", "--make-pair", *sys.argv[1:]], check=True)
    paths = make_pair(Path(args.data), tuple(args.size), tuple(args.spacing))

    scene = slicer.vtkMRMLScene()
    volumes = {}
    for name, path in paths.items():
        volumes[name] = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        update_volume_from_image(volumes[name], sitk.ReadImage(str(path)))
    before_mb = peak_rss_mb()

    started = time.perf_counter()
    job = RegistrationLogic().start(volumes["fixed"], volumes["moving"], device=args.device, fast=args.fast)
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
