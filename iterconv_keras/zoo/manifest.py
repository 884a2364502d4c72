"""Where the zoo is and what it holds: root, names, ``MANIFEST.json``, listing.

This is the one module that knows the manifest document's structure: it
registers a version (`register_version`, for `iterconv_keras.zoo.publish`),
moves one to the name's ``retired`` records (`retire_entry`, for
`iterconv_keras.zoo.retire`; `retired_message` says so to whoever asks for it)
and puts a previous manifest back when a change fails (`restore_manifest`).
The lock, staging folders and checksums are `iterconv_keras.zoo.storage`'s.

The zoo layout (docs/serving.md)::

    <root>/MANIFEST.json     models, versions, default version, sha256 of every file,
                             and the record of each retired version
    <root>/models.config     TF Serving model_config_list (`iterconv_keras.zoo.serving`)
    <root>/<name>/<N>/       a version (`iterconv_keras.zoo.savedmodel`)

Reading commands find the root at ``--zoo``, then ``$ITERCONV_ZOO``, then the
``zoo/`` beside the package (the repository's, in a checkout). Writing needs
``--zoo`` or ``$ITERCONV_ZOO`` unless the package runs from a checkout
(`writable_root`): an installed package's folder is not a place for data.

This module imports no TensorFlow.
"""

import json
import os
import re

from iterconv_keras.errors import IntegrityError, ModelNotFound, UsageError
from iterconv_keras.fsutil import write_json_atomic
from iterconv_keras.zoo import savedmodel, storage
from iterconv_keras.zoo.card import ModelCard

ENV_VAR = "ITERCONV_ZOO"
MANIFEST = "MANIFEST.json"
MANIFEST_SCHEMA = 1
# A name's mapping of retired versions: what each held, when and why it was retired.
RETIRED = "retired"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
# A source checkout holds the project file beside the package; site-packages does not.
_CHECKOUT_MARKER = "pyproject.toml"


# -- root


def _package_parent():
    # The folder holding the iterconv_keras package: the checkout, or site-packages.
    import iterconv_keras

    return os.path.dirname(os.path.dirname(os.path.abspath(iterconv_keras.__file__)))


def in_checkout():
    """True when the package runs from a source checkout (its ``zoo/`` is the repository's)."""
    return os.path.isfile(os.path.join(_package_parent(), _CHECKOUT_MARKER))


def resolve_root(root=None):
    """The zoo directory to read: ``root``, else ``$ITERCONV_ZOO``, else ``zoo/`` beside the package.

    Args:
        root: explicit directory (the ``--zoo`` option), or None.

    Returns:
        An absolute path (it may not exist).
    """
    if root:
        return os.path.abspath(os.fspath(root))
    if os.environ.get(ENV_VAR):
        return os.path.abspath(os.environ[ENV_VAR])
    return os.path.join(_package_parent(), "zoo")


def existing_root(root=None):
    """`resolve_root`, but the folder must exist (for commands that only read the zoo).

    Raises:
        ModelNotFound: there is no zoo folder there (exit code 4).
    """
    path = resolve_root(root)
    if not os.path.isdir(path):
        origin = "--zoo or root=" if root else (f"${ENV_VAR}" if os.environ.get(ENV_VAR) else "the package's default")
        raise ModelNotFound(
            f"no zoo found at {path} (from {origin}): the folder does not exist; pass --zoo DIR (in Python, "
            f"root=DIR), set ${ENV_VAR}, or create one with 'iterconv export MODEL --name NAME --zoo DIR'"
        )
    return path


def writable_root(root=None):
    """The zoo directory an export writes to.

    Like `resolve_root`, except that the default ``zoo/`` beside the package is
    used only in a source checkout: an installed package has no business
    holding data (and ``site-packages`` may be shared or read-only).

    Raises:
        UsageError: no ``root``, no ``$ITERCONV_ZOO`` and the package is
            installed (exit code 2); the message says what to pass.
        ValueError: the root exists and is not a directory.
    """
    if not root and not os.environ.get(ENV_VAR) and not in_checkout():
        raise UsageError(
            f"no zoo to export to: iterconv is installed in {_package_parent()}, not run from a source "
            f"checkout, and export does not write into an installed package; pass --zoo DIR or set ${ENV_VAR}"
        )
    path = resolve_root(root)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"zoo {path} exists and is not a directory")
    return path


# -- names and references


def validate_name(name):
    """Return ``name`` if it is a valid zoo model name, else raise ValueError."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ValueError(
            f"model name must match {NAME_PATTERN.pattern} (lower-case letters, digits, '_', '.', '-'; "
            f"no '@' or '/'), got {name!r}"
        )
    return name


def parse_reference(reference):
    """Split ``"NAME"`` or ``"NAME@N"`` into ``(name, N or None)``.

    Raises:
        ValueError: malformed reference (bad name, or a version that is not a
            positive integer).
    """
    name, at, version = str(reference).partition("@")
    validate_name(name)
    if not at:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise ValueError(f"version in {reference!r} must be a positive integer, got {version!r}")
    return name, int(version)


# -- the manifest


def read_manifest(root=None):
    """The manifest of the zoo at ``root`` (an empty one if the zoo has none).

    Raises:
        IntegrityError: the manifest exists but cannot be parsed.
    """
    path = os.path.join(resolve_root(root), MANIFEST)
    if not os.path.exists(path):
        return {"schema": MANIFEST_SCHEMA, "models": {}}
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"cannot read {path}: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("models"), dict):
        raise IntegrityError(f"{path} has no 'models' mapping")
    return manifest


def versions_on_disk(root, name):
    """The integer version folders of ``name`` (registered or not), sorted."""
    folder = os.path.join(root, name)
    if not os.path.isdir(folder):
        return []
    return sorted(int(entry) for entry in os.listdir(folder) if entry.isdigit())


def registered_versions(root, name):
    """The version numbers of ``name`` in the manifest, live and retired (a number is never reused)."""
    entry = read_manifest(root)["models"].get(name, {})
    return sorted(int(v) for v in [*entry.get("versions", {}), *entry.get(RETIRED, {})])


def register_version(root, name, version, checksums, card):
    """Add ``name@version`` to the manifest (atomically; call under `storage.locked`).

    Args:
        root: zoo directory.
        name: model name.
        version: the new version number.
        checksums: ``{relative path: sha256}`` of the version's files.
        card: its `ModelCard`.

    Returns:
        The new manifest.
    """
    manifest = read_manifest(root)
    entry = manifest["models"].setdefault(name, {"versions": {}})
    entry["versions"][str(version)] = {
        "created": card.created,
        "dataset": card.dataset,
        "metrics": card.metrics or {},
        "parameters": card.parameters,
        "files": checksums,
    }
    entry["versions"] = _by_version(entry["versions"])
    entry["default_version"] = max(int(v) for v in entry["versions"])
    return write_manifest(root, manifest)


def write_manifest(root, manifest):
    """Write ``manifest`` as ``<root>/MANIFEST.json`` atomically (models sorted by name); return it."""
    manifest["models"] = dict(sorted(manifest["models"].items()))
    manifest["schema"] = MANIFEST_SCHEMA
    write_json_atomic(os.path.join(root, MANIFEST), manifest, sort_keys=True)
    return manifest


def retire_entry(root, name, version, reason, when):
    """Move ``name@version`` to the name's ``retired`` records (atomically; call under `storage.locked`).

    The record keeps everything the live entry held (creation time, dataset,
    metrics, parameters, checksums) plus ``retired_at`` and ``reason``. If the
    version was the default, the default moves to the highest live version.
    The caller checks that the version is live and not the last one.

    Returns:
        The new manifest.
    """
    document = read_manifest(root)
    entry = document["models"][name]
    record = entry["versions"].pop(str(version))
    retired = {**entry.get(RETIRED, {}), str(version): {**record, "retired_at": when, "reason": reason}}
    entry[RETIRED] = _by_version(retired)
    if int(entry["default_version"]) == int(version):
        entry["default_version"] = max(int(v) for v in entry["versions"])
    return write_manifest(root, document)


def restore_manifest(root, previous):
    """Write ``previous`` back as the manifest if it changed; errors here are swallowed (the first failure counts)."""
    try:
        if read_manifest(root) != previous:
            write_manifest(root, previous)
    except Exception:  # noqa: BLE001 - the original failure is the one to report
        pass


def _by_version(mapping):
    # Version string -> record, ordered by version number, as the manifest stores it.
    return dict(sorted(mapping.items(), key=lambda item: int(item[0])))


def retired_message(name, version, record):
    """One line saying that ``name@version`` was retired, when (the date) and why."""
    return f"{name}@{version} was retired on {str(record.get('retired_at'))[:10]}: {record.get('reason')}"


# -- lookup


def list_pretrained(root=None):
    """One summary dict per model of the zoo.

    An empty list means the zoo was found and holds no model; no zoo at all is
    an error, as for ``iterconv zoo list``.

    Args:
        root: zoo directory (default: ``$ITERCONV_ZOO``, then the checkout's
            ``zoo/``; see `resolve_root`).

    Returns:
        A list of dicts: ``name``, ``versions`` (the live versions, ints),
        ``default_version``, ``sizes`` (bytes on disk of each version, in the
        order of ``versions``), and the default version's ``dataset``,
        ``metrics``, ``parameters``, ``created``, plus the model's ``path`` and
        ``retired``: ``{"version", "retired_at", "reason"}`` of each retired
        version (its folder is gone; its record stays in the manifest).

    Raises:
        ModelNotFound: there is no zoo folder where it was looked for (an
            installed iterconv without ``root`` or ``$ITERCONV_ZOO``); the
            message names the folder and what to pass.

    Example:
        >>> [row["name"] for row in list_pretrained()][:1]
        ['digitclutter-small']
    """
    root = existing_root(root)
    rows = []
    for name, entry in read_manifest(root)["models"].items():
        default = entry["default_version"]
        latest = entry["versions"][str(default)]
        versions = [int(v) for v in entry["versions"]]
        rows.append(
            {
                "name": name,
                "versions": versions,
                "default_version": default,
                "sizes": [storage.size_on_disk(os.path.join(root, name, str(v))) for v in versions],
                "dataset": latest.get("dataset"),
                "metrics": latest.get("metrics") or {},
                "parameters": latest.get("parameters"),
                "created": latest.get("created"),
                "path": os.path.join(root, name),
                "retired": [{"version": int(v), "retired_at": record.get("retired_at"), "reason": record.get("reason")}
                            for v, record in entry.get(RETIRED, {}).items()],
            }
        )
    return rows


def contains(name, root=None):
    """True when the zoo at ``root`` (if any) registers a model ``name``."""
    return os.path.isfile(os.path.join(resolve_root(root), MANIFEST)) and name in read_manifest(root)["models"]


def resolve(reference, root=None):
    """``(name, version, version_dir, manifest_entry)`` of ``NAME[@N]``.

    Raises:
        ValueError: malformed reference.
        ModelNotFound: no zoo folder at ``root`` (`existing_root`), unknown
            name or version, or a retired version (the message says when and
            why); the message lists what exists.
    """
    name, version = parse_reference(reference)
    root = existing_root(root)  # a missing zoo is not an empty one
    models = read_manifest(root)["models"]
    if name not in models:
        available = ", ".join(f"{n}@{m['default_version']}" for n, m in models.items()) or "none (the zoo is empty)"
        raise ModelNotFound(f"no model {name!r} in the zoo at {root}; available: {available}")
    entry = models[name]
    if version is None:
        version = entry["default_version"]
    live = f"versions: {', '.join(entry['versions'])} (default {entry['default_version']})"
    if str(version) in entry.get(RETIRED, {}):
        raise ModelNotFound(f"{retired_message(name, version, entry[RETIRED][str(version)])}; "
                            f"the zoo at {root} serves {live}")
    if str(version) not in entry["versions"]:
        raise ModelNotFound(f"model {name!r} has no version {version} in the zoo at {root}; {live}")
    return name, version, os.path.join(root, name, str(version)), entry["versions"][str(version)]


def show(reference, root=None):
    """The model card and manifest entry of ``NAME[@N]`` (no TensorFlow needed).

    Returns:
        ``{"name", "version", "path", "size", "files", "card"}`` with ``card``
        a `ModelCard`.
    """
    name, version, version_dir, entry = resolve(reference, root)
    card = ModelCard.read(os.path.join(version_dir, savedmodel.METADATA_FILE))
    return {"name": name, "version": version, "path": version_dir, "size": storage.size_on_disk(version_dir),
            "files": entry["files"], "card": card}
