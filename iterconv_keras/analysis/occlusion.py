"""Occlusion robustness: seeded patch occlusion, clutter digit counts, iterations under occlusion.

docs/indices.md, "Occlusion robustness". Recurrence was expected to help recognition under
occlusion (Spoerer, McClure & Kriegeskorte 2017, Front. Psychol. 8:1551); these
evaluators measure it for a trained model:

- `patch_masks` / `occlude`: a fraction p of every image is covered by square
  patches filled with the dataset mean. Masks are a pure function of (seed,
  level, image index), so a subset (``--limit``) sees the same masks as the
  full set and the same seed always gives the same masks.
- `occlusion_sweep`: accuracy per level and the normalised area under the
  curve ``AUC = mean_p A(p) / A(0)``.
- `clutter_sweep`: exact-set accuracy of a Digitclutter model on 2..5-digit sets.
- `debris_sweep`: accuracy of a debris model with 10, 30 and 50 fragments.
- `iteration_sweep`: accuracy versus K extra iterations of every stage's last
  block, on clean and on occluded inputs.

These are iterconv's operationalisations (Lippl, Peters & Kriegeskorte, PLoS
One 19(3): e0293440, 2024, evaluate occlusion on Digitclutter; the patch
protocol is ours), documented in ``docs/indices.md``.
"""

import numpy as np

from iterconv_keras.analysis.programs import StagePrograms, to_unit_float

DEFAULT_LEVELS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_SEED = 0
DEFAULT_ITERATIONS = (0, 1, 2, 4, 8, 16)
DEFAULT_ITERATION_LEVEL = 0.3
CLUTTER_DIGITS = (2, 3, 4, 5)
# Debris levels of the debris sweep (`debris.FRAGMENT_COUNTS`; kept here so that
# importing this module does not build the glyph tables).
DEBRIS_FRAGMENTS = (10, 30, 50)

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def default_patch_size(image_shape):
    """Side of the square patches: an eighth of the shorter image side, at least 2."""
    return max(2, int(round(min(image_shape[0], image_shape[1]) / 8)))


def patch_masks(count, height, width, level, *, patch_size, seed=DEFAULT_SEED, start=0):
    """Boolean occlusion masks ``[count, height, width]`` covering a fraction ``level``.

    Square patches of side ``patch_size`` are dropped at random positions (fully
    inside the image, overlaps allowed) until at least ``round(level * H * W)``
    pixels are covered; the last patch overshoots by less than one patch, so the
    covered fraction is within ``patch_size**2 / (H * W)`` of ``level``. Positions
    come from a counter-based hash of (seed, image index, patch number), the same
    sequence at every level, so the masks are **nested**: a level covers a prefix
    of the patches of any higher level, hence every pixel covered at level p is
    covered at every level above p, and the accuracy-versus-level curve carries
    no variance from independent masks. Image i's mask does not depend on how
    many images are masked with it.

    Args:
        count: number of masks.
        height, width: image size.
        level: fraction in [0, 1) to cover; 0 gives all-False masks.
        patch_size: side of the square patches, 1..min(height, width).
        seed: int seed of the positions. Default 0.
        start: index of the first image (masks for images start..start+count-1).
    """
    if not 0.0 <= float(level) < 1.0:
        raise ValueError(f"occlusion level must be in [0, 1), got {level!r}")
    if not isinstance(patch_size, (int, np.integer)) or not 1 <= patch_size <= min(height, width):
        raise ValueError(f"patch_size must be an int in [1, {min(height, width)}], got {patch_size!r}")
    masks = np.zeros((count, height, width), bool)
    target = int(round(level * height * width))
    if target == 0 or count == 0:
        return masks
    images = np.arange(start, start + count, dtype=np.uint64)
    covered = np.zeros(count, np.int64)
    offsets = np.arange(patch_size)
    rounds = 0
    while True:
        todo = np.flatnonzero(covered < target)
        if todo.size == 0:
            return masks
        key = _hash(np.uint64(seed), images[todo], np.uint64(rounds))
        rows = (key % np.uint64(height - patch_size + 1)).astype(np.int64)
        cols = ((key >> np.uint64(32)) % np.uint64(width - patch_size + 1)).astype(np.int64)
        r = (rows[:, None] + offsets)[:, :, None]
        c = (cols[:, None] + offsets)[:, None, :]
        masks[todo[:, None, None], r, c] = True
        covered[todo] = masks[todo].sum(axis=(1, 2))
        rounds += 1


def _hash(*parts):
    # splitmix64 over the parts in turn: cheap, vectorised and independent of batch.
    with np.errstate(over="ignore"):
        state = np.uint64(0x9E3779B97F4A7C15)
        for part in parts:
            state = _splitmix(np.asarray(state, np.uint64) ^ np.asarray(part, np.uint64))
        return state


def _splitmix(z):
    z = (z + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return z ^ (z >> np.uint64(31))


def occlude(images, level, fill, *, patch_size=None, seed=DEFAULT_SEED, start=0):
    """Images in [0, 1] (float32) with a fraction ``level`` covered by ``fill``.

    Args:
        images: ``[N, H, W, C]`` uint8 or float in [0, 1].
        level: fraction of the image area to cover, in [0, 1).
        fill: per-channel fill value(s) in [0, 1] units (the dataset mean).
        patch_size: patch side; default `default_patch_size`.
        seed: mask seed. Default 0.
        start: index of ``images[0]`` in the whole set (keeps masks stable in batches).
    """
    x = to_unit_float(images)
    if float(level) == 0.0:
        return x.copy()
    n, h, w, c = x.shape
    patch_size = default_patch_size((h, w)) if patch_size is None else patch_size
    masks = patch_masks(n, h, w, level, patch_size=patch_size, seed=seed, start=start)[..., None]
    fill = np.broadcast_to(np.asarray(fill, np.float32), (c,))
    return np.where(masks, fill, x).astype(np.float32)


def validate_levels(levels):
    """Return ``levels`` as a list of floats: 0.0 (clean) first, increasing, each in [0, 1).

    Raises:
        ValueError: naming the bad levels.
    """
    try:
        values = [float(p) for p in levels]
    except (TypeError, ValueError):
        raise ValueError(f"occlusion levels must be numbers, got {levels!r}") from None
    if not values or values[0] != 0.0:
        raise ValueError(f"occlusion levels must start with 0.0 (clean), got {values!r}")
    if any(b <= a for a, b in zip(values, values[1:], strict=False)) or values[-1] >= 1.0:
        raise ValueError(f"occlusion levels must increase and stay below 1, got {values!r}")
    return values


def area_under_curve(accuracies, levels=None):
    """Normalised area under the accuracy-versus-level curve, ``AUC / A(0)``.

    Each level's accuracy holds over its cell (from halfway to the previous
    level to halfway to the next; the end cells reach as far out as in), so
    for evenly spaced levels this is the mean accuracy over the levels divided
    by the clean accuracy, iterconv's definition (docs/indices.md), and for
    uneven levels it is still an area: a level's weight is the width of the
    interval it stands for, not 1/len(levels).

    Args:
        accuracies: accuracy per level; the first is the clean accuracy A(0).
        levels: the occluded fractions, increasing (default: evenly spaced).

    Returns:
        float; NaN when the clean accuracy is 0.
    """
    accuracies = np.asarray(accuracies, np.float64)
    clean = accuracies[0]
    if clean <= 0:
        return float("nan")
    if levels is None or len(accuracies) == 1:
        return float(np.mean(accuracies) / clean)
    levels = np.asarray(levels, np.float64)
    if levels.shape != accuracies.shape or np.any(np.diff(levels) <= 0):
        raise ValueError(f"levels must be increasing, one per accuracy; got {levels.tolist()!r}")
    gaps = np.diff(levels)
    widths = np.concatenate([[gaps[0]], (gaps[:-1] + gaps[1:]) / 2, [gaps[-1]]]) if len(gaps) > 1 else np.ones(2)
    return float(np.sum(widths * accuracies) / np.sum(widths) / clean)


def occlusion_sweep(model, x, y, fill, *, levels=DEFAULT_LEVELS, seed=DEFAULT_SEED, patch_size=None,
                    batch_size=256, programs=None, progress=None):
    """Accuracy (and loss) per occlusion level and the normalised AUC.

    Args:
        model: an `IterativeResNet`.
        x, y: images and labels.
        fill: per-channel fill in [0, 1] units (the dataset mean).
        levels: occluded fractions; the first must be 0 (clean). Default 0, 0.1 .. 0.5.
        seed, patch_size: see `patch_masks`.
        batch_size: examples per compiled call.
        programs: optional `StagePrograms` to reuse.
        progress: optional callable ``progress(batches_done)``.

    Returns:
        ``{"levels", "accuracy", "loss", "auc", "seed", "patch_size"}``.
    """
    levels = validate_levels(levels)
    programs = programs or StagePrograms(model)
    patch_size = default_patch_size(x.shape[1:3]) if patch_size is None else patch_size
    accuracy, loss = [], []
    for level in levels:
        occluded = occlude(x, level, fill, patch_size=patch_size, seed=seed)
        a, level_loss = programs.accuracy_and_loss(occluded, y, batch_size, progress=progress)
        accuracy.append(a)
        loss.append(level_loss)
    return {
        "levels": levels, "accuracy": accuracy, "loss": loss, "auc": area_under_curve(accuracy, levels),
        "seed": seed, "patch_size": patch_size,
    }


def clutter_sweep(model, count, *, digits=CLUTTER_DIGITS, batch_size=256, programs=None, progress=None):
    """Exact-set accuracy of a Digitclutter model on n-digit test sets, n in ``digits``.

    The sets are `generated.clutter_test_set` (fixed seeds, the first ``count`` images).

    Returns:
        ``{"2": acc, "3": acc, ...}``.
    """
    from iterconv_keras.data import generated

    return _accuracy_per_set(model, digits, generated.clutter_test_set, count, batch_size, programs, progress)


def debris_sweep(model, count, *, fragments=DEBRIS_FRAGMENTS, batch_size=256, programs=None, progress=None):
    """Accuracy of a debris model on the test sets with 10, 30 and 50 fragments.

    The sets are `generated.debris_test_set` (fixed seeds, the first ``count`` images):
    more fragments hide more of the target digit (Spoerer, McClure & Kriegeskorte,
    2017, Front. Psychol. 8:1551).

    Returns:
        ``{"10": acc, "30": acc, "50": acc}``.
    """
    from iterconv_keras.data import generated

    return _accuracy_per_set(model, fragments, generated.debris_test_set, count, batch_size, programs, progress)


def _accuracy_per_set(model, settings, test_set, count, batch_size, programs, progress):
    """``{str(n): accuracy on test_set(n, count)[:2]}`` for each n in ``settings``."""
    programs = programs or StagePrograms(model)
    result = {}
    for n in settings:
        images, labels, _ = test_set(n, count)
        result[str(n)] = programs.accuracy_and_loss(images, labels, batch_size, progress=progress)[0]
    return result


def extra_iteration_schedule(model, extra):
    """The trained schedule with every stage's last block applied ``extra`` more times."""
    return [list(range(len(blocks))) + [len(blocks) - 1] * extra for blocks in model.stages]


def iteration_sweep(model, x, y, fill, *, iterations=DEFAULT_ITERATIONS, level=DEFAULT_ITERATION_LEVEL,
                    seed=DEFAULT_SEED, patch_size=None, batch_size=256, programs=None, progress=None):
    """Accuracy versus extra iterations of the last blocks, on clean and occluded inputs.

    Every stage's last block is applied K more times at once (K in
    ``iterations``), so a user can see whether iterating longer helps when the
    inputs are occluded.

    Returns:
        ``{"extra_iterations", "clean", "occluded", "level"}`` (accuracies).
    """
    programs = programs or StagePrograms(model)
    occluded = occlude(x, level, fill, patch_size=patch_size, seed=seed)
    result = {"extra_iterations": [int(k) for k in iterations], "level": float(level), "clean": [], "occluded": []}
    for k in iterations:
        schedule = extra_iteration_schedule(model, int(k))
        result["clean"].append(programs.accuracy_and_loss(x, y, batch_size, schedule, progress)[0])
        result["occluded"].append(programs.accuracy_and_loss(occluded, y, batch_size, schedule, progress)[0])
    return result
