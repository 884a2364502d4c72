"""The ten digit glyphs of the Digitclutter recipe, and their coverage at output resolution.

Spoerer, McClure & Kriegeskorte (2017, Front. Psychol. 8:1551) draw digits at font
size 384 with a 10-pixel white outline on a 512x512 canvas that is block-averaged
down to 32x32. Here that geometry is relative to the output size ``S``: a hi-res
canvas of ``RENDER_SCALE * S``, font size ``FONT_SIZE_PER_PIXEL * S`` and an outline
of ``STROKE_PER_PIXEL * S`` pixels. Our operationalisation: the font is DejaVu Sans
Bold from matplotlib (the original used Helvetica Bold through ImageMagick).

Every glyph's outline and face is rendered once per process with PIL
(`glyph_masks`) and turned, with an integral image, into coverage tables at the
output resolution for each of the 16x16 sub-pixel phases (`coverage_tables`), so
a generator composites whole images without building the hi-res canvas. The
tables are integer sums; their sha256 goes into a set's ``info``. Digitclutter
(`iterconv_keras.data.digitclutter`) and debris (`iterconv_keras.data.debris`)
draw with these.
"""

import dataclasses
import functools
import hashlib
import os

import numpy as np

# Hi-res rendering factor and font geometry relative to the output size: 512 canvas,
# font size 384 and a 10-pixel outline for 32x32 output, as in Spoerer et al. (2017).
RENDER_SCALE = 16
FONT_SIZE_PER_PIXEL = 12
STROKE_PER_PIXEL = 10 / 32
FONT_FILE = "DejaVuSans-Bold.ttf"


def font_path():
    """Path of DejaVu Sans Bold as shipped inside matplotlib (same file everywhere)."""
    import matplotlib

    path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", FONT_FILE)
    if not os.path.isfile(path):
        # Fall back to the font manager, which knows fonts installed elsewhere.
        from matplotlib import font_manager

        path = font_manager.findfont(
            font_manager.FontProperties(family="DejaVu Sans", weight="bold"), fallback_to_default=False
        )
    return path


@functools.lru_cache(maxsize=1)
def font_sha256():
    """sha256 of the font file, recorded so a different font is noticed."""
    with open(font_path(), "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def pil_font(image_size):
    from PIL import ImageFont

    # The basic layout engine avoids a dependency on libraqm being present.
    return ImageFont.truetype(
        font_path(), FONT_SIZE_PER_PIXEL * image_size, layout_engine=ImageFont.Layout.BASIC
    )


def stroke_width(image_size):
    return max(1, int(round(STROKE_PER_PIXEL * image_size)))


def draw_digit(draw, origin, digit, font, stroke, face, edge):
    # fontmode "1": faces are not anti-aliased, as with ImageMagick's +antialias in
    # the original; Pillow still anti-aliases the outline stroke.
    draw.fontmode = "1"
    draw.text(origin, str(digit), font=font, fill=face, stroke_width=stroke, stroke_fill=edge)


@dataclasses.dataclass
class Glyphs:
    """Hi-res alpha masks of the ten digits, cropped to their outline's bounding box."""

    outline: list  # uint8 [h, w] alpha (0..255) of face plus outline
    face: list  # uint8 [h, w] alpha of the face alone
    origin: list  # (dy, dx): PIL text origin relative to the crop's top-left


@functools.lru_cache(maxsize=8)
def glyph_masks(image_size):
    from PIL import Image, ImageDraw

    font = pil_font(image_size)
    stroke = stroke_width(image_size)
    side = RENDER_SCALE * image_size
    pad = 2 * side  # generous: text origins sit above and left of the ink
    outline, face, origin = [], [], []
    for digit in range(10):
        both = Image.new("L", (2 * pad, 2 * pad), 0)
        draw_digit(ImageDraw.Draw(both), (pad // 2, pad // 2), digit, font, stroke, 255, 255)
        alone = Image.new("L", (2 * pad, 2 * pad), 0)
        draw = ImageDraw.Draw(alone)
        draw.fontmode = "1"
        draw.text((pad // 2, pad // 2), str(digit), font=font, fill=255)
        both, alone = np.asarray(both), np.asarray(alone)
        rows = np.flatnonzero(both.any(axis=1))
        cols = np.flatnonzero(both.any(axis=0))
        r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        outline.append(np.ascontiguousarray(both[r0:r1, c0:c1]))
        face.append(np.ascontiguousarray(alone[r0:r1, c0:c1]))
        origin.append((pad // 2 - r0, pad // 2 - c0))
    return Glyphs(outline, face, origin)


@dataclasses.dataclass
class CoverageTables:
    """Per-digit, per-sub-pixel-phase compositing factors at the output resolution.

    ``keep[d, py, px]`` is ``1 - o`` and ``add[d, py, px]`` is ``255 * (o - f)``, with
    o and f the outline and face coverage fractions of each output pixel when digit
    d's box has its top-left at sub-pixel phase (py, px).
    """

    keep: np.ndarray  # float64 [10, q, q, hc, wc]
    add: np.ndarray  # float64 [10, q, q, hc, wc]
    sha256: str


def phase_coverage(alpha, q, hc, wc):
    """Sum of alpha in each q x q cell, for every placement phase, from an integral image.

    Returns int64 ``[q, q, hc, wc]``: entry [py, px, i, j] sums the mask pixels that
    fall in cell (i, j) when the mask's top-left is at (py, px) of cell (0, 0).
    """
    h, w = alpha.shape
    integral = np.zeros((h + 1, w + 1), np.int64)
    integral[1:, 1:] = alpha.astype(np.int64).cumsum(axis=0).cumsum(axis=1)
    phase = np.arange(q)
    rows = np.clip(q * np.arange(hc + 1)[None, :] - phase[:, None], 0, h)  # [q, hc+1]
    cols = np.clip(q * np.arange(wc + 1)[None, :] - phase[:, None], 0, w)  # [q, wc+1]
    corner = integral[rows[:, None, :, None], cols[None, :, None, :]]  # [q, q, hc+1, wc+1]
    return corner[:, :, 1:, 1:] - corner[:, :, :-1, 1:] - corner[:, :, 1:, :-1] + corner[:, :, :-1, :-1]


@functools.lru_cache(maxsize=8)
def coverage_tables(image_size):
    glyphs = glyph_masks(image_size)
    q = RENDER_SCALE
    hc = max(a.shape[0] for a in glyphs.outline) // q + 2
    wc = max(a.shape[1] for a in glyphs.outline) // q + 2
    keep = np.empty((10, q, q, hc, wc))
    add = np.empty((10, q, q, hc, wc))
    digest = hashlib.sha256()
    area = 255.0 * q * q
    for digit in range(10):
        o = phase_coverage(glyphs.outline[digit], q, hc, wc)
        f = phase_coverage(glyphs.face[digit], q, hc, wc)
        digest.update(o.tobytes())
        digest.update(f.tobytes())
        keep[digit] = 1.0 - o / area
        add[digit] = (o - f) * (255.0 / area)
    return CoverageTables(keep, add, digest.hexdigest())


def block_mean(hires, size):
    """Mean of each ``RENDER_SCALE`` x ``RENDER_SCALE`` block of a hi-res canvas, rounded half up.

    Args:
        hires: uint8 ``[16 * size, 16 * size]`` canvas.
        size: output side length.

    Returns:
        int64 ``[size, size]`` grey levels, exact integer arithmetic.
    """
    blocks = np.asarray(hires, np.int64).reshape(size, RENDER_SCALE, size, RENDER_SCALE).sum(axis=(1, 3))
    return (2 * blocks + RENDER_SCALE**2) // (2 * RENDER_SCALE**2)
