"""Publish a model as the next version of a zoo name (retiring one: `iterconv_keras.zoo.retire`).

Concurrency: a version is built in a temporary directory inside the root (on
the same file system, so the rename is atomic) and renamed to ``<name>/<N>``
while holding an exclusive ``flock`` on ``<root>/.lock``; the same lock guards
the read-modify-write of ``MANIFEST.json``, which is itself written to a
temporary file and ``os.replace``-d. A server polling ``<name>/`` therefore
never sees a half-written version, and readers never see a half-written
manifest. The rename onto an existing non-empty directory fails, so even an
exporter that bypasses the lock cannot overwrite a version; it retries N+1.
"""

import datetime
import errno
import os
import shutil

from iterconv_keras.errors import IntegrityError
from iterconv_keras.zoo import manifest, savedmodel, serving, storage
from iterconv_keras.zoo.card import ModelCard, library_versions

_MAX_RENAME_ATTEMPTS = 1000


def export_version(model, name, root=None, card=None):
    """Export ``model`` as the next integer version of ``name``.

    A Lipschitz-constrained model is projected onto its bound first, on a copy:
    the caller's model is left as it is, and the card records the projection
    (`ModelCard.projection`).

    Args:
        model: a built `IterativeResNet`. To export a run directory, ``.keras``
            file or zoo reference, load it with `iterconv_keras.loading.load`
            and pass its ``model`` and ``card``.
        name: zoo name (see `manifest.validate_name`).
        root: zoo directory (see `manifest.writable_root`: required outside a
            source checkout unless ``$ITERCONV_ZOO`` is set).
        card: the `ModelCard` to publish (recipe, metrics, indices, ...), or
            None for one made from the model alone. Its name, creation time and
            library versions are set here, and its model-derived fields
            (architecture, shapes, parameters, signatures) from ``model``.

    Returns:
        ``(name, version, path)``: the new version number and the absolute path
        of ``<root>/<name>/<version>``.

    Raises:
        ValueError: bad name, or a card whose class names do not fit the model.
        UsageError: no zoo to write to (see `manifest.writable_root`).

    Example:
        >>> name, version, path = export_version(model, "digits-r", root="zoo")   # zoo/digits-r/1
    """
    manifest.validate_name(name)
    root = manifest.writable_root(root)
    export_model, projection = projected_copy(model)
    card = _published_card(export_model, name, card, projection)
    os.makedirs(root, exist_ok=True)
    # Built inside the root so the final rename never crosses file systems; the
    # dot-prefixed name keeps it out of listings and away from TF Serving, which
    # only watches <root>/<name>/.
    staging = storage.staging_folder(root, f"{name}-")
    try:
        build = os.path.join(staging, "version")
        savedmodel.write_saved_model(export_model, build, card.to_json())
        checksums = storage.file_checksums(build)
        with storage.locked(root):
            previous = manifest.read_manifest(root)
            version, final = _rename_to_next_version(build, root, name)
            try:
                document = manifest.register_version(root, name, version, checksums, card)
                serving.write_zoo_config(root, document)
            except BaseException:
                _unpublish(root, final, build, previous)
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return name, version, final


def projected_copy(model):
    """``(model to export, projection record or None)``.

    An unconstrained model is exported as it is. A constrained one is copied
    (config and weights, including the power-iteration vectors) and the copy is
    projected with `iterconv_keras.models.lipschitz.enforce`, which weights
    trained outside ``fit`` may need; the record holds the largest certified
    convolution operator norm (an upper bound, Sedghi et al. 2019) before and
    after, against the per-convolution bound.
    """
    bound = getattr(model, "lipschitz", None)
    if bound is None:
        return model, None
    from iterconv_keras.models import lipschitz

    copy = type(model).from_config(model.get_config())
    copy.set_weights(model.get_weights())
    before = lipschitz.enforce(copy)
    after = lipschitz.enforce(copy)
    record = {
        "per_conv_bound": lipschitz.per_conv_bound(bound, getattr(model, "activation", "relu")),
        "max_conv_norm_before": max(before, default=None),
        "max_conv_norm_after": max(after, default=None),
        "norm": "certified upper bound (Sedghi, Gupta & Long 2019)",
    }
    return copy, record


def _published_card(model, name, card, projection):
    fresh = ModelCard.from_model(model)
    card = card or fresh
    if card.class_names is not None and len(card.class_names) != fresh.num_classes:
        raise ValueError(
            f"the card names {len(card.class_names)} classes but the model has {fresh.num_classes}: "
            f"{card.class_names!r}"
        )
    return card.replace(
        name=name,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        libraries=library_versions(),
        projection=projection,
        class_names=card.class_names or fresh.class_names,
        **{key: getattr(fresh, key) for key in ("image_shape", "num_classes", "multi_label", "architecture",
                                                 "parameters", "signatures", "probabilities")},
    )


def _rename_to_next_version(build, root, name):
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    # Past the manifest's versions too: a number whose folder was deleted is not reused
    # (versions are immutable: a client may still hold the old one).
    version = max([*manifest.versions_on_disk(root, name), *manifest.registered_versions(root, name)], default=0) + 1
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


def _unpublish(root, final, build, previous):
    # Nothing half-written: a version without a manifest entry would fail verify.
    # Rename it back into the staging folder rather than delete it in place: a
    # server polling <name>/ may already be loading it, and a directory renamed
    # away disappears at once instead of losing files one by one under the reader.
    os.rename(final, build)
    manifest.restore_manifest(root, previous)
