"""Exception types raised by LungUDRNet for problems a user can fix.

Every message names the input concerned and what is wrong with it (and, where
there is one, the fix). The command line prints the message on one line and
exits with :data:`EXIT_CODE` of the exception's class.
"""


class LungUDRNetError(Exception):
    """Base class: a problem with the user's input, files or environment."""

    exit_code = 2


class InputError(LungUDRNetError):
    """An input image, mask, point file or dataset is missing or unusable."""


class ModelError(LungUDRNetError):
    """A model checkpoint is missing, corrupt, unsafe or incompatible."""


class OutputError(LungUDRNetError):
    """An output cannot be written (exists, not writable, disk full)."""

    exit_code = 3


class DeviceError(LungUDRNetError):
    """The requested compute device is not available."""


class ResourceError(LungUDRNetError):
    """The job would need more memory than allowed or available."""

    exit_code = 4


class TrainingError(LungUDRNetError):
    """Training cannot go on: the loss became NaN or infinite (the weights diverged)."""


class CancelledError(LungUDRNetError):
    """The user interrupted the run (Ctrl-C, SIGTERM, Cancel button)."""

    exit_code = 130
