"""Digit debris: one target digit among small fragments of digits.

Spoerer, McClure & Kriegeskorte (2017, Front. Psychol. 8:1551) tested their networks on
"debris" sets: one digit drawn as in Digitclutter plus 10, 30 or 50 fragments cut from
digit glyphs, so the target is partly hidden by clutter that is made of digit parts
but is no digit. Their public ``digitclutter`` package (``generate.make_debris`` and
``add_debris``) renders each glyph once at 512x512, scales it to 32x32, cuts a
random square of 6..9 output pixels out of it, pastes that square at a random place
inside the canvas through a binarised mask (the glyph's pixels only), and pastes the
fragments over the rendered digit, later fragments over earlier ones.

Our operationalisation follows that recipe, with these choices (documented in
``docs/datasets.md`` and recorded in ``info``):

- The target is one digit drawn exactly as Digitclutter draws it (same font, outline,
  jitter ranges, hi-res rendering; `digitclutter.params_from_uniforms`). Its label is
  its identity: a single-label, 10-class task.
- Each fragment is an axis-aligned square crop of a uniformly chosen digit glyph (any
  of the ten, the target's own included, as in the original), side
  ``U{6..9}`` output pixels at 32x32 (scaled with ``image_size``), with the crop's
  corner uniform over the glyph's ink box in hi-res pixels, so fragments show any
  sub-pixel phase of the glyph. It is placed with its corner uniform over the whole
  output pixels that keep it inside the canvas.
- A fragment pixel is drawn where the glyph's outline covers at least half of it (the
  original thresholded its down-scaled mask at 127 of 255); its grey is the glyph's
  block mean on the mid-grey canvas, so the fragment carries the black face, the white
  outline and their anti-aliased mix, as the original's crops do.
- All fragments are drawn in front of the target (the original's ``add_debris``
  overwrites the digit image wherever the debris mask is set), so they occlude it;
  this is what makes the task harder as fragments are added.
- Fragment counts are exactly 10, 30 or 50, the levels the spec names (the original
  package's light and default debris scripts use 10 and 50).

How it is fast: the target is `digitclutter.render`; a fragment's pixels are read
from tables, built once per process from Digitclutter's coverage tables, that hold
each digit's output-resolution grey and mask for each of the 16x16 sub-pixel phases,
and are scattered into the batch of canvases, vectorised over images. Because
fragments are pasted whole output pixel by whole output pixel (as in the original),
the fast path only differs from a full hi-res PIL render (`render_reference`) by
PIL's 8-bit rounding of the anti-aliased outline.

Determinism: as Digitclutter, block b of 4096 images draws from
``numpy.random.default_rng([seed, block])``, one row of uniforms per image (the
target's Digitclutter columns first, then six per fragment), so the same seed gives
the same bytes and a smaller count is a prefix of a larger one.
"""

import dataclasses
import functools

import numpy as np

from iterconv_keras.data import digitclutter as dc
from iterconv_keras.data import glyphs

FRAGMENT_COUNTS = (10, 30, 50)
# Fragment side in output pixels per output pixel of image size: 6..9 at 32x32, the
# original's ``debris_size=[6, 9]``.
FRAGMENT_SIZE_PER_PIXEL = (6 / 32, 9 / 32)
# Uniforms per fragment: digit, side, crop row, crop column, canvas row, canvas column.
_FRAGMENT_UNIFORMS = 6


@dataclasses.dataclass
class Debris:
    """A generated debris set.

    Attributes:
        images: uint8 ``[N, S, S, 1]`` greyscale images.
        labels: int64 ``[N]`` the target digit of each image.
        info: dict with the font (file, sha256), target and fragment recipe, and seed.
    """

    images: np.ndarray
    labels: np.ndarray
    info: dict


@dataclasses.dataclass
class Params:
    """Per-image drawing parameters, shared by the fast and the reference renderer.

    Attributes:
        target: `digitclutter.Params` of the one target digit per image.
        digits: int ``[N, k]`` glyph each fragment is cut from, in drawing order.
        sizes: int ``[N, k]`` fragment side in output pixels.
        crop_top: int ``[N, k]`` hi-res row of the crop's corner inside the glyph's box.
        crop_left: int ``[N, k]`` hi-res column of the crop's corner inside the glyph's box.
        top: int ``[N, k]`` output row of the fragment's corner on the canvas.
        left: int ``[N, k]`` output column of the fragment's corner on the canvas.
    """

    target: dc.Params
    digits: np.ndarray
    sizes: np.ndarray
    crop_top: np.ndarray
    crop_left: np.ndarray
    top: np.ndarray
    left: np.ndarray

    @property
    def image_size(self):
        """Output side length in pixels."""
        return self.target.image_size


def fragment_size_range(image_size):
    """Smallest and largest fragment side in output pixels: ``(6, 9)`` at 32x32."""
    low, high = (max(1, int(round(r * image_size))) for r in FRAGMENT_SIZE_PER_PIXEL)
    return low, high


def validate_fragments(n_fragments, name="n_fragments"):
    """Raise ``ValueError`` naming ``name`` and echoing the value unless it is 10, 30 or 50.

    The debris levels the spec names after Spoerer et al. (2017); other counts are
    not standard sets, so they are refused rather than silently generated.
    """
    if isinstance(n_fragments, bool) or not isinstance(n_fragments, (int, np.integer)) or (
        n_fragments not in FRAGMENT_COUNTS
    ):
        levels = ", ".join(map(str, FRAGMENT_COUNTS))
        raise ValueError(f"{name} must be one of {levels} (the debris levels), got {n_fragments!r}")
    return int(n_fragments)


def _validate(n_fragments, count, image_size, seed):
    validate_fragments(n_fragments)
    dc.validate_generation(count, image_size, seed)


def _uniform_int(uniforms, low, high):
    """Integers uniform in ``low..high`` (inclusive, element-wise) from U[0, 1) numbers."""
    span = high - low + 1
    return low + np.minimum(np.floor(uniforms * span).astype(np.int64), span - 1)


def sample_params(n_fragments, count, rng, image_size=32):
    """Draw the target digit and the fragments of ``count`` images.

    Args:
        n_fragments: fragments per image.
        count: number of images.
        rng: a ``numpy.random.Generator``; one row of uniforms per image (Digitclutter's
            columns for one digit, then six per fragment), so image i's parameters do
            not depend on how many images are drawn after it.
        image_size: output side length.

    Returns:
        `Params`.
    """
    head = dc.uniforms_per_image(1)
    uniforms = rng.random((count, head + _FRAGMENT_UNIFORMS * n_fragments))
    target = dc.params_from_uniforms(uniforms[:, :head], 1, image_size)
    u = uniforms[:, head:].reshape(count, n_fragments, _FRAGMENT_UNIFORMS)
    masks = glyphs.glyph_masks(image_size)
    heights = np.array([a.shape[0] for a in masks.outline])
    widths = np.array([a.shape[1] for a in masks.outline])
    low, high = fragment_size_range(image_size)
    digits = _uniform_int(u[..., 0], 0, 9)
    sizes = _uniform_int(u[..., 1], low, high)
    span = glyphs.RENDER_SCALE * sizes
    # The crop stays inside the glyph's ink box; every side fits (the narrowest glyph,
    # "1", is about 13.6 output pixels wide at 32x32, fragments at most 9).
    crop_top = _uniform_int(u[..., 2], 0, np.maximum(heights[digits] - span, 0))
    crop_left = _uniform_int(u[..., 3], 0, np.maximum(widths[digits] - span, 0))
    top = _uniform_int(u[..., 4], 0, image_size - sizes)
    left = _uniform_int(u[..., 5], 0, image_size - sizes)
    return Params(target, digits, sizes, crop_top, crop_left, top, left)


@dataclasses.dataclass
class _FragmentTable:
    """Output-resolution grey of each digit at each sub-pixel phase, -1 where not drawn.

    ``grey`` is int16 ``[10 * q * q, hc + 1, wc + 1]`` flattened; row ``hc`` and column
    ``wc`` are all -1 so that window cells beyond a fragment's side read "not drawn".
    """

    grey: np.ndarray  # int16, flat
    rows: int  # hc + 1
    cols: int  # wc + 1


@functools.lru_cache(maxsize=8)
def _fragment_table(image_size):
    tables = glyphs.coverage_tables(image_size)
    masks = glyphs.glyph_masks(image_size)
    q = glyphs.RENDER_SCALE
    _, _, _, hc, wc = tables.keep.shape
    grey = np.full((10, q, q, hc + 1, wc + 1), -1, np.int16)
    for digit in range(10):
        value = np.clip(np.floor(dc.BACKGROUND * tables.keep[digit] + tables.add[digit] + 0.5), 0, 255)
        # At least half covered, from the exact integer coverage (the original's mask
        # threshold was 127 of 255 after down-scaling).
        covered = 2 * glyphs.phase_coverage(masks.outline[digit], q, hc, wc) >= 255 * q * q
        grey[digit, :, :, :hc, :wc] = np.where(covered, value, -1)
    return _FragmentTable(grey.reshape(-1), hc + 1, wc + 1)


def render(params):
    """Composite images from `Params`: the target, then each fragment in front (fast path).

    Args:
        params: drawing parameters from `sample_params`.

    Returns:
        uint8 ``[N, S, S]`` images.
    """
    out = dc.render(params.target)
    count, n_fragments = params.digits.shape
    if n_fragments == 0:
        return out
    size = params.image_size
    table = _fragment_table(size)
    q = glyphs.RENDER_SCALE
    side = fragment_size_range(size)[1]
    # The canvas is padded by one fragment side so that windows never leave it.
    pad = size + side
    window = np.arange(side)
    for start in range(0, count, dc._BATCH):
        stop = min(start + dc._BATCH, count)
        canvas = np.zeros((stop - start, pad, pad), np.uint8)
        canvas[:, :size, :size] = out[start:stop]
        flat = canvas.reshape(-1)
        base = (np.arange(stop - start) * pad * pad)[:, None, None]
        for k in range(n_fragments):
            grey = _fragment_pixels(params, table, slice(start, stop), k, window, q)
            rows = (params.top[start:stop, k, None] + window)[:, :, None]
            cols = (params.left[start:stop, k, None] + window)[:, None, :]
            drawn = grey >= 0
            flat[(base + rows * pad + cols)[drawn]] = grey[drawn]
        out[start:stop] = canvas[:, :size, :size]
    return out


def _fragment_pixels(params, table, rows_of, k, window, q):
    """int16 ``[B, side, side]`` greys of fragment k of images ``rows_of``; -1: not drawn."""
    digit = params.digits[rows_of, k]
    size = params.sizes[rows_of, k]
    crop_top = params.crop_top[rows_of, k]
    crop_left = params.crop_left[rows_of, k]
    # Cropping at hi-res offset c puts the glyph's box at phase (-c mod q) of the
    # fragment's first cell, and its cell r at table row r + ceil(c / q).
    phase = ((-crop_top) % q * q + (-crop_left) % q) + digit * q * q
    inside = window[None, :] < size[:, None]
    rows = np.where(inside, window + (-(-crop_top // q))[:, None], table.rows - 1)
    cols = np.where(inside, window + (-(-crop_left // q))[:, None], table.cols - 1)
    index = (phase[:, None, None] * table.rows + rows[:, :, None]) * table.cols + cols[:, None, :]
    return table.grey[index]


def render_reference(params):
    """Straightforward renderer: everything drawn with PIL on the full hi-res canvas.

    The target is drawn as `digitclutter.render_reference` draws it. Each fragment's
    glyph is drawn with PIL into a hi-res layer the size of its crop, shifted by the
    crop offset; its outline coverage is drawn the same way; the layer's 16x16 blocks
    that are at least half covered replace the canvas's blocks at the fragment's
    place. The canvas is block-averaged at the end. About a hundred times slower than
    `render`; used to prove its fidelity.

    Args:
        params: drawing parameters from `sample_params`.

    Returns:
        uint8 ``[N, S, S]`` images.
    """
    from PIL import Image, ImageDraw

    size = params.image_size
    q = glyphs.RENDER_SCALE
    font = glyphs.pil_font(size)
    stroke = glyphs.stroke_width(size)
    masks = glyphs.glyph_masks(size)
    out = np.empty((params.digits.shape[0], size, size), np.uint8)
    for i in range(out.shape[0]):
        image = Image.new("L", (q * size, q * size), dc.BACKGROUND)
        digit = int(params.target.digits[i, 0])
        dy, dx = masks.origin[digit]
        origin = (int(params.target.left[i, 0] + dx), int(params.target.top[i, 0] + dy))
        glyphs.draw_digit(ImageDraw.Draw(image), origin, digit, font, stroke, dc.FACE, dc.EDGE)
        canvas = np.array(image)
        for k in range(params.digits.shape[1]):
            digit, side = int(params.digits[i, k]), int(params.sizes[i, k])
            dy, dx = masks.origin[digit]
            origin = (int(dx - params.crop_left[i, k]), int(dy - params.crop_top[i, k]))
            layer = Image.new("L", (q * side, q * side), dc.BACKGROUND)
            glyphs.draw_digit(ImageDraw.Draw(layer), origin, digit, font, stroke, dc.FACE, dc.EDGE)
            alpha = Image.new("L", (q * side, q * side), 0)
            glyphs.draw_digit(ImageDraw.Draw(alpha), origin, digit, font, stroke, 255, 255)
            # A block mean >= 128 after rounding half up is a mean >= 127.5: half covered.
            covered = np.kron(glyphs.block_mean(np.asarray(alpha), side) >= 128, np.ones((q, q), bool))
            top, left = q * int(params.top[i, k]), q * int(params.left[i, k])
            region = canvas[top : top + q * side, left : left + q * side]
            region[covered] = np.asarray(layer)[covered]
        out[i] = glyphs.block_mean(canvas, size)
    return out


def recipe_info(n_fragments, seed, image_size=32):
    """The parameters that define a generated debris set, for provenance records."""
    info = dc.recipe_info(1, seed, image_size)
    del info["n_digits"]
    info.update(
        generator="iterconv_keras.data.debris",
        reference=(
            "Spoerer, McClure & Kriegeskorte (2017), Front. Psychol. 8:1551 (debris sets); "
            "iterconv's operationalisation, see docs/datasets.md"
        ),
        target_digits=1,
        n_fragments=int(n_fragments),
        fragment_size_range=list(fragment_size_range(image_size)),
        fragment_digits="uniform over 0..9",
        fragment_crop="square, corner uniform over the glyph's ink box in hi-res pixels",
        fragment_placement="corner uniform over whole output pixels, fully inside the canvas",
        fragment_mask="output pixels at least half covered by the glyph outline",
        fragments_in_front=True,
    )
    return info


def generate(n_fragments, count, seed, *, image_size=32, progress=None):
    """Generate a debris set deterministically from a seed.

    Args:
        n_fragments: int, fragments per image: 10, 30 or 50.
        count: int, number of images.
        seed: int (non-negative); streams per 4096-image block as in
            `digitclutter.generate`: same seed and font file, same bytes; fewer
            images, a prefix.
        image_size: int, output side in pixels, default 32 (8..128); fragment sides
            scale with it.
        progress: optional callable called with the number of images done.

    Returns:
        `Debris` with images ``[N, S, S, 1]`` uint8, int64 target labels and ``info``.

    Example:
        >>> debris = generate(30, 1000, seed=1)
        >>> debris.images.shape, debris.labels.dtype, int(debris.labels.max())
        ((1000, 32, 32, 1), dtype('int64'), 9)

    Reference: Spoerer, McClure & Kriegeskorte (2017), Front. Psychol. 8:1551; the
    recipe is our operationalisation of their debris sets (see the module docstring).
    """
    _validate(n_fragments, count, image_size, seed)
    images = np.empty((count, image_size, image_size, 1), np.uint8)
    labels = np.empty(count, np.int64)
    for block, start in enumerate(range(0, count, dc._SEED_BLOCK)):
        stop = min(start + dc._SEED_BLOCK, count)
        params = sample_params(n_fragments, stop - start, np.random.default_rng([seed, block]), image_size)
        images[start:stop, :, :, 0] = render(params)
        labels[start:stop] = params.target.digits[:, 0]
        if progress is not None:
            progress(stop)
    return Debris(images, labels, recipe_info(n_fragments, seed, image_size))


def generate_blocks(n_fragments, count, seed, *, image_size=32):
    """The set `generate` makes, one 4096-image stream block at a time.

    Args:
        n_fragments, count, seed, image_size: as for `generate`.

    Yields:
        ``(images uint8 [b, S, S, 1], labels int64 [b])``; concatenated they equal
        ``generate(n_fragments, count, seed).images`` and ``.labels``.
    """
    _validate(n_fragments, count, image_size, seed)
    for block, start in enumerate(range(0, count, dc._SEED_BLOCK)):
        params = sample_params(
            n_fragments, min(dc._SEED_BLOCK, count - start), np.random.default_rng([seed, block]), image_size
        )
        yield render(params)[..., None], params.target.digits[:, 0].astype(np.int64)
