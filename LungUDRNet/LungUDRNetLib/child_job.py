"""A ``lungudrnet --progress-json`` command in a child process, followed through its event channel.

The child's standard output carries the events of :mod:`.progress_events`;
its standard error (log, progress bars) is kept as ``log`` for error reports.
Two reader threads collect both; the caller polls (from a GUI timer or a loop),
so nothing here needs Qt. :meth:`ChildJob.kill` ends the child and every
process it started.
"""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

import psutil

from .progress_events import parse_event

LIBRARY_PARENT = Path(__file__).resolve().parent.parent  # the folder that holds LungUDRNetLib


class ChildJob:
    """A child process and what its event channel said so far (updated by :meth:`poll`).

    ``fraction`` (0-1), ``stage`` and ``message`` follow the progress events;
    ``warnings`` and ``summary`` (the last ``summary`` event) likewise;
    ``paths`` are the files of the ``result`` event; ``error`` the message of
    the ``error`` event; ``log`` the lines of standard error (and any stray
    non-event line of standard output).
    """

    def __init__(self, args: list[str], cwd: Path = LIBRARY_PARENT, python: str | None = None,
                 message: str = "starting") -> None:
        self.fraction, self.stage, self.message, self.summary, self.error = 0.0, "", message, "", ""
        self.warnings: list[str] = []
        self.paths: dict[str, str] = {}
        self.log: list[str] = []
        no_window = subprocess.CREATE_NO_WINDOW if os.name == "nt" else 0
        self._popen = subprocess.Popen([python or sys.executable, *args], cwd=cwd, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8",
                                       errors="replace", creationflags=no_window)
        self._lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self._readers = [threading.Thread(target=self._read, args=(stream, kind), daemon=True)
                         for stream, kind in ((self._popen.stdout, "event"), (self._popen.stderr, "log"))]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: IO[str], kind: str) -> None:
        for line in stream:
            self._lines.put((kind, line.rstrip("\r\n")))

    def poll(self) -> bool:
        """Take in what the child said since the last call; True once it has ended and all is read."""
        with contextlib.suppress(queue.Empty):
            while True:
                kind, line = self._lines.get_nowait()
                event = parse_event(line) if kind == "event" else None
                if event is None:
                    self.log.append(line)
                else:
                    self._take(event)
        return self.returncode is not None

    def _take(self, event: dict) -> None:
        kind = event["event"]
        if kind == "progress":
            self.fraction = float(event.get("fraction", self.fraction))
            self.stage = str(event.get("stage", self.stage))
            self.message = str(event.get("message", self.message))
        elif kind == "warning":
            self.warnings.append(str(event.get("message", "")))
        elif kind == "summary":
            self.summary = str(event.get("message", ""))
        elif kind == "result":
            self.paths = {str(name): str(path) for name, path in event.get("paths", {}).items()}
        elif kind == "error":
            self.error = str(event.get("message", ""))

    @property
    def returncode(self) -> int | None:
        """The exit status, or None while the child runs or output is left to read."""
        if any(reader.is_alive() for reader in self._readers) or not self._lines.empty():
            return None
        return self._popen.wait()

    def failure_message(self, what: str) -> str:
        """One line on why the ended child failed: its error event, else its last log lines."""
        if self.error:
            return self.error
        return f"{what} failed (exit status {self._popen.wait()}): " + " | ".join(self.log[-5:])

    def kill(self) -> None:
        """Kill the child and all its descendants (``PythonSlicer`` is a launcher with a child of its own)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            for descendant in psutil.Process(self._popen.pid).children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    descendant.kill()
        self._popen.kill()
        self._popen.wait()
        for reader in self._readers:
            reader.join()
