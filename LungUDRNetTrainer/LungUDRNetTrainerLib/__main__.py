"""``python -m LungUDRNetTrainerLib`` / ``torchrun -m LungUDRNetTrainerLib``: the ``lungudrnet`` command line
with the trainer's ``train`` and ``evaluate``, also where the package is not installed (Slicer)."""

import sys

from LungUDRNetLib.cli import main

from .commands import add_parsers

sys.exit(main(extra_commands=[add_parsers]))
