"""``lungudrnet train`` in a child process (for the Slicer panel), followed through its event channel.

Stop asks the trainer to finish its current step and write ``last.pt`` (it
creates ``RUN_DIR/STOP``, which works on every platform and through launcher
processes); the run can then be continued with ``resume``. Kill ends the whole
process tree at once. Nothing here needs Qt: the caller polls.
"""

from __future__ import annotations

from pathlib import Path

import LungUDRNetLib
from LungUDRNetLib.child_job import ChildJob
from LungUDRNetLib.errors import CancelledError

from .training import STOP_FILE

# The folders holding LungUDRNetLib and LungUDRNetTrainerLib: one in an installed extension, two in a checkout.
LIBRARY_PARENTS = list(dict.fromkeys(str(Path(module).resolve().parents[1])
                                     for module in (LungUDRNetLib.__file__, __file__)))
LAUNCHER = ("import sys; sys.path[:0] = {paths!r}; from LungUDRNetLib.cli import main; "
            "from LungUDRNetTrainerLib.commands import add_parsers; sys.exit(main(extra_commands=[add_parsers]))")


def train_arguments(run_dir: str | Path, data: str | Path | None = None, preset: str = "paper",
                    model: str = "udrnet", device: str = "auto", resume: bool = False,
                    extra: list[str] | None = None) -> list[str]:
    """The ``lungudrnet train`` arguments for a new run (``data`` needed) or for ``resume``."""
    if resume:
        return ["train", "--resume", str(run_dir), "--device", device, *(extra or [])]
    return ["train", "--data", str(data), "--out", str(run_dir), "--preset", preset, "--model", model,
            "--device", device, *(extra or [])]


class TrainingProcess:
    """A training run in a child process. After :meth:`poll`: ``fraction`` (0-1 over all epochs),
    ``message`` (the current epoch's progress, then the outcome), ``summary`` (the last finished epoch)
    and ``stopping`` (Stop was asked for; a second request kills)."""

    def __init__(self, run_dir: str | Path, arguments: list[str], python: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.stopping = False
        self._outcome = ""
        launcher = LAUNCHER.format(paths=LIBRARY_PARENTS)
        self._job = ChildJob(["-c", launcher, "--progress-json", *arguments], cwd=Path(LIBRARY_PARENTS[0]),
                             python=python, message="starting the training process")

    @property
    def fraction(self) -> float:
        return self._job.fraction

    @property
    def message(self) -> str:
        if self._outcome:
            return self._outcome
        return "stopping after the current step..." if self.stopping else self._job.message

    @property
    def summary(self) -> str:
        return self._job.summary

    @property
    def log(self) -> list[str]:
        return self._job.log

    @property
    def returncode(self) -> int | None:
        return self._job.returncode

    def poll(self) -> bool:
        """Take in the child's new events; True once it has ended."""
        ended = self._job.poll()
        if ended and not self._outcome:
            self._outcome = self._describe_outcome()
        return ended

    def _describe_outcome(self) -> str:
        """One line on how the ended run went."""
        code = self.returncode
        if code == 0:
            self._job.fraction = 1.0
            return f"finished; best model: {self.run_dir / 'best.pt'}"
        if code == CancelledError.exit_code:
            return f"stopped; {self.run_dir / 'last.pt'} written (tick Resume and Start to continue)"
        return self._job.failure_message("the training process")

    def stop(self) -> None:
        """Ask the trainer to stop after its current step and write a checkpoint (kill it if it has not
        created its run folder yet: there is nothing to save)."""
        if not self.run_dir.is_dir():
            self.kill()
            return
        (self.run_dir / STOP_FILE).touch()
        self.stopping = True

    def kill(self) -> None:
        """End the trainer and its children now (the last epoch's ``last.pt`` stays)."""
        self._job.kill()
