"""Retire a version: take it out of the served zoo and keep its record in the manifest.

Retiring runs the steps of an export (`iterconv_keras.zoo.publish`) backwards
under the same lock: the version folder is renamed out of ``<name>/`` into a
hidden staging folder of the root (one atomic step for a polling server), the
manifest moves the version's entry to the name's ``retired`` records,
``models.config`` is regenerated, and only then is the staging folder deleted. If
the manifest or config cannot be written, the folder is renamed back. Version
numbers are never reused: the next export counts retired numbers too.

The record (what the version held, when and why it was retired) stays in
``MANIFEST.json`` under the name's ``retired`` key, so asking for the version
later says why it is gone (`manifest.retired_message`).
"""

import contextlib
import datetime
import os
import shutil

from iterconv_keras.errors import IntegrityError, UsageError
from iterconv_keras.zoo import manifest, serving, storage


def retire_version(name, version, reason, root=None):
    """Retire ``name@version``: take it out of the served zoo and keep its record in the manifest.

    Under the zoo's lock: the version folder is renamed into a hidden staging
    folder of the root (TF Serving, which polls ``<root>/<name>/``, sees it
    vanish in one step), the manifest moves its entry (creation time, dataset,
    metrics, parameters, checksums) to the name's ``retired`` records with the
    time and reason, the default version moves to the highest live version if
    it was this one, ``models.config`` is regenerated (its ``default`` label
    follows), and the staging folder is deleted. If the manifest or config
    cannot be written, the folder is renamed back and the manifest restored.
    A retired number is never given to a later export. A registered version
    whose folder is already missing is retired all the same.

    Args:
        name: zoo name.
        version: the version to retire (a positive int).
        reason: why, one line kept in the manifest and shown to anyone who asks
            for the version (required, not blank).
        root: zoo directory (see `manifest.writable_root`); it must exist.

    Returns:
        ``{"name", "version", "reference", "retired_at", "reason",
        "default_version", "versions", "removed", "config"}``: ``versions`` are
        the live versions left, ``removed`` the folder taken out of the zoo (None
        if it was already missing), ``config`` the rewritten ``models.config``.

    Raises:
        ValueError: bad name, version or reason.
        UsageError: the version is already retired, or it is the name's last
            live version (export a new version first).
        ModelNotFound: no zoo at ``root``, or no such name or version.

    Example:
        >>> retire_version("digitclutter-small", 1, "5-epoch budget; superseded by version 2")
    """
    manifest.validate_name(name)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"version to retire must be a positive integer, got {version!r}")
    if not isinstance(reason, str) or not reason.strip():
        raise ValueError(f"retiring a version needs a reason (it is kept in the manifest), got {reason!r}")
    reason = " ".join(reason.split())
    manifest.writable_root(root)  # an installed package's own folder is not a zoo to change
    root = manifest.existing_root(root)
    with storage.locked(root):
        previous = manifest.read_manifest(root)
        _check_retirable(root, previous, name, version)
        when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        version_dir = os.path.join(root, name, str(version))
        present = os.path.isdir(version_dir)
        # Same file system as the version (inside the root), hidden from TF Serving.
        staging = storage.staging_folder(root, f"retire-{name}-{version}-")
        moved = os.path.join(staging, "version")
        try:
            if present:
                os.rename(version_dir, moved)
            document = manifest.retire_entry(root, name, version, reason, when)
            config = serving.write_zoo_config(root, document)
        except BaseException as exc:
            _unretire(root, moved if present else None, version_dir, staging, previous, exc)
            raise
        shutil.rmtree(staging, ignore_errors=True)
    entry = document["models"][name]
    return {"name": name, "version": version, "reference": f"{name}@{version}", "retired_at": when,
            "reason": reason, "default_version": entry["default_version"],
            "versions": [int(v) for v in entry["versions"]], "removed": version_dir if present else None,
            "config": config}


def _check_retirable(root, document, name, version):
    entry = document["models"].get(name, {})
    record = entry.get(manifest.RETIRED, {}).get(str(version))
    if record is not None:
        raise UsageError(f"{manifest.retired_message(name, version, record)}; it is already retired")
    manifest.resolve(f"{name}@{version}", root)  # unknown name or version: ModelNotFound listing what exists
    if list(entry["versions"]) == [str(version)]:
        raise UsageError(
            f"refusing to retire {name}@{version}: it is the only live version of {name!r} and a name keeps at "
            f"least one; export a new version first"
        )


def _unretire(root, moved, version_dir, staging, previous, failure):
    # Put the folder back before the manifest: a manifest that lists a version
    # whose folder is gone would fail verify and every load of it.
    stuck = None
    if moved is not None:
        try:
            os.rename(moved, version_dir)
        except OSError as exc:
            stuck = exc
    manifest.restore_manifest(root, previous)
    if stuck is not None:
        raise IntegrityError(
            f"retiring {version_dir} failed ({failure}) and its folder could not be moved back from {moved} "
            f"({stuck.strerror}); the manifest still lists it: move the folder back by hand"
        ) from failure
    with contextlib.suppress(OSError):
        os.rmdir(staging)
