"""The generated-set file: what ``iterconv data digitclutter|debris --out F.npz`` writes.

One module owns the format, its writer (`save_npz`) and its reader (`load_npz`),
which checks everything a training or evaluation run relies on. A file holds

    images  uint8 [N, S, S, 1]
    labels  float32 [N, 10] multi-hot (Digitclutter) or int64 [N] in 0..9 (debris)
    order   int8 [N, n_digits], Digitclutter only: drawing order, last is front-most
    info    a JSON string: the generator's recipe and seed (``recipe_info``)

``info["generator"]`` says which generator made the set and so which dataset it
belongs to; ``info["n_digits"]`` or ``info["n_fragments"]`` its level. A file is
written to a temporary name and renamed, so a reader never sees half a file.
Generated sets are prefix-stable (the first k images of a set of N are the set of
k with the same seed), which `datasets.load` relies on to carve splits from a file.
"""

import dataclasses
import json
import os
import zipfile

import numpy as np

from iterconv_keras import errors, fsutil

# Generator module -> (dataset name, the info key holding its level).
GENERATORS = {
    "iterconv_keras.data.digitclutter": ("digitclutter", "n_digits"),
    "iterconv_keras.data.debris": ("digitdebris", "n_fragments"),
}
# Dataset -> (what its level counts, the setting that asks for a level: `datasets.load`'s
# and `TrainConfig`'s keyword), for the message when a file holds another level.
_LEVEL_SETTINGS = {"digitclutter": ("digits", "clutter_digits"), "digitdebris": ("fragments", "debris_fragments")}


@dataclasses.dataclass(frozen=True)
class SetFile:
    """A generated set read from a file.

    Attributes:
        dataset: ``"digitclutter"`` or ``"digitdebris"``.
        level: digits per image (Digitclutter) or fragments per image (debris).
        images: uint8 [N, S, S, 1].
        labels: float32 [N, 10] multi-hot, or int64 [N].
        info: the generator's recipe and seed.
        path: the file read.
    """

    dataset: str
    level: int
    images: np.ndarray
    labels: np.ndarray
    info: dict
    path: str


def save_npz(path, generated):
    """Write a generated set (``digitclutter.generate`` or ``debris.generate`` output) to ``path``.

    Args:
        path: the ``.npz`` file to write (atomically).
        generated: an object with ``images``, ``labels``, ``info`` and, for
            Digitclutter, ``order``.
    """
    arrays = {"images": generated.images, "labels": generated.labels}
    if getattr(generated, "order", None) is not None:
        arrays["order"] = generated.order
    with fsutil.atomic_file(path, "wb", suffix=".npz") as stream:
        np.savez_compressed(stream, **arrays, info=np.array(json.dumps(generated.info)))


def load_npz(path, dataset=None, level=None):
    """Read and check a generated-set file.

    Args:
        path: the ``.npz`` file.
        dataset: if given, the dataset the caller expects (``digitclutter`` or
            ``digitdebris``); a file of the other generator is refused.
        level: if given, the digits (Digitclutter) or fragments (debris) per image
            the caller expects.

    Returns:
        `SetFile`.

    Raises:
        DatasetNotAvailable: the file does not exist or cannot be read (exit 3).
        IntegrityError: the file is not a generated set or its arrays contradict
            each other (exit 5); the message names the file and what is wrong.
        UsageError: an intact file that is not the set the caller asked for (another
            generator or level: the options contradict the file, exit 2).
    """
    if not os.path.isfile(path):
        raise errors.DatasetNotAvailable(f"data file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            contents = {key: npz[key] for key in npz.files}
    except OSError as exc:
        raise errors.DatasetNotAvailable(f"cannot read data file {path}: {exc.strerror or exc}") from exc
    except (ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise errors.IntegrityError(f"data file {path} is not an .npz file: {exc}") from exc

    def bad(problem):
        return errors.IntegrityError(f"data file {path} is not a generated set from `iterconv data`: {problem}")

    missing = sorted({"images", "labels", "info"} - set(contents))
    if missing:
        raise bad(f"missing {', '.join(missing)} (it has {', '.join(sorted(contents)) or 'nothing'})")
    try:
        info = json.loads(str(contents["info"]))
    except ValueError as exc:
        raise bad(f"info is not JSON ({exc})") from None
    generator = info.get("generator") if isinstance(info, dict) else None
    if generator not in GENERATORS:
        raise bad(f"info names no known generator (generator {generator!r})")
    name, level_key = GENERATORS[info["generator"]]
    found_level = info.get(level_key)
    images, labels = contents["images"], contents["labels"]
    n = images.shape[0] if images.ndim else 0
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 1 or images.shape[1] != images.shape[2]:
        raise bad(f"images have shape {images.shape} {images.dtype}, expected [N, S, S, 1] uint8")
    if name == "digitclutter":
        _check_clutter_labels(labels, n, found_level, contents.get("order"), bad)
    elif (labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer)
          or (n and not (labels.min() >= 0 and labels.max() <= 9))):
        raise bad(f"labels have shape {labels.shape} {labels.dtype}, expected [{n}] integers in 0..9")
    if dataset is not None and dataset != name:
        raise errors.UsageError(f"data file {path} holds a {name} set, not one for dataset={dataset!r}")
    if level is not None and level != found_level:
        counted, setting = _LEVEL_SETTINGS[name]
        raise errors.UsageError(f"data file {path} holds {found_level} {counted} per image, not {setting}={level}; "
                                f"pass {setting}={found_level} or another file")
    return SetFile(name, int(found_level), images, labels, info, path)


def _check_clutter_labels(labels, n, n_digits, order, bad):
    if labels.shape != (n, 10) or labels.dtype != np.float32:
        raise bad(f"labels have shape {labels.shape} {labels.dtype}, expected [{n}, 10] float32 multi-hot")
    if n and not (np.isin(labels, (0.0, 1.0)).all() and (labels.sum(axis=1) == n_digits).all()):
        raise bad(f"labels are not multi-hot with n_digits {n_digits!r} digits per image")
    if order is not None and order.shape != (n, n_digits):
        raise bad(f"order has shape {order.shape}, expected [{n}, {n_digits}]")
