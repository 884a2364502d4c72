"""Test-only fault injection: run ``iterconv`` and SIGKILL it at an exact point.

The crash tests (``tests/test_faults.py``) must kill training between writing a
checkpoint and renaming it into place, a moment a timer cannot hit reliably.
The library carries no hook for this (review D4: a production run must not
react to an environment variable); instead this runner wraps ``os.rename`` in
the child process before the command line starts, and kills the process when
the rename that would publish the named checkpoint is about to happen.

Usage (from the repository root)::

    ITERCONV_FAULT=checkpoint:2 python tests/_fault_injection.py train ...

Only this runner reads ``ITERCONV_FAULT``; ``iterconv`` itself ignores it.
"""

import os
import pathlib
import runpy
import signal
import sys

FAULT_ENV = "ITERCONV_FAULT"
REPO = pathlib.Path(__file__).resolve().parent.parent


def install(point):
    """Kill this process when the checkpoint named by ``point`` (``checkpoint:<epoch>``) is renamed into place."""
    from iterconv_keras import runs

    kind, _, epoch = point.partition(":")
    if kind != "checkpoint" or not epoch.isdigit():
        raise ValueError(f"{FAULT_ENV} must be checkpoint:<epoch>, got {point!r}")
    target = os.path.basename(runs.checkpoint_path("", int(epoch)))
    rename = os.rename

    def killing_rename(src, dst, *args, **kwargs):
        dst_path = os.fspath(dst)
        if (os.path.basename(dst_path) == target
                and os.path.basename(os.path.dirname(dst_path)) == runs.CHECKPOINT_DIR):
            os.kill(os.getpid(), signal.SIGKILL)
        return rename(src, dst, *args, **kwargs)

    os.rename = killing_rename


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    if os.environ.get(FAULT_ENV):
        install(os.environ[FAULT_ENV])
    runpy.run_module("iterconv_cli.main", run_name="__main__", alter_sys=True)
