"""Small file-system helpers shared by the commands: writability checks, atomic JSON."""

import json
import os
import tempfile


def nearest_existing(path):
    """The path itself or its closest ancestor that exists."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_writable(path):
    """Raise ``ValueError`` unless ``path`` can be created (missing folders included).

    Probes with a real temporary file in the nearest existing folder, because
    ``os.access`` answers yes to root even where nothing can be written
    (read-only mounts, ``/proc``).
    """
    folder = nearest_existing(os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(folder):
        raise ValueError(f"cannot write {path}: {folder} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ValueError(f"cannot write {path}: {folder} is not writable ({exc.strerror})") from None


def write_json_atomic(path, document):
    """Write JSON to ``path`` through a temporary file, fsync and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; results are meant to be shared
        with os.fdopen(fd, "w") as f:
            json.dump(document, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
