"""Exceptions that carry the documented exit code of the command line.

The CLI maps every `IterconvError` to one line on stderr and its `exit_code`
(README.md, "Command line"):

    0 success, 1 unexpected failure, 2 usage error, 3 dataset not available,
    4 model or version not found, 5 integrity check failed.

Library code raises these (or plain `ValueError` for bad arguments, which the
CLI reports as a usage error when iterconv's own code raised it) and never prints.
"""


class IterconvError(Exception):
    """Base class: an error the user can act on, with an exit code."""

    exit_code = 1


class UsageError(IterconvError):
    """Bad arguments or a combination that does not make sense (exit 2)."""

    exit_code = 2


class DatasetNotAvailable(IterconvError):
    """A dataset's files are missing or unreadable (exit 3)."""

    exit_code = 3


class ModelNotFound(IterconvError):
    """A model, run directory, zoo name or version does not exist (exit 4)."""

    exit_code = 4


class IntegrityError(IterconvError):
    """A checksum or structural check failed (exit 5)."""

    exit_code = 5
