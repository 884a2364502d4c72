"""The zoo root's files around the manifest: the lock, staging folders, checksums, sizes.

Every writer of a zoo (`iterconv_keras.zoo.publish`, `iterconv_keras.zoo.retire`,
`iterconv_keras.zoo.serving`) changes it under one exclusive ``flock`` on
``<root>/.lock`` and moves version folders through hidden staging folders
inside the root, so that a rename never crosses file systems and neither TF
Serving nor a listing of ``<root>/<name>/`` sees a half-built or half-removed
version. What ``MANIFEST.json`` holds is `iterconv_keras.zoo.manifest`'s.

This module imports no TensorFlow.
"""

import contextlib
import fcntl
import hashlib
import os
import tempfile

LOCK_FILE = ".lock"
# Staging folders inside the root (same file system: renames are atomic); dot-prefixed
# so that neither TF Serving nor a listing of <root>/<name>/ sees them.
STAGING_PREFIX = ".tmp-"


@contextlib.contextmanager
def locked(root):
    """Hold the zoo's exclusive ``flock`` (creating the root) for a read-modify-write."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, LOCK_FILE), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def staging_folder(root, label):
    """A new, empty hidden staging folder ``<root>/.tmp-<label>*`` (the root must exist); return its path."""
    return tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{label}", dir=root)


def file_checksums(version_dir):
    """``{relative posix path: sha256 hex}`` of every file under ``version_dir``."""
    checksums = {}
    for folder, _, files in os.walk(version_dir):
        for filename in files:
            path = os.path.join(folder, filename)
            relative = os.path.relpath(path, version_dir).replace(os.sep, "/")
            checksums[relative] = _sha256(path)
    return dict(sorted(checksums.items()))


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def size_on_disk(path):
    """Total bytes of the files under ``path`` (None when it does not exist)."""
    if not os.path.isdir(path):
        return None
    return sum(os.path.getsize(os.path.join(folder, f)) for folder, _, files in os.walk(path) for f in files)
