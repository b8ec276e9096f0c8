"""Run one method on one pair in a child process: wall time and peak memory, crash-proof.

The parent (:func:`run_job`) starts ``python -m LungUDRNetBench.runner JOB.json``
with the thread count in the environment. The child times the full pipeline of
a user — read the pair from disk, register, warp the moving image, write the
warped image and the field — once as a warm-up and then ``repeats`` times,
and records its own peak resident memory. The first run also gives the
whole-process time a user of a command waits for: from the parent starting
the child (interpreter start, imports, model loading) to its files written. A method slower than ``slow_s`` per
run is timed by fewer runs: a warm-up that takes longer is timed itself, and
timed runs stop once they add up to more than ``slow_s`` (the count is
reported). A crash (segmentation fault, exception, timeout) becomes a result
with an ``error``, never the bench's end.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")

log = logging.getLogger(__name__)
# The rows that are the ``lungudrnet register`` command itself, with the options that make them so.
COMMANDS = {"udrnet-pipeline": (), "udrnet-fast": ("--fast",)}


@dataclass
class Job:
    """What one child runs. ``options`` are the fields of :class:`.peers.Options`."""

    method: str
    pair: str  # pair folder (see :mod:`.data`)
    out: str  # folder for warped.mha, field.mha and result.json
    threads: int = 2
    repeats: int = 3
    warmup: int = 1
    options: dict = field(default_factory=dict)
    slow_s: float = float("inf")
    launched_at: float = 0.0  # time.time() when the parent started the child


@dataclass
class RunResult:
    """Timings (s) of the timed runs, their median, the median of the method alone (no I/O, no
    warp), the whole process up to the first run's files (s), the child's peak RSS (MB) and, for the
    :data:`COMMANDS` rows, the ``lungudrnet register`` command's own process (s; :func:`time_command`)."""

    method: str
    pair: str
    times_s: list[float] = field(default_factory=list)
    median_s: float = float("nan")
    method_median_s: float = float("nan")
    process_s: float = float("nan")
    peak_rss_mb: float = float("nan")
    command_s: float = float("nan")
    error: str | None = None


def _pipeline(job: Job) -> float:
    """Read, register, warp (unless the method did), write: one user-visible registration. The warped scan
    keeps the moving scan's pixel type (an int16 CT stays int16, as ``lungudrnet register`` writes it).
    Returns the seconds spent in the method alone (without reading and writing; without warping unless the
    method warps itself)."""
    import SimpleITK as sitk

    from LungUDRNetLib.geometry import field_to_transform
    from LungUDRNetLib.io import read_image, write_displacement_field, write_image
    from LungUDRNetLib.registration import warp_ct
    from .peers import METHODS, Options, Registered

    folder, out = Path(job.pair), Path(job.out)
    fixed, moving = read_image(folder / "fixed.mha", "fixed"), read_image(folder / "moving.mha", "moving")
    started = time.perf_counter()
    result = METHODS[job.method](fixed, moving, Options(**job.options))
    method_s = time.perf_counter() - started
    if isinstance(result, Registered):
        displacement, warped = result.displacement, result.warped
    else:
        displacement = result
        warped, _ = warp_ct(moving, fixed, field_to_transform(displacement))
    write_image(warped, out / "warped.mha")
    write_displacement_field(sitk.Cast(displacement, sitk.sitkVectorFloat32), out / "field.mha")
    return method_s


def peak_rss_mb() -> float:
    """Peak resident memory of this process (MB). On Linux the high-water mark of the process's own
    memory (``VmHWM``): ``ru_maxrss`` would also count the parent's memory the child was spawned from."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0  # kB
    if sys.platform == "win32":
        import psutil
        return psutil.Process().memory_info().peak_wset / 2**20
    import resource  # POSIX only
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0  # bytes on macOS, kB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def child_main(job_path: str) -> None:
    """Entry point of the child process: run the job, write ``result.json`` next to the outputs."""
    from .peers import set_threads

    job = Job(**json.loads(Path(job_path).read_text()))
    set_threads(job.threads)
    Path(job.out).mkdir(parents=True, exist_ok=True)
    times, method_times, process_s = [], [], float("nan")
    for run in itertools.count():
        started = time.perf_counter()
        method_s = _pipeline(job)
        elapsed = time.perf_counter() - started
        if run == 0:
            process_s = time.time() - job.launched_at
        if run >= job.warmup or elapsed > job.slow_s:
            times.append(elapsed)
            method_times.append(method_s)
        if len(times) >= job.repeats or sum(times) > job.slow_s:
            break
    peak_mb = peak_rss_mb()
    result = RunResult(job.method, Path(job.pair).name, times, statistics.median(times),
                       statistics.median(method_times), process_s, peak_mb)
    (Path(job.out) / "result.json").write_text(json.dumps(asdict(result)))


def _run_child(argv: list[str], threads: int, timeout_s: float | None) -> subprocess.CompletedProcess:
    """``argv`` in a child process with ``threads`` threads per library, its output captured as text
    (``subprocess.TimeoutExpired`` after ``timeout_s``)."""
    return subprocess.run(argv, env={**os.environ, **{name: str(threads) for name in THREAD_VARIABLES}},
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=timeout_s)


def time_command(job: Job, timeout_s: float | None = None) -> float:
    """Seconds a user waits for ``lungudrnet register`` on the job's pair (a :data:`COMMANDS` row, with its
    options and the job's weights and threads, on the CPU as the harness runs it): a new process from its start
    to its exit, its files written (warped scan, field on its native grid, metrics.json). NaN for other
    methods, or when the command fails (a warning gives its last line)."""
    if job.method not in COMMANDS:
        return float("nan")
    pair, out = Path(job.pair), Path(job.out) / "command"
    model = ("--model", job.options["weights"]) if job.options.get("weights") else ()
    argv = [sys.executable, "-m", "LungUDRNetLib.cli", "--quiet", "register", "--fixed", str(pair / "fixed.mha"),
            "--moving", str(pair / "moving.mha"), "--out", str(out), "--overwrite", "--device", "cpu", *model,
            *COMMANDS[job.method]]
    started = time.perf_counter()
    try:
        completed = _run_child(argv, job.threads, timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("%s on %s: the register command timed out after %g s", job.method, pair.name, timeout_s)
        return float("nan")
    if completed.returncode != 0:
        log.warning("%s on %s: the register command %s", job.method, pair.name,
                    _describe_failure(completed.returncode, completed.stderr))
        return float("nan")
    return time.perf_counter() - started


def _describe_failure(returncode: int, stderr: str) -> str:
    if returncode < 0:
        return f"crashed: {signal.Signals(-returncode).name}"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return f"failed: {lines[-1][:300] if lines else f'exit status {returncode}'}"


def run_job(job: Job, timeout_s: float | None = None) -> RunResult:
    """Run ``job`` in a fresh child process; a crash, error or timeout is returned as ``error``."""
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").unlink(missing_ok=True)
    job_path = out / "job.json"
    job.launched_at = time.time()
    job_path.write_text(json.dumps(asdict(job)))
    try:
        completed = _run_child([sys.executable, "-m", "LungUDRNetBench.runner", str(job_path)], job.threads,
                               timeout_s)
    except subprocess.TimeoutExpired:
        return RunResult(job.method, Path(job.pair).name, error=f"timed out after {timeout_s:g} s")
    if completed.returncode != 0 or not (out / "result.json").is_file():
        return RunResult(job.method, Path(job.pair).name,
                         error=_describe_failure(completed.returncode, completed.stderr))
    return RunResult(**json.loads((out / "result.json").read_text()))


if __name__ == "__main__":
    child_main(sys.argv[1])
