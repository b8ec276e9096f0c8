"""``lungudrnet train`` in a child process (for the Slicer panel): progress from its output, Stop, Kill.

Stop asks the trainer to finish its current step and write ``last.pt`` (it
creates ``RUN_DIR/STOP``, which works on every platform and through launcher
processes); the run can then be continued with ``resume``. Kill ends the whole
process tree at once. Nothing here needs Qt: the caller polls.
"""

from __future__ import annotations

import re
from pathlib import Path

import LungUDRNetLib
from LungUDRNetLib.background import ChildProcess, python_executable
from LungUDRNetLib.errors import CancelledError

from .training import STOP_FILE

# The folders holding LungUDRNetLib and LungUDRNetTrainerLib: one in an installed extension, two in a checkout.
LIBRARY_PARENTS = list(dict.fromkeys(str(Path(module).resolve().parents[1])
                                     for module in (LungUDRNetLib.__file__, __file__)))
EPOCH_BAR = re.compile(r"epoch (\d+)/(\d+):\s*(\d+)%")
EPOCH_SUMMARY = re.compile(r"training: (epoch \d+: .*)$")
ERROR_PREFIX = "lungudrnet: error: "
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
    ``message`` (the current epoch's progress) and ``summary`` (the last finished epoch)."""

    def __init__(self, run_dir: str | Path, arguments: list[str], python: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.fraction, self.message, self.summary = 0.0, "starting the training process", ""
        self.log: list[str] = []
        self._error = ""
        launcher = LAUNCHER.format(paths=LIBRARY_PARENTS)
        self._child = ChildProcess([python or python_executable(), "-c", launcher, *arguments], cwd=Path(LIBRARY_PARENTS[0]))

    def poll(self) -> bool:
        """Read the child's new output; True once it has ended."""
        for line in self._child.new_lines():
            if match := EPOCH_BAR.search(line):
                epoch, epochs, percent = (int(v) for v in match.groups())
                self.fraction = min(1.0, (epoch - 1 + percent / 100.0) / epochs)
                self.message = f"epoch {epoch}/{epochs}: {percent}%"
                continue  # progress-bar redraws are not worth keeping
            self.log.append(line)
            if match := EPOCH_SUMMARY.search(line):
                self.summary = match[1]
            elif line.startswith(ERROR_PREFIX):
                self._error = line[len(ERROR_PREFIX):]
        ended = self.returncode is not None
        if ended:
            self.message = self.outcome()
        return ended

    @property
    def returncode(self) -> int | None:
        return self._child.returncode

    def outcome(self) -> str:
        """One line on how the ended run went."""
        code = self.returncode
        if code == 0:
            self.fraction = 1.0
            return f"finished; best model: {self.run_dir / 'best.pt'}"
        if code == CancelledError.exit_code:
            return f"stopped; {self.run_dir / 'last.pt'} written (tick Resume and Start to continue)"
        return self._error or f"failed (exit status {code}): " + " | ".join(self.log[-3:])

    def stop(self) -> None:
        """Ask the trainer to stop after its current step and write a checkpoint (kill it if it has not
        created its run folder yet: there is nothing to save)."""
        if not self.run_dir.is_dir():
            self.kill()
            return
        (self.run_dir / STOP_FILE).touch()
        self.message = "stopping after the current step..."

    def kill(self) -> None:
        """End the trainer and its children now (the last epoch's ``last.pt`` stays)."""
        self._child.kill()
