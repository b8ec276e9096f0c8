"""The structured progress channel of a child job: JSON lines on the child's standard output.

``lungudrnet --progress-json COMMAND ...`` (the registration and training
jobs that the Slicer panels start) writes one JSON object per line on its
standard output and everything else (log, progress bars, library messages) on
standard error, so that the parent never parses log text. The events:

* ``{"event": "progress", "fraction": 0.3, "stage": "registration", "message": "running the network on cpu"}``
  (fraction of the whole job in [0, 1]);
* ``{"event": "warning", "message": "..."}`` (every warning the job logs);
* ``{"event": "summary", "message": "epoch 3: train loss ..."}`` (training: the last finished epoch);
* ``{"event": "result", "paths": {"warped": "...", ...}}`` (files written);
* ``{"event": "error", "message": "...", "exit_code": 2}`` (the one-line error before a non-zero exit).

The job side: :func:`channel_on` in the command line, then :func:`emit` from
anywhere (a no-op without a channel, e.g. in a terminal). The parent side:
:func:`parse_event` on each line of the child's standard output.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
from typing import Iterator, TextIO

EVENTS = ("progress", "warning", "summary", "result", "error")

_channel: Channel | None = None


class Channel:
    """Writes events to one stream, a whole line at a time (safe from several threads)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def emit(self, event: str, **fields) -> None:
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}; one of {EVENTS}")
        line = json.dumps({"event": event, **fields}, default=str, allow_nan=False)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


class _WarningsToChannel(logging.Handler):
    """Sends every warning and error record of the job as a ``warning`` event."""

    def __init__(self, channel: Channel) -> None:
        super().__init__(logging.WARNING)
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        self._channel.emit("warning", message=record.getMessage())


@contextlib.contextmanager
def channel_on(stream: TextIO) -> Iterator[Channel]:
    """While the block runs: events go to ``stream``, and so do logged warnings."""
    global _channel
    _channel = Channel(stream)
    handler = _WarningsToChannel(_channel)
    logging.getLogger().addHandler(handler)
    try:
        yield _channel
    finally:
        logging.getLogger().removeHandler(handler)
        _channel = None


def emit(event: str, **fields) -> None:
    """Send an event on this process's channel, if it has one."""
    if _channel is not None:
        _channel.emit(event, **fields)


def emit_progress(fraction: float, message: str, stage: str) -> None:
    """A ``progress`` event; ``fraction`` is clipped to [0, 1] (NaN counts as 0)."""
    fraction = 0.0 if not math.isfinite(fraction) else min(1.0, max(0.0, fraction))
    emit("progress", fraction=round(fraction, 4), stage=stage, message=message)


def parse_event(line: str) -> dict | None:
    """The event on one line of a child's standard output, or None if the line is no event."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("event") not in EVENTS:
        return None
    return event
