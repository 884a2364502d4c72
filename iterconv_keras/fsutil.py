"""Small file-system helpers shared by the commands: writability checks, atomic JSON."""

import contextlib
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


@contextlib.contextmanager
def atomic_file(path, mode="w", suffix=""):
    """Open a temporary file beside ``path``; on success fsync it and rename it to ``path``.

    Readers (a TF Serving poller, a resumed run) never see half a file; on any
    error the temporary file is removed; missing folders are created; the file
    is world-readable (mkstemp makes it private, and a server may run as
    another user).

    Args:
        path: the final file.
        mode: ``"w"`` (text) or ``"wb"`` (binary).
        suffix: suffix of the temporary name (numpy appends ``.npz`` otherwise).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=folder)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path, text):
    """Write ``text`` to ``path`` through `atomic_file`."""
    with atomic_file(path) as f:
        f.write(text)


def json_default(value):
    """``json.dumps(default=...)`` for numpy scalars and arrays."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_json_atomic(path, document, **dump_options):
    """`write_text_atomic` of ``document`` as indented JSON (numpy values allowed)."""
    write_text_atomic(path, json.dumps(document, indent=2, default=json_default, **dump_options) + "\n")


def read_json_if_present(path):
    """The JSON document at ``path``, or ``{}`` when there is no such file.

    Raises:
        IntegrityError: the file exists but cannot be read or is not JSON; the
            message names the file.
    """
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        from iterconv_keras.errors import IntegrityError

        raise IntegrityError(f"cannot read {path}: {exc}") from exc
