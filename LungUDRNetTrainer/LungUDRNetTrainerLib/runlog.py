"""The per-epoch log of a run: ``log.csv`` (always) and TensorBoard event files (when installed).

The CSV is rewritten atomically from the run's history (kept in the
checkpoint), so after a crash or ``--resume`` it always matches ``last.pt``.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from LungUDRNetLib.io import atomic_path

log = logging.getLogger(__name__)

COLUMNS = ("epoch", "train_loss", "val_loss", "val_similarity", "val_smoothness", "val_ncc_percent",
           "val_one_minus_mse_percent", "val_dice_percent", "learning_rate", "seconds")


def _summary_writer(folder: Path):
    """A TensorBoard ``SummaryWriter``, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed: no event files (pip install tensorboard)")
        return None
    return SummaryWriter(str(folder))


class RunLog:
    """Writes ``RUN_DIR/log.csv`` and ``RUN_DIR/tensorboard/``; does nothing when ``enabled`` is False
    (ranks other than 0)."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.path = run_dir / "log.csv"
        self.writer = _summary_writer(run_dir / "tensorboard") if enabled else None
        self.enabled = enabled

    def write(self, history: list[dict]) -> None:
        """Rewrite the CSV from ``history`` and send the newest row to TensorBoard."""
        if not self.enabled:
            return
        text = io.StringIO()
        table = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
        table.writeheader()
        table.writerows(history)
        with atomic_path(self.path) as temporary:
            temporary.write_text(text.getvalue())
        if self.writer is not None and history:
            row = history[-1]
            for key in COLUMNS[1:]:
                if row.get(key) is not None:
                    self.writer.add_scalar(key.replace("_", "/", 1), row[key], row["epoch"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
