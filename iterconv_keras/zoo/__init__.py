"""The versioned model zoo: export, list, load, verify, TF Serving config.

Layout (interfaces.md, "The zoo")::

    <root>/MANIFEST.json     models, versions, default version, sha256 of every file
    <root>/models.config     TF Serving model_config_list (regenerated on export)
    <root>/<name>/<N>/       a SavedModel written by `iterconv_keras.zoo.savedmodel`

The root is ``--zoo``, then ``$ITERCONV_ZOO``, then the repository's ``zoo/``.

Concurrency: a version is built in a temporary directory inside the root (on
the same file system, so the rename is atomic) and renamed to ``<name>/<N>``
while holding an exclusive ``flock`` on ``<root>/.lock``; the same lock guards
the read-modify-write of ``MANIFEST.json``, which is itself written to a
temporary file and ``os.replace``-d. A server polling ``<name>/`` therefore
never sees a half-written version, and readers never see a half-written
manifest. The rename onto an existing non-empty directory fails, so even an
exporter that bypasses the lock cannot overwrite a version; it retries N+1.

Example:
    >>> path = export_version(model, "digits-r", root="zoo")   # zoo/digits-r/1
    >>> model = load("digits-r@1", root="zoo")
"""

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile

from iterconv_keras.errors import IntegrityError, ModelNotFound
from iterconv_keras.fsutil import write_json_atomic, write_text_atomic
from iterconv_keras.zoo import savedmodel as export_lib

ENV_VAR = "ITERCONV_ZOO"
MANIFEST = "MANIFEST.json"
SERVING_CONFIG = "models.config"
LOCK_FILE = ".lock"
MANIFEST_SCHEMA = 1
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_TMP_PREFIX = ".tmp-"
_MAX_RENAME_ATTEMPTS = 1000


@dataclasses.dataclass
class ZooEntry:
    """One loaded zoo version.

    Attributes:
        name: model name.
        version: integer version.
        model: the Keras model (from ``assets.extra/model.keras``).
        model_path: path of that ``.keras`` file.
        metadata: the version's ``metadata.json`` (its model card).
        version_dir: the SavedModel directory.
    """

    name: str
    version: int
    model: object
    model_path: str
    metadata: dict
    version_dir: str


# -- root, names, references


def resolve_root(root=None):
    """The zoo directory: ``root``, else ``$ITERCONV_ZOO``, else ``<repository>/zoo``.

    Args:
        root: explicit directory (the ``--zoo`` option), or None.

    Returns:
        An absolute path (it may not exist yet).
    """
    if root:
        return os.path.abspath(os.fspath(root))
    if os.environ.get(ENV_VAR):
        return os.path.abspath(os.environ[ENV_VAR])
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # iterconv_keras/
    return os.path.join(os.path.dirname(package_dir), "zoo")


def existing_root(root=None):
    """`resolve_root`, but the folder must exist (for commands that only read the zoo).

    Raises:
        ModelNotFound: there is no zoo folder there (exit code 4).
    """
    path = resolve_root(root)
    if not os.path.isdir(path):
        origin = "--zoo" if root else (f"${ENV_VAR}" if os.environ.get(ENV_VAR) else "the repository default")
        raise ModelNotFound(
            f"no zoo at {path} (from {origin}): the folder does not exist; pass --zoo DIR, "
            f"set ${ENV_VAR}, or create one with 'iterconv export MODEL --name NAME --zoo DIR'"
        )
    return path


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


# -- manifest


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


def _write_json_atomic(path, document):
    write_json_atomic(path, document, sort_keys=True)


@contextlib.contextmanager
def _locked(root):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, LOCK_FILE), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _versions_on_disk(root, name):
    folder = os.path.join(root, name)
    if not os.path.isdir(folder):
        return []
    return sorted(int(entry) for entry in os.listdir(folder) if entry.isdigit())


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


# -- export


def export_version(model_or_reference, name, root=None, metadata=None):
    """Export a model as the next integer version of ``name``; return its path.

    Args:
        model_or_reference: a Keras `IterativeResNet`, or a ``MODEL`` reference
            (run directory, ``.keras`` file, zoo version or ``NAME[@N]``,
            resolved by `iterconv_keras.loading.load_model`). For a run
            directory the card is filled from its ``config.json``,
            ``metrics.json`` and ``eval.json``.
        name: zoo name (see `validate_name`).
        root: zoo directory (see `resolve_root`).
        metadata: dict of model-card fields that override the computed ones
            (for example ``{"metrics": {...}}``), or None.

    Returns:
        The absolute path of the new version directory ``<root>/<name>/<N>``.
    """
    validate_name(name)
    root = resolve_root(root)
    model, card = _model_and_card(model_or_reference, name, root)
    card.update(metadata or {})
    card["name"] = name
    os.makedirs(root, exist_ok=True)
    # Built inside the root so the final rename never crosses file systems; the
    # dot-prefixed name keeps it out of listings and away from TF Serving, which
    # only watches <root>/<name>/.
    staging = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-", dir=root)
    try:
        build = os.path.join(staging, "version")
        export_lib.write_saved_model(model, build, card)
        checksums = file_checksums(build)
        with _locked(root):
            version, final = _rename_to_next_version(build, root, name)
            try:
                _register_version(root, name, version, checksums, card)
            except BaseException:
                # Nothing half-written: a version without a manifest entry would fail verify.
                shutil.rmtree(final, ignore_errors=True)
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _model_and_card(model_or_reference, name, root):
    if not isinstance(model_or_reference, (str, os.PathLike)):
        model = model_or_reference
        return model, export_lib.model_card(model, name=name)
    from iterconv_keras import loading

    loaded = loading.load_model(os.fspath(model_or_reference), zoo_root=root)
    run = {"config": {}, "metrics": {}, "eval": {}}
    if loaded.kind == "run":
        run = export_lib.read_run_files(loaded.reference)
    elif loaded.kind in ("zoo", "zoo_version"):
        # Re-exporting a zoo model keeps its card's recipe and metrics.
        previous = loaded.metadata or {}
        run = {"config": previous.get("recipe") or {}, "metrics": previous.get("metrics") or {}, "eval": {}}
    card = export_lib.model_card(
        loaded.model, name=name, run_config=run["config"], metrics=run["metrics"], evaluation=run["eval"],
        source=os.path.abspath(loaded.reference) if os.path.exists(loaded.reference) else loaded.reference,
    )
    return loaded.model, card


def _rename_to_next_version(build, root, name):
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    # Past the manifest's versions too: a number whose folder was deleted is not reused
    # (versions are immutable: a client may still hold the old one).
    version = max([*_versions_on_disk(root, name), *_registered_versions(root, name)], default=0) + 1
    for _ in range(_MAX_RENAME_ATTEMPTS):
        target = os.path.join(folder, str(version))
        try:
            os.rename(build, target)
            return version, target
        except OSError as exc:
            # Taken (by an exporter that did not take the lock): try the next number.
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            version += 1
    raise IntegrityError(f"could not find a free version number under {folder}")


def _registered_versions(root, name):
    """The version numbers of ``name`` in the manifest."""
    return [int(v) for v in read_manifest(root)["models"].get(name, {}).get("versions", {})]


def _register_version(root, name, version, checksums, card):
    manifest = read_manifest(root)
    entry = manifest["models"].setdefault(name, {"versions": {}})
    entry["versions"][str(version)] = {
        "created": card.get("created") or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dataset": card.get("dataset"),
        "metrics": card.get("metrics") or {},
        "parameters": card.get("parameters"),
        "files": checksums,
    }
    entry["versions"] = dict(sorted(entry["versions"].items(), key=lambda item: int(item[0])))
    entry["default_version"] = max(int(v) for v in entry["versions"])
    manifest["models"] = dict(sorted(manifest["models"].items()))
    manifest["schema"] = MANIFEST_SCHEMA
    _write_json_atomic(os.path.join(root, MANIFEST), manifest)
    # Keep the serving config in step so a server polling it sees new models.
    write_text_atomic(os.path.join(root, SERVING_CONFIG), _serving_config_text(root, manifest))


# -- lookup


def list_models(root=None):
    """One summary dict per model: name, versions, default version, dataset, metrics.

    Args:
        root: zoo directory (see `resolve_root`).
    """
    root = resolve_root(root)
    rows = []
    for name, entry in read_manifest(root)["models"].items():
        default = entry["default_version"]
        latest = entry["versions"][str(default)]
        rows.append(
            {
                "name": name,
                "versions": [int(v) for v in entry["versions"]],
                "default_version": default,
                "dataset": latest.get("dataset"),
                "metrics": latest.get("metrics") or {},
                "parameters": latest.get("parameters"),
                "created": latest.get("created"),
                "path": os.path.join(root, name),
            }
        )
    return rows


def resolve(reference, root=None):
    """``(name, version, version_dir, manifest_entry)`` of ``NAME[@N]``.

    Raises:
        ModelNotFound: unknown name or version; the message lists what exists.
    """
    root = resolve_root(root)
    name, version = parse_reference(reference)
    models = read_manifest(root)["models"]
    if name not in models:
        available = ", ".join(f"{n}@{m['default_version']}" for n, m in models.items()) or "none (the zoo is empty)"
        raise ModelNotFound(f"no model {name!r} in the zoo at {root}; available: {available}")
    entry = models[name]
    if version is None:
        version = entry["default_version"]
    if str(version) not in entry["versions"]:
        raise ModelNotFound(
            f"model {name!r} has no version {version} in the zoo at {root}; "
            f"versions: {', '.join(entry['versions'])} (default {entry['default_version']})"
        )
    return name, version, os.path.join(root, name, str(version)), entry["versions"][str(version)]


def check_files(version_dir, expected):
    """Problems found comparing ``version_dir`` with its manifest checksums.

    Args:
        version_dir: a version directory.
        expected: ``{relative path: sha256}`` from the manifest.

    Returns:
        A list of one-line problem descriptions, each naming the file (empty if
        every file is present, unchanged, and no file was added).
    """
    if not os.path.isdir(version_dir):
        return [f"{version_dir}: version directory is missing"]
    actual = file_checksums(version_dir)
    problems = []
    for relative, digest in expected.items():
        path = os.path.join(version_dir, relative)
        if relative not in actual:
            problems.append(f"{path}: file is missing")
        elif actual[relative] != digest:
            problems.append(f"{path}: sha256 {actual[relative][:12]}... does not match the manifest's {digest[:12]}...")
    for relative in sorted(set(actual) - set(expected)):
        problems.append(f"{os.path.join(version_dir, relative)}: file is not in the manifest")
    return problems


def _verified(reference, root):
    name, version, version_dir, entry = resolve(reference, root)
    problems = check_files(version_dir, entry["files"])
    if problems:
        raise IntegrityError(
            f"refusing to load {name}@{version}: checksum verification failed: {problems[0]}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        )
    return name, version, version_dir


def load_entry(reference, root=None):
    """Load ``NAME[@N]`` after verifying its checksums; return a `ZooEntry`.

    Raises:
        ModelNotFound: unknown name or version (exit 4).
        IntegrityError: a file is missing, changed or added (exit 5).
    """
    from iterconv_keras import loading

    name, version, version_dir = _verified(reference, resolve_root(root))
    loaded = loading.load_model(version_dir)
    return ZooEntry(name, version, loaded.model, loaded.path, loaded.metadata, version_dir)


def load(reference, root=None):
    """The Keras model of ``NAME`` (default version) or ``NAME@N``, checksums verified."""
    return load_entry(reference, root).model


def load_serving(reference, root=None, signature=None):
    """The SavedModel of ``NAME[@N]`` loaded with TensorFlow only (checksums verified).

    Args:
        reference: ``NAME`` or ``NAME@N``.
        root: zoo directory.
        signature: None for the `tf.saved_model.load` object, or a signature
            name (``"serving_default"``, ``"classify"``) for that function.
    """
    import tensorflow as tf

    _, _, version_dir = _verified(reference, resolve_root(root))
    loaded = tf.saved_model.load(version_dir)
    if signature is None:
        return loaded
    if signature not in loaded.signatures:
        raise ModelNotFound(f"{reference} has no signature {signature!r}; it has {', '.join(loaded.signatures)}")
    return loaded.signatures[signature]


def show(reference, root=None):
    """The model card (``metadata.json``) and manifest entry of ``NAME[@N]``."""
    name, version, version_dir, entry = resolve(reference, root)
    card_path = os.path.join(version_dir, export_lib.METADATA_FILE)
    try:
        with open(card_path) as f:
            card = json.load(f)
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"cannot read the model card {card_path}: {exc}") from exc
    return {"name": name, "version": version, "path": version_dir, "files": entry["files"], "card": card}


# -- verification


def verify_report(reference=None, root=None, load_models=True):
    """Check checksums (and loading) of one version, one model's versions or the zoo.

    Args:
        reference: ``NAME``, ``NAME@N`` or None for every model. A bare ``NAME``
            checks all its versions.
        root: zoo directory.
        load_models: also load each version with `tf.saved_model.load` and the
            ``.keras`` file with Keras.

    Returns:
        A list of ``{"name", "version", "path", "ok", "problems"}`` dicts.
    """
    root = resolve_root(root)
    manifest = read_manifest(root)
    targets = []
    if reference is None:
        for name, entry in manifest["models"].items():
            targets += [(name, int(v)) for v in entry["versions"]]
    else:
        name, version = parse_reference(reference)
        resolve(reference, root)  # unknown name or version: ModelNotFound listing what exists
        versions = [version] if version is not None else [int(v) for v in manifest["models"][name]["versions"]]
        targets = [(name, v) for v in versions]
    names = {name for name, _ in targets}
    results = [_verify_version(root, manifest, name, version, load_models) for name, version in targets]
    results += _unregistered_versions(root, manifest, names if reference is not None else None)
    return results


def _verify_version(root, manifest, name, version, load_models):
    version_dir = os.path.join(root, name, str(version))
    problems = check_files(version_dir, manifest["models"][name]["versions"][str(version)]["files"])
    if not problems and load_models:
        problems += _load_problems(version_dir)
    return {"name": name, "version": version, "path": version_dir, "ok": not problems, "problems": problems}


def _load_problems(version_dir):
    import tensorflow as tf

    from iterconv_keras import loading

    problems = []
    try:
        loaded = tf.saved_model.load(version_dir)
        missing = {export_lib.SERVING_SIGNATURE, export_lib.CLASSIFY_SIGNATURE} - set(loaded.signatures)
        if missing:
            problems.append(f"{version_dir}: SavedModel lacks signatures {sorted(missing)}")
    except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
        problems.append(f"{version_dir}: SavedModel does not load: {type(exc).__name__}: {exc}")
    try:
        loading.load_model(version_dir)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"{os.path.join(version_dir, export_lib.MODEL_FILE)}: does not load: {exc}")
    return problems


def _unregistered_versions(root, manifest, names):
    # A version folder without a manifest entry has no checksums to trust, yet TF
    # Serving would serve it; report it.
    results = []
    for name in sorted(names if names is not None else _model_folders(root)):
        known = manifest["models"].get(name, {}).get("versions", {})
        for version in _versions_on_disk(root, name):
            if str(version) not in known:
                path = os.path.join(root, name, str(version))
                results.append(
                    {"name": name, "version": version, "path": path, "ok": False,
                     "problems": [f"{path}: version folder is not in the manifest"]}
                )
    return results


def _model_folders(root):
    if not os.path.isdir(root):
        return []
    return [e for e in os.listdir(root) if not e.startswith(".") and os.path.isdir(os.path.join(root, e))]


def verify(reference=None, root=None, load_models=True):
    """Like `verify_report`, but raise `IntegrityError` naming the first bad file.

    Returns:
        The report when everything is intact.
    """
    report = verify_report(reference, root, load_models)
    raise_on_problems(report)
    return report


def raise_on_problems(report):
    """Raise `IntegrityError` naming the first problem of a `verify_report` (and how many more)."""
    problems = [p for result in report for p in result["problems"]]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise IntegrityError(f"zoo verification failed: {problems[0]}{more}")


# -- TF Serving


def serving_config(root=None, write=True):
    """TF Serving's text ``ModelServerConfig`` for every model of the zoo.

    Each model is served with all its versions and the label ``default`` on
    its default (highest) version.

    Args:
        root: zoo directory.
        write: also write it to ``<root>/models.config`` (atomically).

    Returns:
        The config text.
    """
    root = resolve_root(root)
    with _locked(root):
        text = _serving_config_text(root, read_manifest(root))
        if write:
            write_text_atomic(os.path.join(root, SERVING_CONFIG), text)
    return text


def _serving_config_text(root, manifest):
    lines = ["# Generated by iterconv from MANIFEST.json; regenerate with `iterconv zoo serving-config`.",
             "model_config_list {"]
    for name, entry in manifest["models"].items():
        lines += [
            "  config {",
            f"    name: {_text_string(name)}",
            f"    base_path: {_text_string(os.path.join(os.path.abspath(root), name))}",
            '    model_platform: "tensorflow"',
            "    model_version_policy { all {} }",
            f'    version_labels {{ key: "default" value: {int(entry["default_version"])} }}',
            "  }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _text_string(value):
    # Protocol-buffer text format string literal (UTF-8 kept as is).
    if any(c in value for c in "\n\r\0"):
        raise ValueError(f"a TF Serving config string cannot hold control characters, got {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
