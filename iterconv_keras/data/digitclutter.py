"""Digitclutter: images of n distinct digits that partly occlude each other.

The recipe follows Spoerer, McClure & Kriegeskorte (2017, "Recurrent convolutional
neural networks: a better model of biological object recognition", Front. Psychol.
8:1551) and their public ``digitclutter`` package: a mid-grey (119) canvas of 512x512,
digits at font size 384 with a black face and a white outline of stroke width 20
(10 px outside the glyph), each at a uniform offset from the centre (x in
U(-0.29, 0.29) of the width, y in U(-0.19, 0.19) of the height), quantised to whole
pixels of the 512 canvas, no rotation or scaling, later digits drawn over earlier
ones, and the canvas block-averaged down to 32x32.

Our operationalisation (documented, see ``docs`` and ``info``): the font is DejaVu
Sans Bold from matplotlib (the original used Helvetica Bold through ImageMagick, not
available everywhere); each glyph is centred on its ink bounding box (the original's
``(0, 0.076)`` mean offset compensated ImageMagick's metric-based centring instead);
the hi-res canvas is ``16 * image_size`` on a side with font size ``12 * image_size``.

How it is fast: the full-size canvas is never built. Every glyph's outline and face
coverage is rendered once per process with PIL and turned, with an integral image,
into coverage tables at the output resolution for each of the 16x16 sub-pixel
phases (`iterconv_keras.data.glyphs`). An image is then composited with ``out <- out * (1 - o) + 255 * (o - f)``
per layer on 32x32 cells, vectorised over a batch. The only approximation is where
the edges of two digits meet inside one output pixel; the fidelity test bounds the
difference against a full-size PIL render.

Determinism: parameters come from ``numpy.random.default_rng([seed, block])`` in a fixed order;
coverage tables are integer sums; compositing uses only element-wise IEEE float64
operations (no reductions whose order could depend on the CPU), so the same seed
gives the same bytes on any machine with the same font file (its sha256 and a hash
of the rendered glyph tables are recorded in ``info``).
"""

import dataclasses

import numpy as np

from iterconv_keras.data import glyphs
from iterconv_keras.data.glyphs import FONT_FILE, FONT_SIZE_PER_PIXEL, RENDER_SCALE, block_mean, font_sha256

BACKGROUND = 119
FACE = 0
EDGE = 255
X_RANGE = (-0.29, 0.29)
Y_RANGE = (-0.19, 0.19)
MIN_DIGITS, MAX_DIGITS = 2, 5
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 128
# Images composited per vectorised batch: large enough to amortise numpy call
# overhead, small enough to stay in cache.
_BATCH = 512
# Images per independent random stream (see `generate`).
_SEED_BLOCK = 4096


@dataclasses.dataclass
class Clutter:
    """A generated Digitclutter set.

    Attributes:
        images: uint8 ``[N, S, S, 1]`` greyscale images.
        labels: float32 ``[N, 10]`` multi-hot digit sets.
        order: int8 ``[N, n]`` digits in drawing order (the last is front-most).
        info: dict with the font (file, sha256), recipe parameters and seed.
    """

    images: np.ndarray
    labels: np.ndarray
    order: np.ndarray
    info: dict


@dataclasses.dataclass
class Params:
    """Per-image drawing parameters, shared by the fast and the reference renderer.

    Attributes:
        digits: int ``[N, n]`` digit identities in drawing order.
        top: int ``[N, n]`` hi-res row of each glyph box's top-left corner.
        left: int ``[N, n]`` hi-res column of each glyph box's top-left corner.
        image_size: output side length in pixels.
    """

    digits: np.ndarray
    top: np.ndarray
    left: np.ndarray
    image_size: int


def validate(n_digits, count, image_size, seed=0):
    """Raise ``ValueError`` echoing a bad digit count, image count, image size or seed.

    Public so that a caller can refuse bad settings before a long generation
    (``iterconv data digitclutter`` does).
    """
    if isinstance(n_digits, bool) or not isinstance(n_digits, (int, np.integer)):
        raise ValueError(f"n_digits must be an integer in {MIN_DIGITS}..{MAX_DIGITS}, got {n_digits!r}")
    if not MIN_DIGITS <= n_digits <= MAX_DIGITS:
        raise ValueError(f"n_digits must be in {MIN_DIGITS}..{MAX_DIGITS}, got {n_digits!r}")
    validate_generation(count, image_size, seed)


def validate_generation(count, image_size, seed):
    """Raise ``ValueError`` echoing a bad count, image size or seed (shared with `debris`)."""
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)):
        raise ValueError(f"image_size must be an integer, got {image_size!r}")
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image_size must be in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}, got {image_size!r}")


def sample_params(n_digits, count, rng, image_size=32):
    """Draw digit identities and positions for ``count`` images.

    Args:
        n_digits: digits per image (distinct), 2..5.
        count: number of images.
        rng: a ``numpy.random.Generator``; one row of ``10 + 2n`` uniforms per image.
        image_size: output side length (the hi-res canvas is 16 times larger).

    Returns:
        `Params` with hi-res top-left corners of each glyph's box.
    """
    # One row of uniforms per image (10 sort keys, n x, n y), so the parameters of
    # image i do not depend on how many images are drawn after it.
    return params_from_uniforms(rng.random((count, uniforms_per_image(n_digits))), n_digits, image_size)


def uniforms_per_image(n_digits):
    """How many uniforms `params_from_uniforms` consumes per image: 10 sort keys, n x, n y."""
    return 10 + 2 * n_digits


def params_from_uniforms(uniforms, n_digits, image_size=32):
    """Map rows of U[0, 1) numbers to digit identities and positions (see `sample_params`).

    Exposed so other generators (`iterconv_keras.data.debris`) draw their digits exactly
    as Digitclutter does, from columns of their own per-image rows.

    Args:
        uniforms: float ``[N, uniforms_per_image(n_digits)]`` in [0, 1).
        n_digits: digits per image (distinct).
        image_size: output side length.

    Returns:
        `Params`.
    """
    # Distinct digits: the first n of a random permutation per image (stable
    # argsort so ties, however unlikely, resolve identically everywhere).
    digits = np.argsort(uniforms[:, :10], axis=1, kind="stable")[:, :n_digits]
    dx = X_RANGE[0] + (X_RANGE[1] - X_RANGE[0]) * uniforms[:, 10 : 10 + n_digits]
    dy = Y_RANGE[0] + (Y_RANGE[1] - Y_RANGE[0]) * uniforms[:, 10 + n_digits :]
    side = RENDER_SCALE * image_size
    masks = glyphs.glyph_masks(image_size)
    heights = np.array([a.shape[0] for a in masks.outline])
    widths = np.array([a.shape[1] for a in masks.outline])
    # Positions are whole hi-res pixels, as in the original (int(size * offset)).
    centre_y = side // 2 + np.floor(dy * side + 0.5).astype(np.int64)
    centre_x = side // 2 + np.floor(dx * side + 0.5).astype(np.int64)
    top = centre_y - heights[digits] // 2
    left = centre_x - widths[digits] // 2
    return Params(digits.astype(np.int64), top, left, image_size)


def render(params):
    """Composite images from `Params` with the pre-computed coverage tables (fast path).

    Args:
        params: drawing parameters from `sample_params`.

    Returns:
        uint8 ``[N, S, S]`` images.
    """
    tables = glyphs.coverage_tables(params.image_size)
    q = RENDER_SCALE
    size = params.image_size
    _, _, _, hc, wc = tables.keep.shape
    count, n_digits = params.digits.shape
    # A margin of one table on every side lets glyphs hang off the canvas edges.
    margin = max(hc, wc)
    cells_y = np.floor_divide(params.top, q)
    cells_x = np.floor_divide(params.left, q)
    phase_y = params.top - q * cells_y
    phase_x = params.left - q * cells_x
    out = np.empty((count, size, size), np.uint8)
    rows_offset = np.arange(hc)[None, :, None]
    cols_offset = np.arange(wc)[None, None, :]
    for start in range(0, count, _BATCH):
        stop = min(start + _BATCH, count)
        batch = np.arange(stop - start)[:, None, None]
        canvas = np.full((stop - start, size + 2 * margin, size + 2 * margin), float(BACKGROUND))
        for k in range(n_digits):
            d = params.digits[start:stop, k]
            py, px = phase_y[start:stop, k], phase_x[start:stop, k]
            rows = (cells_y[start:stop, k] + margin)[:, None, None] + rows_offset
            cols = (cells_x[start:stop, k] + margin)[:, None, None] + cols_offset
            region = canvas[batch, rows, cols]
            canvas[batch, rows, cols] = region * tables.keep[d, py, px] + tables.add[d, py, px]
        core = canvas[:, margin : margin + size, margin : margin + size]
        out[start:stop] = np.clip(np.floor(core + 0.5), 0, 255).astype(np.uint8)
    return out


def render_reference(params):
    """Straightforward renderer: draw every digit with PIL on the full hi-res canvas.

    Used to prove the fast path's fidelity; about a hundred times slower.

    Args:
        params: drawing parameters from `sample_params`.

    Returns:
        uint8 ``[N, S, S]`` images (block means of the 16x16 hi-res pixels, rounded).
    """
    from PIL import Image, ImageDraw

    size = params.image_size
    side = RENDER_SCALE * size
    font = glyphs.pil_font(size)
    stroke = glyphs.stroke_width(size)
    masks = glyphs.glyph_masks(size)
    out = np.empty((params.digits.shape[0], size, size), np.uint8)
    for i, digits in enumerate(params.digits):
        image = Image.new("L", (side, side), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for k, digit in enumerate(digits):
            dy, dx = masks.origin[digit]
            origin = (int(params.left[i, k] + dx), int(params.top[i, k] + dy))
            glyphs.draw_digit(draw, origin, int(digit), font, stroke, FACE, EDGE)
        out[i] = block_mean(np.asarray(image), size)
    return out


def recipe_info(n_digits, seed, image_size=32):
    """The parameters that define a generated set, for provenance records."""
    return {
        "generator": "iterconv_keras.data.digitclutter",
        "reference": "Spoerer, McClure & Kriegeskorte (2017), Front. Psychol. 8:1551",
        "n_digits": int(n_digits),
        "seed": int(seed),
        "image_size": int(image_size),
        "render_size": RENDER_SCALE * int(image_size),
        "font_file": FONT_FILE,
        "font_sha256": font_sha256(),
        "font_size": FONT_SIZE_PER_PIXEL * int(image_size),
        "stroke_width": glyphs.stroke_width(image_size),
        "background": BACKGROUND,
        "face": FACE,
        "edge": EDGE,
        "x_offset_range": list(X_RANGE),
        "y_offset_range": list(Y_RANGE),
        "glyph_tables_sha256": glyphs.coverage_tables(image_size).sha256,
    }


def generate(n_digits, count, seed, *, image_size=32, progress=None):
    """Generate a Digitclutter set deterministically from a seed.

    Args:
        n_digits: int, distinct digits per image, 2..5 (Spoerer et al. used 3, 4, 5).
        count: int, number of images.
        seed: int (non-negative); block b of 4096 images draws from
            ``numpy.random.default_rng([seed, b])``, so the same seed gives the same
            bytes on any machine with the same font file, and a smaller count gives
            a prefix of a larger one.
        image_size: int, output side in pixels, default 32 (8..128).
        progress: optional callable receiving the number of images done so far.

    Returns:
        `Clutter` with images ``[N, S, S, 1]`` uint8, multi-hot labels, drawing order
        and ``info``.

    Example:
        >>> clutter = generate(3, 1000, seed=1)
        >>> clutter.images.shape, clutter.labels.sum(axis=1).max()
        ((1000, 32, 32, 1), 3.0)

    Reference: Spoerer, McClure & Kriegeskorte (2017), Front. Psychol. 8:1551.
    """
    validate(n_digits, count, image_size, seed)
    images = np.empty((count, image_size, image_size, 1), np.uint8)
    digits = np.empty((count, n_digits), np.int64)
    # Each block of images has its own stream, default_rng([seed, block]), so a
    # smaller count gives a prefix of a larger one and chunking cannot change bytes.
    for block, start in enumerate(range(0, count, _SEED_BLOCK)):
        stop = min(start + _SEED_BLOCK, count)
        params = sample_params(n_digits, stop - start, np.random.default_rng([seed, block]), image_size)
        images[start:stop, :, :, 0] = render(params)
        digits[start:stop] = params.digits
        if progress is not None:
            progress(stop)
    return Clutter(images, _multi_hot(digits), digits.astype(np.int8), recipe_info(n_digits, seed, image_size))


def _multi_hot(digits):
    labels = np.zeros((digits.shape[0], 10), np.float32)
    np.put_along_axis(labels, digits, 1.0, axis=1)
    return labels


def generate_blocks(n_digits, count, seed, *, image_size=32):
    """The set `generate` makes, one 4096-image stream block at a time.

    For a training pipeline that draws new images every epoch: it holds one
    block in memory instead of the whole set and can hand out the first images
    while the rest are still being made.

    Args:
        n_digits, count, seed, image_size: as for `generate`.

    Yields:
        ``(images uint8 [b, S, S, 1], labels float32 [b, 10])``; concatenated they
        equal ``generate(n_digits, count, seed).images`` and ``.labels``.
    """
    validate(n_digits, count, image_size, seed)
    for block, start in enumerate(range(0, count, _SEED_BLOCK)):
        params = sample_params(
            n_digits, min(_SEED_BLOCK, count - start), np.random.default_rng([seed, block]), image_size
        )
        yield render(params)[..., None], _multi_hot(params.digits)
