"""``python -m LungUDRNetTrainerLib`` / ``torchrun -m LungUDRNetTrainerLib``: the ``lungudrnet`` command line."""

import sys

from LungUDRNetLib.cli import main

sys.exit(main())
