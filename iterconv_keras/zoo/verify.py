"""Is the zoo intact? Checksums against ``MANIFEST.json``, and that every version loads.

Every load of a zoo model goes through `verified` first, so a changed,
missing or added file is refused before anything is read from it. The sha256
manifest guards against corruption, not tampering: it sits beside the files
it hashes.
"""

import os

from iterconv_keras.errors import IntegrityError, ModelNotFound
from iterconv_keras.zoo import manifest, savedmodel, storage


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
    actual = storage.file_checksums(version_dir)
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


def verified(reference, root=None):
    """``(name, version, version_dir)`` of ``NAME[@N]`` once its checksums match.

    Raises:
        ModelNotFound: unknown name or version (exit 4).
        IntegrityError: a file is missing, changed or added (exit 5).
    """
    name, version, version_dir, entry = manifest.resolve(reference, root)
    problems = check_files(version_dir, entry["files"])
    if problems:
        raise IntegrityError(
            f"refusing to load {name}@{version}: checksum verification failed: {problems[0]}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        )
    return name, version, version_dir


def load_serving(reference, root=None, signature=None):
    """The SavedModel of ``NAME[@N]`` loaded with TensorFlow only (checksums verified).

    Args:
        reference: ``NAME`` or ``NAME@N``.
        root: zoo directory.
        signature: None for the `tf.saved_model.load` object, or a signature
            name (``"serving_default"``, ``"classify"``) for that function.

    Example:
        >>> serve = load_serving("digitclutter-small", signature="serving_default")
    """
    import tensorflow as tf

    _, _, version_dir = verified(reference, root)
    loaded = tf.saved_model.load(version_dir)
    if signature is None:
        return loaded
    if signature not in loaded.signatures:
        raise ModelNotFound(f"{reference} has no signature {signature!r}; it has {', '.join(loaded.signatures)}")
    return loaded.signatures[signature]


def verify_report(reference=None, root=None, load_models=True):
    """Check checksums (and loading) of one version, one model's versions or the zoo.

    Args:
        reference: ``NAME``, ``NAME@N`` or None for every model. A bare ``NAME``
            checks all its live versions. Retired versions are not checked (their
            folders are gone), but a retired version's folder that is still
            there is a problem, like any folder the manifest does not list.
        root: zoo directory.
        load_models: also load each version with `tf.saved_model.load` and the
            ``.keras`` file with Keras.

    Returns:
        A list of ``{"name", "version", "path", "ok", "problems"}`` dicts.
    """
    root = manifest.resolve_root(root)
    document = manifest.read_manifest(root)
    if reference is None:
        targets = [(name, int(v)) for name, entry in document["models"].items() for v in entry["versions"]]
    else:
        name, version = manifest.parse_reference(reference)
        manifest.resolve(reference, root)  # unknown name or version: ModelNotFound listing what exists
        versions = [version] if version is not None else [int(v) for v in document["models"][name]["versions"]]
        targets = [(name, v) for v in versions]
    names = {name for name, _ in targets}
    results = [_verify_version(root, document, name, version, load_models) for name, version in targets]
    results += _unregistered_versions(root, document, names if reference is not None else None)
    return results


def _verify_version(root, document, name, version, load_models):
    version_dir = os.path.join(root, name, str(version))
    problems = check_files(version_dir, document["models"][name]["versions"][str(version)]["files"])
    if not problems and load_models:
        problems += _load_problems(version_dir)
    return {"name": name, "version": version, "path": version_dir, "ok": not problems, "problems": problems}


def _load_problems(version_dir):
    import tensorflow as tf

    from iterconv_keras.models.saving import load_keras

    problems = []
    try:
        loaded = tf.saved_model.load(version_dir)
        missing = {savedmodel.SERVING_SIGNATURE, savedmodel.CLASSIFY_SIGNATURE} - set(loaded.signatures)
        if missing:
            problems.append(f"{version_dir}: SavedModel lacks signatures {sorted(missing)}")
    except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
        problems.append(f"{version_dir}: SavedModel does not load: {type(exc).__name__}: {exc}")
    path = os.path.join(version_dir, savedmodel.MODEL_FILE)
    try:
        load_keras(path)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"{path}: does not load: {exc}")
    return problems


def _unregistered_versions(root, document, names):
    # A version folder without a live manifest entry has no checksums to trust,
    # yet TF Serving would serve it; report it. A retired version's folder must be
    # gone (its absence is no problem: the manifest keeps its record instead).
    results = []
    for name in sorted(names if names is not None else _model_folders(root)):
        entry = document["models"].get(name, {})
        for version in manifest.versions_on_disk(root, name):
            if str(version) in entry.get("versions", {}):
                continue
            path = os.path.join(root, name, str(version))
            retired = entry.get(manifest.RETIRED, {}).get(str(version))
            problem = (f"{path}: {manifest.retired_message(name, version, retired)}, but its folder is still "
                       f"served; delete it" if retired is not None
                       else f"{path}: version folder is not in the manifest")
            results.append({"name": name, "version": version, "path": path, "ok": False, "problems": [problem]})
    return results


def _model_folders(root):
    if not os.path.isdir(root):
        return []
    return [e for e in os.listdir(root) if not e.startswith(".") and os.path.isdir(os.path.join(root, e))]


def verify(reference=None, root=None, load_models=True):
    """Like `verify_report`, but raise `IntegrityError` naming the first bad file.

    Returns:
        The report when everything is intact.

    Example:
        >>> report = verify("fashion-mnist-small", load_models=False)
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
