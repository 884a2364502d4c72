"""The versioned model zoo: list, show, verify, publish, TF Serving config.

One module per concern, each the only owner of its part of the format:

- `manifest`: where the zoo is, names and ``NAME[@N]`` references,
  ``MANIFEST.json`` (the only module that changes its structure), listing;
- `storage`: the root's lock, hidden staging folders, checksums and sizes;
- `savedmodel`: the version directory (SavedModel + ``assets.extra``) and its signatures;
- `card`: the `ModelCard` schema (``assets.extra/metadata.json``);
- `publish`: `export_version` (stage, atomic rename, register);
- `retire`: `retire_version` (rename out, record in the manifest, regenerate the
  TF Serving config);
- `verify`: checksums and loading checks;
- `serving`: TF Serving's ``models.config``.

The zoo stores and checks; turning a user's reference into a Keras model is
`iterconv_keras.loading`'s job (``loading.load_model("NAME@N")``), which
imports the zoo, never the reverse. Nothing here imports TensorFlow at import
time, so ``iterconv zoo list`` and ``zoo show`` stay fast.

Example:
    >>> from iterconv_keras import zoo
    >>> [row["name"] for row in zoo.list_pretrained()][:1]
    ['digitclutter-small']
    >>> zoo.show("fashion-mnist-small")["card"].metrics["accuracy"]
    0.8823000192642212
"""

from iterconv_keras.zoo.card import ModelCard
from iterconv_keras.zoo.manifest import (
    ENV_VAR,
    MANIFEST,
    contains,
    existing_root,
    in_checkout,
    list_pretrained,
    parse_reference,
    read_manifest,
    resolve,
    resolve_root,
    show,
    validate_name,
    writable_root,
)
from iterconv_keras.zoo.publish import export_version
from iterconv_keras.zoo.retire import retire_version
from iterconv_keras.zoo.serving import CONTAINER_BASE_PATH, SERVING_CONFIG, refresh_zoo_config, serving_config
from iterconv_keras.zoo.storage import file_checksums
from iterconv_keras.zoo.verify import check_files, load_serving, raise_on_problems, verified, verify, verify_report

__all__ = [
    "CONTAINER_BASE_PATH", "ENV_VAR", "MANIFEST", "SERVING_CONFIG", "ModelCard", "check_files", "contains",
    "existing_root", "export_version", "file_checksums", "in_checkout", "list_pretrained", "load_serving",
    "parse_reference", "raise_on_problems", "read_manifest", "refresh_zoo_config", "resolve", "resolve_root",
    "retire_version", "serving_config", "show", "validate_name", "verified", "verify", "verify_report",
    "writable_root",
]
