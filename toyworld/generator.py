"""Procedural toy world: flat designs and their embroidered renderings, with ground truth.

No pretrained diffusion weights exist where this project is tested, so the method is shown on a
world we can generate exactly: a *design* is a few flat-coloured shapes or letters on a plain
fabric colour, and ``render_embroidery`` turns it into a stitched image in one of several
techniques, together with the mask of stitched pixels. Everything is seeded and deterministic.

Reading order: constants, design drawing, small texture helpers, one renderer per technique,
the shared compositor (thread colour, fabric weave, shadow), then the vocabulary and the demo pair.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# --- the world's names -----------------------------------------------------------------------

PALETTE = {  # thread colours; their names appear in prompts
    "red": (0.82, 0.12, 0.14),
    "orange": (0.95, 0.50, 0.08),
    "yellow": (0.97, 0.82, 0.12),
    "green": (0.15, 0.58, 0.22),
    "blue": (0.12, 0.32, 0.78),
    "purple": (0.50, 0.20, 0.62),
    "pink": (0.96, 0.52, 0.70),
    "white": (0.97, 0.97, 0.95),
    "black": (0.14, 0.14, 0.16),  # real black thread still shines
}
FABRICS = {  # background cloth; never named in prompts
    "linen": (0.86, 0.80, 0.68),
    "grey": (0.62, 0.63, 0.66),
    "denim": (0.25, 0.33, 0.47),
    "cream": (0.93, 0.90, 0.82),
    "charcoal": (0.16, 0.16, 0.18),
}
SHAPES = ("circle", "square", "triangle", "star", "heart")
LETTERS = tuple(chr(c) for c in range(ord("A"), ord("Z") + 1))  # upper case: "a" is the article
TECHNIQUES = ("satin", "tatami", "cross_stitch", "running", "chain", "french_knot", "sequin")
HELD_OUT = ("french_knot", "sequin", "chain")  # never seen by base training
TRAIN_TECHNIQUES = tuple(t for t in TECHNIQUES if t not in HELD_OUT)
# Techniques that cover a region without fabric showing through (cross stitch leaves the fabric
# visible between its X's and snaps the shape to its grid; running stitch only outlines).
FILL_TECHNIQUES = ("satin", "tatami", "chain", "french_knot", "sequin")

TRIGGER = "<trigger>"
PAD = "<pad>"
VOCAB = (PAD, TRIGGER, "a", "in", "style", "design", "embroidery") + tuple(PALETTE) + SHAPES \
    + LETTERS + TECHNIQUES

# --- design layout ---------------------------------------------------------------------------

MIN_SIDE = 16
LETTER_PROB = 0.25  # chance that a motif is a letter rather than a shape
ACCENT_PROB = 0.5  # chance that a (non-letter) motif gets a smaller inner copy in a second colour
ACCENT_SCALE = 0.5
LETTER_HEIGHT = 1.7  # letter height in motif radii
SINGLE_RADIUS = (0.28, 0.36)  # motif radius as a fraction of the image side, one motif
PAIR_RADIUS = (0.18, 0.22)  # the same with two motifs
# Thread must stay distinguishable from the fabric at every shade the renderers use, so that
# the stitched mask can be recovered from pixels (metrics.stitched_mask).
SHADE_RANGE = (0.4, 1.4)
MIN_THREAD_CONTRAST = 0.2  # every fabric keeps >= 4 thread colours, enough for any design

# --- stitch geometry, in pixels at 64 px (scaled with the image side) -------------------------

BASE_SIDE = 64
SATIN_STRAND = 2.5
SATIN_SHEEN_PERIOD = 24.0
TATAMI_ROW, TATAMI_LENGTH = 3.0, 6.0
CROSS_CELL, CROSS_HALF_WIDTH = 4.0, 0.27  # half width as a fraction of the cell
RUNNING_WIDTH, RUNNING_DASH, RUNNING_GAP = 1.5, 4.0, 2.0
CHAIN_ROW, CHAIN_LINK = 3.5, 4.0
KNOT_SPACING, KNOT_RADIUS, KNOT_JITTER = 3.0, 0.62, 0.18  # radius, jitter: fractions of spacing
SEQUIN_SPACING, SEQUIN_ROW, SEQUIN_RADIUS = 4.0, 3.0, 0.62  # radius > 0.54 leaves no gaps

# --- compositing -----------------------------------------------------------------------------

STITCH_BRIGHTNESS_JITTER = 0.12  # per stitch, relative
STITCH_TINT_JITTER = 0.03  # per stitch and channel, absolute
FIBRE_NOISE = 0.03  # per pixel, relative
WEAVE_AMPLITUDE = 0.03
SHADOW_STRENGTH = 0.06
SHADOW_OFFSET, SHADOW_BLUR = 1.0, 1.5


@dataclass
class Design:
    """A flat design and its ground truth.

    ``labels`` is 0 on fabric and k >= 1 on region k; ``region_rgb[k]`` is region k's colour
    (row 0 is the fabric). ``words`` names the motifs, colour first: ["red", "circle", ...].
    """

    image: np.ndarray  # (H, W, 3) float32 in 0..1
    labels: np.ndarray  # (H, W) int
    words: list[str]
    fabric_rgb: np.ndarray  # (3,) float32
    region_rgb: np.ndarray  # (K + 1, 3) float32


# --- drawing the design ----------------------------------------------------------------------

def _polygon(kind: str, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    """Outline points of a named shape of bounding radius ``r``, rotated by ``turn`` radians."""
    if kind == "square":
        t = np.pi / 4 + turn + np.arange(4) * np.pi / 2
        rad = np.full(4, r * 0.95)
    elif kind == "triangle":
        t = -np.pi / 2 + turn + np.arange(3) * 2 * np.pi / 3
        rad = np.full(3, r)
    elif kind == "star":
        t = -np.pi / 2 + turn + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
    elif kind == "heart":
        s = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        hx = 16 * np.sin(s) ** 3
        hy = -(13 * np.cos(s) - 5 * np.cos(2 * s) - 2 * np.cos(3 * s) - np.cos(4 * s)) - 2.5
        return [(cx + r * x / 17, cy + r * y / 17) for x, y in zip(hx, hy)]
    else:
        raise ValueError(f"no polygon for shape {kind!r}")
    return [(cx + a * np.cos(b), cy + a * np.sin(b)) for a, b in zip(rad, t)]


def _letter_mask(letter: str, height: int) -> Image.Image:
    """A binary "L" image of ``letter``, ``height`` px tall, in PIL's bundled font.

    Pillow builds without FreeType only have a small bitmap font; it is drawn small and scaled up.
    """
    try:
        font = ImageFont.load_default(size=height)
    except (TypeError, OSError, ImportError):
        font = ImageFont.load_default()
    stroke = max(1, height // 14) if isinstance(font, ImageFont.FreeTypeFont) else 0
    left, top, right, bottom = font.getbbox(letter, stroke_width=stroke)
    glyph = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(glyph).text((-left, -top), letter, fill=255, font=font,
                               stroke_width=stroke, stroke_fill=255)
    width = max(1, round(glyph.width * height / glyph.height))
    return glyph.resize((width, height), Image.NEAREST).point(lambda v: 255 if v >= 128 else 0)


def _draw_motif(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float,
                turn: float, value: int) -> None:
    """Draw one motif into the label image with fill ``value``."""
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=value)
    elif kind in LETTERS:
        glyph = _letter_mask(kind, max(8, round(LETTER_HEIGHT * r)))
        draw.bitmap((round(cx - glyph.width / 2), round(cy - glyph.height / 2)), glyph, fill=value)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, turn), fill=value)


def _layout(rng: np.random.Generator, n: int, size: int) -> list[tuple[float, float, float]]:
    """Centres and radii of ``n`` (1 or 2) non-overlapping motifs."""
    if n == 1:
        r = size * rng.uniform(*SINGLE_RADIUS)
        jitter = rng.uniform(-0.04, 0.04, 2) * size
        return [(size / 2 + jitter[0], size / 2 + jitter[1], r)]
    axis = rng.uniform(0, np.pi)  # the two motifs sit on a line through the centre
    offset = 0.25 * size * np.array([np.cos(axis), np.sin(axis)])
    radii = size * rng.uniform(*PAIR_RADIUS, 2)
    return [(size / 2 + s * offset[0], size / 2 + s * offset[1], r) for s, r in zip((-1, 1), radii)]


def _thread_colours(fabric: np.ndarray) -> list[str]:
    """Palette names whose colour stays at least MIN_THREAD_CONTRAST from the fabric at any shade."""
    shades = np.linspace(*SHADE_RANGE, 15)[:, None]
    keep = []
    for name, rgb in PALETTE.items():
        gap = np.abs(shades * np.asarray(rgb) - fabric).max(axis=1).min()
        if gap >= MIN_THREAD_CONTRAST:
            keep.append(name)
    return keep


def make_design(seed: int, size: int = 64) -> Design:
    """A seeded flat design: 1-2 motifs (shapes or letters), 2-4 thread colours, one fabric colour.

    A single motif always carries an inner accent so that every design has at least two thread
    colours; ``words`` names only the motifs (colour + shape), not the accents.
    """
    if size < MIN_SIDE:
        raise ValueError(f"design size {size} is too small; use at least {MIN_SIDE} px")
    rng = np.random.default_rng(seed)
    fabric = np.asarray(FABRICS[rng.choice(list(FABRICS))], np.float32)
    n = int(rng.integers(1, 3))
    kinds = [str(rng.choice(LETTERS)) if rng.random() < LETTER_PROB else str(rng.choice(SHAPES))
             for _ in range(n)]
    if n == 1 and kinds[0] in LETTERS:
        kinds[0] = str(rng.choice(SHAPES))  # a lone motif needs an accent, letters take none
    accents = [k not in LETTERS and (n == 1 or rng.random() < ACCENT_PROB) for k in kinds]
    names = [str(c) for c in rng.choice(_thread_colours(fabric), n + sum(accents), replace=False)]

    labels_img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(labels_img)
    colours, words = [fabric], []  # colours[k] is region k's colour
    for kind, accent, (cx, cy, r) in zip(kinds, accents, _layout(rng, n, size)):
        turn = rng.uniform(-0.3, 0.3)
        words += [names[len(colours) - 1], kind]
        for scale in (1.0, ACCENT_SCALE)[:1 + accent]:
            _draw_motif(draw, kind, cx, cy, r * scale, turn, len(colours))
            colours.append(PALETTE[names[len(colours) - 1]])
    labels = np.asarray(labels_img, dtype=np.int64)
    region_rgb = np.asarray(colours, np.float32)
    return Design(region_rgb[labels], labels, words, fabric, region_rgb)


# --- texture helpers -------------------------------------------------------------------------

def _hash01(a, b=0, salt: int = 0) -> np.ndarray:
    """Deterministic pseudo-random floats in [0, 1) from integer keys (a splitmix64 finaliser)."""
    with np.errstate(over="ignore"):
        x = (np.asarray(a, np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
             ^ np.asarray(b, np.int64).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
             ^ np.uint64(salt & 0xFFFFFFFF) * np.uint64(0x165667B19E3779F9))
        x = (x ^ (x >> np.uint64(31))) * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(29))
    return (x >> np.uint64(11)).astype(np.float64) / float(2 ** 53)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    return yy + 0.5, xx + 0.5


def _rotate(xx: np.ndarray, yy: np.ndarray, theta) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates along (u) and across (v) the direction ``theta``."""
    c, s = np.cos(theta), np.sin(theta)
    return xx * c + yy * s, -xx * s + yy * c


def _shift(a: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """``a`` moved by (dy, dx); uncovered pixels get ``fill``."""
    out = np.full_like(a, fill)
    h, w = a.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        a[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


_N4 = ((0, 1), (0, -1), (1, 0), (-1, 0))
_N8 = _N4 + ((1, 1), (1, -1), (-1, 1), (-1, -1))


def _region_distance(labels: np.ndarray, max_d: int, lower_only: bool = False) -> np.ndarray:
    """Approximate distance (px, >= 1 inside) from each stitched pixel to its region's edge.

    Repeated erosion that alternates 4- and 8-neighbourhoods (an octagonal metric); a pixel next
    to another region counts as on the edge, so regions are measured separately. With
    ``lower_only`` only edges against a lower label count (an accent's edge belongs to the
    accent, not to the region around it).
    """
    neighbours = {d: _shift(labels, *d, -1) for d in _N8}
    same = {d: (n >= labels) if lower_only else (n == labels) for d, n in neighbours.items()}
    alive = labels > 0
    dist = alive.astype(np.float64)
    for k in range(max_d):
        before = alive
        for d in (_N4 if k % 2 == 0 else _N8):
            alive = alive & _shift(before, *d, False) & same[d]
        if not alive.any():
            break
        dist += alive
    return dist


def _region_centroids(labels: np.ndarray) -> np.ndarray:
    """(K + 1, 2) centroid (y, x) of every region (row 0 unused)."""
    yy, xx = _grid(*labels.shape)
    count = np.maximum(np.bincount(labels.ravel()), 1)
    cy = np.bincount(labels.ravel(), yy.ravel()) / count
    cx = np.bincount(labels.ravel(), xx.ravel()) / count
    return np.stack([cy, cx], axis=1)


def _contour_coordinate(labels: np.ndarray, period: float, radial: bool) -> np.ndarray:
    """A coordinate that runs along region contours, in units of ``period`` (px).

    The angle about the region's centroid, scaled so one turn holds a whole number of periods
    at the region's mean radius: seamless, and constant across a row on round contours.
    ``radial`` adds the radius itself, so that the coordinate also advances along edges that
    point away from the centroid (a star's arms); only for thin rows, as it shears wide ones.
    """
    yy, xx = _grid(*labels.shape)
    c = _region_centroids(labels)[labels]
    dy, dx = yy - c[..., 0], xx - c[..., 1]
    radius = np.hypot(dy, dx)
    flat = labels.ravel()
    mean_r = np.bincount(flat, radius.ravel()) / np.maximum(np.bincount(flat), 1)
    turns = np.maximum(3, np.round(2 * np.pi * mean_r / period))
    along = (np.arctan2(dy, dx) / (2 * np.pi) + 0.5) * turns[labels]
    return along + radius / period if radial else along


class Lattice(NamedTuple):
    """Per pixel, the 9 nearby points of a jittered brick lattice, each array (9, H, W)."""

    cy: np.ndarray
    cx: np.ndarray
    order: np.ndarray  # row-major laying order of the point (also its id)
    region: np.ndarray  # region under the point


def _brick_lattice(labels: np.ndarray, spacing: float, row_step: float, jitter: float,
                   salt: int) -> Lattice:
    """Points every ``spacing`` px along rows ``row_step`` apart, odd rows shifted by half.

    The points live in a small table (jitter and region are computed once per point); each
    pixel then looks up the 3 x 3 points around it.
    """
    h, w = labels.shape
    r = np.arange(-1, int(h / row_step) + 3)[:, None]
    c = np.arange(-2, int(w / spacing) + 3)[None, :]
    ty = (r + 0.5) * row_step + jitter * (2 * _hash01(r, c, salt) - 1)
    tx = (c + 0.5) * spacing + (r % 2) * spacing / 2 + jitter * (2 * _hash01(c, r, salt + 1) - 1)
    region = _label_at(labels, ty, tx)

    yy, xx = _grid(h, w)
    rows = np.floor(yy[:, :1] / row_step).astype(np.int64)[None] + np.arange(-1, 2)[:, None, None]
    cols = np.floor((xx[None] - (rows % 2) * spacing / 2) / spacing).astype(np.int64)
    cols = cols[:, None] + np.arange(-1, 2)[None, :, None, None]
    ri = np.broadcast_to(rows[:, None] - r[0, 0], cols.shape).reshape(9, h, w)
    ci = (cols - c[0, 0]).reshape(9, h, w)
    return Lattice(ty[ri, ci], tx[ri, ci], ri * ty.shape[1] + ci, region[ri, ci])


def _label_at(labels: np.ndarray, cy: np.ndarray, cx: np.ndarray) -> np.ndarray:
    """Region under each (cy, cx) point; 0 outside the image."""
    h, w = labels.shape
    iy, ix = np.floor(cy).astype(np.int64), np.floor(cx).astype(np.int64)
    inside = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    return np.where(inside, labels[iy.clip(0, h - 1), ix.clip(0, w - 1)], 0)


def _box_blur(a: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)^2 box, edges treated as zero."""
    k = 2 * radius + 1
    p = np.pad(a, (radius + 1, radius)).cumsum(0).cumsum(1)  # leading zero row and column
    return (p[k:, k:] - p[:-k, k:] - p[k:, :-k] + p[:-k, :-k]) / (k * k)


# --- one renderer per technique --------------------------------------------------------------

class Stitches(NamedTuple):
    """What a technique lays down: per pixel, which region's thread, how it is lit, which stitch."""

    region: np.ndarray  # int, the region whose colour the thread takes
    shade: np.ndarray  # multiplies the thread colour
    gloss: np.ndarray  # added as white (specular highlights)
    mask: np.ndarray  # bool, stitched pixels
    stitch: np.ndarray  # int id, for per-stitch colour variation


def _strand_profile(f: np.ndarray) -> np.ndarray:
    """Brightness across one thread, f in [0, 1): dark edges, bright middle (a lit cylinder)."""
    return 0.5 + 0.6 * np.sin(np.pi * f)


def _strand_sheen(f: np.ndarray, strength: float) -> np.ndarray:
    """Narrow specular line along the middle of a thread (what makes even black thread shine)."""
    return strength * np.sin(np.pi * f) ** 8


def _satin(labels, unit, rng) -> Stitches:
    """Long parallel strands spanning each region, one direction per region, with a slow sheen."""
    yy, xx = _grid(*labels.shape)
    theta = rng.uniform(0, np.pi, labels.max() + 1)[labels]
    u, v = _rotate(xx, yy, theta)
    strand_f = v / (SATIN_STRAND * unit)
    strand = np.floor(strand_f)
    phase = rng.uniform(0, 2 * np.pi, labels.max() + 1)[labels]
    sheen = 1 + 0.1 * np.cos(2 * np.pi * u / (SATIN_SHEEN_PERIOD * unit) + phase)
    edge = _region_distance(labels, 2) <= 1
    shade = _strand_profile(strand_f - strand) * sheen * np.where(edge, 0.85, 1.0)
    gloss = _strand_sheen(strand_f - strand, 0.2) * sheen
    return Stitches(labels, shade, gloss, labels > 0, labels * 100003 + strand.astype(np.int64))


def _tatami(labels, unit, rng) -> Stitches:
    """Rows of short stitches, each row shifted by a third of a stitch (the brick pattern)."""
    yy, xx = _grid(*labels.shape)
    theta = (rng.choice([0.0, np.pi / 6, -np.pi / 6, np.pi / 2], labels.max() + 1)
             + rng.uniform(-0.1, 0.1, labels.max() + 1))[labels]
    u, v = _rotate(xx, yy, theta)
    row_f = v / (TATAMI_ROW * unit)
    row = np.floor(row_f)
    along = u / (TATAMI_LENGTH * unit) + row / 3
    col = np.floor(along)
    to_end = np.minimum(along - col, 1 - (along - col)) * TATAMI_LENGTH * unit  # px to needle hole
    hole = 1 - 0.5 * np.exp(-(to_end / (0.7 * unit)) ** 2)
    shade = _strand_profile(row_f - row) * hole
    gloss = _strand_sheen(row_f - row, 0.18) * hole
    stitch = (labels * 7919 + row.astype(np.int64)) * 100003 + col.astype(np.int64)
    return Stitches(labels, shade, gloss, labels > 0, stitch)


def _cross_stitch(labels, unit, rng) -> Stitches:
    """A grid of X's: a cell is stitched when its centre lies in a region; '/' lies over '\\'."""
    yy, xx = _grid(*labels.shape)
    cell = CROSS_CELL * unit
    origin = rng.uniform(0, cell, 2)
    gy, gx = np.floor((yy - origin[0]) / cell), np.floor((xx - origin[1]) / cell)
    region = _label_at(labels, (gy + 0.5) * cell + origin[0], (gx + 0.5) * cell + origin[1])
    a, b = (xx - origin[1]) / cell - gx, (yy - origin[0]) / cell - gy
    under, over = np.abs(a - b) / CROSS_HALF_WIDTH, np.abs(a + b - 1) / CROSS_HALF_WIDTH
    top = over < 1
    f = 0.5 * (1 - np.where(top, over, under).clip(0, 1))  # 0 at a thread's edge, 0.5 mid
    shade = _strand_profile(f) * np.where(top, 1.0, 0.85)
    gloss = np.where(top, _strand_sheen(f, 0.15), 0.0)
    mask = (region > 0) & (top | (under < 1))
    stitch = (gy.astype(np.int64) * 1009 + gx.astype(np.int64)) * 2 + top
    return Stitches(region, shade, gloss, mask, stitch)


def _running(labels, unit, rng) -> Stitches:
    """Dashed rows only: one just inside every motif's and every accent's outline."""
    dist = _region_distance(labels, int(np.ceil(RUNNING_WIDTH * unit)) + 1, lower_only=True) - 1
    period = (RUNNING_DASH + RUNNING_GAP) * unit
    s = _contour_coordinate(labels, period, radial=True) + rng.uniform(0, 1)
    along = (s - np.floor(s)) * period  # px from the start of the dash
    to_end = np.minimum(along, RUNNING_DASH * unit - along)
    across = (dist / (RUNNING_WIDTH * unit)).clip(0, 1)
    shade = _strand_profile(across) * (1 - 0.3 * np.exp(-(to_end / unit) ** 2))
    mask = (labels > 0) & (dist < RUNNING_WIDTH * unit) & (along < RUNNING_DASH * unit)
    return Stitches(labels, shade, np.zeros_like(shade), mask, np.floor(s).astype(np.int64))


def _chain(labels, unit, rng) -> Stitches:
    """Rows of linked teardrop loops that follow the contours inward."""
    row_f = (_region_distance(labels, labels.shape[0]) - 1) / (CHAIN_ROW * unit)
    row = np.floor(row_f)
    across = row_f - row
    s = _contour_coordinate(labels, CHAIN_LINK * unit, radial=False) + 0.5 * row + rng.uniform(0, 1)
    link = np.floor(s)
    along = s - link  # the loop's tail is at 0, its round end at 1
    half_width = 0.5 * (0.55 + 0.45 * along)
    q = ((along - 0.5) / 0.5) ** 2 + ((across - 0.5) / half_width) ** 2
    ring = (q > 0.3) & (q < 1)
    f = ((q - 0.3) / 0.7).clip(0, 1)  # position across the loop's thread
    shade = np.where(ring, _strand_profile(f), 0.4)  # dark inside and between the loops
    gloss = np.where(ring, _strand_sheen(f, 0.2), 0.0)
    stitch = row.astype(np.int64) * 100003 + link.astype(np.int64)
    return Stitches(labels, shade, gloss, labels > 0, stitch)


def _pick_disc(lattice: Lattice, radius: float, topmost: bool):
    """Per pixel, one lattice point in a region whose disc of ``radius`` covers the pixel.

    ``topmost`` picks the one laid last (later rows overlap earlier ones, like scales);
    otherwise the nearest. Returns (dy, dx) from the chosen point, the covered mask, and the
    chosen point's id and region, each (H, W).
    """
    yy, xx = _grid(*lattice.cy.shape[1:])
    dy, dx = yy[None] - lattice.cy, xx[None] - lattice.cx
    d2 = dy ** 2 + dx ** 2
    ok = (d2 < radius ** 2) & (lattice.region > 0)
    score = lattice.order.astype(np.float64) if topmost else -d2
    pick = np.where(ok, score, -np.inf).argmax(axis=0)[None]

    def take(a):
        return np.take_along_axis(a, pick, 0)[0]

    return take(dy), take(dx), ok.any(axis=0), take(lattice.order), take(lattice.region)


def _french_knot(labels, unit, rng) -> Stitches:
    """Densely packed little domes, each lit like a sphere with a specular spot."""
    spacing = KNOT_SPACING * unit
    radius = KNOT_RADIUS * spacing
    lattice = _brick_lattice(labels, spacing, spacing * 0.87, KNOT_JITTER * spacing,
                             int(rng.integers(2 ** 31)))
    dy, dx, mask, knot, region = _pick_disc(lattice, radius, topmost=False)
    z = np.sqrt(np.clip(1 - (dy ** 2 + dx ** 2) / radius ** 2, 0, 1))
    shade = 0.35 + 0.8 * z
    gloss = 0.35 * np.exp(-((dy + 0.35 * radius) ** 2 + (dx + 0.35 * radius) ** 2)
                          / (0.3 * radius) ** 2)
    return Stitches(region, shade, gloss, mask, knot)


def _sequin(labels, unit, rng) -> Stitches:
    """Overlapping flat discs like fish scales: per-disc tilt, dark rim, one specular highlight."""
    spacing = SEQUIN_SPACING * unit
    radius = SEQUIN_RADIUS * spacing
    salt = int(rng.integers(2 ** 31))
    lattice = _brick_lattice(labels, spacing, SEQUIN_ROW * unit, 0.0, salt)
    dy, dx, mask, disc, region = _pick_disc(lattice, radius, topmost=True)
    tilt = 0.7 + 0.45 * _hash01(disc, 1, salt)  # each disc catches the light differently
    angle = 2 * np.pi * _hash01(disc, 2, salt)
    hy, hx = 0.35 * radius * np.sin(angle), 0.35 * radius * np.cos(angle)
    r = np.sqrt(dy ** 2 + dx ** 2) / radius
    shade = np.where(r > 0.82, 0.55, tilt) * np.where(r < 0.15, 0.5, 1.0)
    gloss = 0.55 * np.exp(-((dy - hy) ** 2 + (dx - hx) ** 2) / (0.3 * radius) ** 2)
    return Stitches(region, shade, gloss, mask, disc)


_RENDERERS: dict[str, Callable[..., Stitches]] = {
    "satin": _satin,
    "tatami": _tatami,
    "cross_stitch": _cross_stitch,
    "running": _running,
    "chain": _chain,
    "french_knot": _french_knot,
    "sequin": _sequin,
}


# --- compositing -----------------------------------------------------------------------------

def _thread_rgb(design: Design, st: Stitches, salt: int) -> np.ndarray:
    """Region colour x shade, with a slight per-stitch brightness/tint and fibre noise, + gloss.

    The shade is scaled to mean 1 over the stitches, so on average the thread keeps the design's
    colour and the texture adds detail without shifting the colour.
    """
    h, w = st.region.shape
    base = design.region_rgb[st.region].astype(np.float64)
    key = st.stitch * 31 + st.region
    bright = 1 + STITCH_BRIGHTNESS_JITTER * (2 * _hash01(key, 0, salt) - 1)
    tint = np.stack([STITCH_TINT_JITTER * (2 * _hash01(key, c + 1, salt) - 1) for c in range(3)], -1)
    fibre = 1 + FIBRE_NOISE * (2 * _hash01(np.arange(h * w).reshape(h, w), 9, salt) - 1)
    mean = st.shade[st.mask].mean() if st.mask.any() else 1.0
    shade = np.clip(st.shade / mean * bright * fibre, *SHADE_RANGE)
    return base * shade[..., None] + tint + st.gloss[..., None]


def _fabric_rgb(design: Design, mask: np.ndarray, unit: float) -> np.ndarray:
    """Plain cloth with a fine twill weave, darkened by a soft shadow cast down-right by stitches."""
    yy, xx = np.mgrid[0:mask.shape[0], 0:mask.shape[1]]
    weave = np.where((xx + yy) % 2 == 0, 1.0, -1.0) * 0.5 + np.where((xx + 2 * yy) % 4 < 2, 0.5, -0.5)
    off = max(1, int(round(SHADOW_OFFSET * unit)))
    shadow = _box_blur(_shift(mask.astype(np.float64), off, off, 0.0),
                       max(1, int(round(SHADOW_BLUR * unit))))
    light = (1 + WEAVE_AMPLITUDE * weave) * (1 - SHADOW_STRENGTH * shadow)
    return design.fabric_rgb.astype(np.float64) * light[..., None]


def render_embroidery(design: Design, technique: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stitch ``design`` in ``technique``; returns (image (H, W, 3) float32 0..1, stitched mask).

    Stitch sizes are defined at 64 px and scale with the image side, so a 128 px render shows
    the same embroidery at twice the resolution.
    """
    if technique not in _RENDERERS:
        raise ValueError(f"unknown technique {technique!r}; expected one of {TECHNIQUES}")
    rng = np.random.default_rng(seed)
    unit = min(design.labels.shape) / BASE_SIDE
    st = _RENDERERS[technique](design.labels, unit, rng)
    thread = _thread_rgb(design, st, int(rng.integers(2 ** 31)))
    image = np.where(st.mask[..., None], thread, _fabric_rgb(design, st.mask, unit))
    return np.clip(image, 0, 1).astype(np.float32), st.mask.copy()


# --- words -----------------------------------------------------------------------------------

_TOKEN_ID = {w: i for i, w in enumerate(VOCAB)}


def tokenize(text: str, length: int = 8) -> list[int]:
    """Whitespace-split ``text`` into VOCAB ids, padded with PAD to ``length``.

    Matching is exact first (so "A" is the letter and "a" the article), then lower-case
    ("Red" -> "red"). Unknown words and texts longer than ``length`` raise ValueError.
    """
    ids = []
    for word in text.split():
        key = word if word in _TOKEN_ID else word.lower()
        if key not in _TOKEN_ID:
            raise ValueError(f"unknown word {word!r} in {text!r}; the toy vocabulary is {VOCAB}")
        ids.append(_TOKEN_ID[key])
    if len(ids) > length:
        raise ValueError(f"{text!r} has {len(ids)} words but length is {length}")
    return ids + [_TOKEN_ID[PAD]] * (length - len(ids))


def detokenize(ids) -> str:
    """Inverse of ``tokenize`` (padding dropped)."""
    return " ".join(VOCAB[int(i)] for i in ids if int(i) != _TOKEN_ID[PAD])


def sample_pair(seed: int, technique: str, size: int = 64) -> dict:
    """One analogy pair for demos: a design, its embroidery in ``technique`` and both prompts.

    Keys: design (H, W, 3), embroidery (H, W, 3), mask, labels, fabric_rgb, words,
    design_prompt ("a red circle blue star") and embroidery_prompt ("... in <trigger> style").
    Prompts have at most 8 words, so they fit ``tokenize``'s default length.
    """
    design = make_design(seed, size)
    embroidery, mask = render_embroidery(design, technique, seed)
    prompt = "a " + " ".join(design.words)
    return dict(design=design.image, embroidery=embroidery, mask=mask, labels=design.labels,
                fabric_rgb=design.fabric_rgb, words=list(design.words), design_prompt=prompt,
                embroidery_prompt=f"{prompt} in {TRIGGER} style")
