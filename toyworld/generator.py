"""Procedural toy world: flat designs and their embroidered renderings, with ground truth.

No pretrained diffusion weights exist where this project is tested, so the method is shown on a
world we can generate exactly: a *design* is a few flat-coloured shapes or letters on a plain
fabric colour, and ``render_embroidery`` turns it into a stitched image in one of several
techniques, together with the mask of stitched pixels. Everything is seeded and deterministic.

Reading order: constants, design drawing, small texture helpers, one renderer per stitch kind,
the shared compositor (thread colour, fabric weave, shadow), then the vocabulary and the demo pair.
"""
from __future__ import annotations

import itertools
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
# The benchmark's references are drawn in these colours only and its new designs never use them,
# so a method that copies the reference's palette is measured (toyworld.demo.palette_leak).
# The base model is trained on every colour: they are all words it knows.
REFERENCE_COLOURS = ("orange", "purple", "pink")
DESIGN_COLOURS = tuple(c for c in PALETTE if c not in REFERENCE_COLOURS)
FABRICS = {  # background cloth; never named in prompts
    "linen": (0.86, 0.80, 0.68),
    "grey": (0.62, 0.63, 0.66),
    "denim": (0.25, 0.33, 0.47),
    "cream": (0.93, 0.90, 0.82),
    "charcoal": (0.16, 0.16, 0.18),
}
SHAPES = ("circle", "square", "triangle", "star", "heart")
LETTERS = tuple(chr(c) for c in range(ord("A"), ord("Z") + 1))  # upper case: "a" is the article

# A technique is four attributes, each value a word: "knot vertical fine metallic". Stitches are
# laid on the fabric's grid (like Aida cloth): one stitch per square cell of SPACINGS[spacing] px,
# aligned with the image, so at the toy latent's 4 x 4 patch code a fine stitch is one latent position's
# code, as a stitch of a few pixels is in SD's 1/8-scale latent. Each attribute is one operation
# on a kind's cell pattern, the same for every kind (what lets a small UNet compose them, see
# docs/FIDELITY.md): "vertical" turns the cell by 90 degrees, "coarse" draws it at twice the
# size, "metallic" lays a broad diagonal lustre (LUSTRE_PERIOD) over the thread.
KINDS = ("satin", "tatami", "knot", "cross")  # known to the base model
NEW_KIND = "chain"  # never trained, not even by its word: the hard case, reported separately
DIRECTIONS = ("horizontal", "vertical")  # the rows' direction
SPACINGS = {"fine": 4, "coarse": 8}  # stitch cell in px at 64 px
SHEENS = ("matte", "metallic")  # plain thread, or metallic thread's broad lustre
ATTRIBUTES = (KINDS + (NEW_KIND,), DIRECTIONS, tuple(SPACINGS), SHEENS)
TECHNIQUES = tuple(" ".join(a) for a in itertools.product(*ATTRIBUTES))
# Unseen combinations of known attribute values: the base model knows every word of each and every
# combination one word away (each kind is trained in seven of its eight combinations), not the
# combination itself. Between them they take each direction, spacing and sheen twice.
HELD_OUT = ("knot vertical fine metallic", "satin vertical coarse matte", "tatami horizontal fine matte",
            "cross horizontal coarse metallic")
NEW_KIND_TECHNIQUES = tuple(t for t in TECHNIQUES if t.split()[0] == NEW_KIND)
TRAIN_TECHNIQUES = tuple(t for t in TECHNIQUES if t not in HELD_OUT and t not in NEW_KIND_TECHNIQUES)

TRIGGER = "<trigger>"
PAD = "<pad>"
PROMPT_LENGTH = 12  # "a red circle blue star in knot vertical fine metallic style" is 11 words
VOCAB = (PAD, TRIGGER, "a", "in", "style", "design", "embroidery") + tuple(PALETTE) + SHAPES \
    + LETTERS + sum(ATTRIBUTES, ())


def attributes(technique: str) -> tuple[str, str, str, str]:
    """"knot vertical fine metallic" -> ("knot", "vertical", "fine", "metallic"); ValueError for
    anything else."""
    words = tuple(technique.split())
    if len(words) != len(ATTRIBUTES) or any(w not in values for w, values in zip(words, ATTRIBUTES)):
        raise ValueError(f"unknown technique {technique!r}; a technique is kind direction spacing sheen, "
                         f"one of {ATTRIBUTES}, e.g. {TECHNIQUES[0]!r}")
    return words  # type: ignore[return-value]

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

# --- compositing -----------------------------------------------------------------------------

STITCH_BRIGHTNESS_JITTER = 0.05  # per stitch, relative
STITCH_TINT_JITTER = 0.01  # per stitch and channel, absolute
FIBRE_NOISE = 0.02  # per pixel, relative
WEAVE_AMPLITUDE = 0.03
SHADOW_STRENGTH = 0.06
SHADOW_OFFSET, SHADOW_BLUR = 1.0, 1.5
GAP_SHADE = 0.4  # thread between knots, crosses and loops: in the shadow of its neighbours
LUSTRE_AMPLITUDE = 0.3  # metallic thread: brightness x (1 + a sin(2 pi (x + y) / period))
LUSTRE_PERIOD = 16  # px at 64 px: four times a coarse cell, so it never reads as a stitch
BASE_SIDE = 64  # stitch sizes are defined at 64 px and scale with the image side


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


def _thread_colours(fabric: np.ndarray, colours=tuple(PALETTE)) -> list[str]:
    """Names in ``colours`` whose colour stays at least MIN_THREAD_CONTRAST from the fabric at any shade."""
    shades = np.linspace(*SHADE_RANGE, 15)[:, None]
    keep = []
    for name in colours:
        gap = np.abs(shades * np.asarray(PALETTE[name]) - fabric).max(axis=1).min()
        if gap >= MIN_THREAD_CONTRAST:
            keep.append(name)
    return keep


def make_design(seed: int, size: int = 64, colours: tuple[str, ...] | None = None) -> Design:
    """A seeded flat design: 1-2 motifs (shapes or letters), 2-4 thread colours, one fabric colour.

    A single motif always carries an inner accent so that every design has at least two thread
    colours; ``words`` names only the motifs (colour + shape), not the accents. ``colours``
    limits the thread colours to those names (the benchmark's references and new designs); the
    fabric is then one that leaves at least three of them, and a design that would need more
    colours than remain drops its accents.
    """
    if size < MIN_SIDE:
        raise ValueError(f"design size {size} is too small; use at least {MIN_SIDE} px")
    colours = tuple(PALETTE) if colours is None else tuple(colours)
    unknown = [c for c in colours if c not in PALETTE]
    if unknown:
        raise ValueError(f"unknown thread colours {unknown}; expected names from {tuple(PALETTE)}")
    rng = np.random.default_rng(seed)
    fabrics = [f for f in FABRICS if len(_thread_colours(np.asarray(FABRICS[f]), colours)) >= 3]
    if not fabrics:
        raise ValueError(f"the colours {colours} leave fewer than 3 thread colours on every fabric")
    fabric = np.asarray(FABRICS[rng.choice(fabrics)], np.float32)
    available = _thread_colours(fabric, colours)
    n = int(rng.integers(1, 3))
    kinds = [str(rng.choice(LETTERS)) if rng.random() < LETTER_PROB else str(rng.choice(SHAPES))
             for _ in range(n)]
    if n == 1 and kinds[0] in LETTERS:
        kinds[0] = str(rng.choice(SHAPES))  # a lone motif needs an accent, letters take none
    accents = [k not in LETTERS and (n == 1 or rng.random() < ACCENT_PROB) for k in kinds]
    while n + sum(accents) > len(available) and sum(accents) > (n == 1):
        accents[accents.index(True, n == 1)] = False
    names = [str(c) for c in rng.choice(available, n + sum(accents), replace=False)]

    labels_img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(labels_img)
    colours_rgb, words = [fabric], []  # colours_rgb[k] is region k's colour
    for kind, accent, (cx, cy, r) in zip(kinds, accents, _layout(rng, n, size)):
        turn = rng.uniform(-0.3, 0.3)
        words += [names[len(colours_rgb) - 1], kind]
        for scale in (1.0, ACCENT_SCALE)[:1 + accent]:
            _draw_motif(draw, kind, cx, cy, r * scale, turn, len(colours_rgb))
            colours_rgb.append(PALETTE[names[len(colours_rgb) - 1]])
    labels = np.asarray(labels_img, dtype=np.int64)
    region_rgb = np.asarray(colours_rgb, np.float32)
    return Design(region_rgb[labels], labels, words, fabric, region_rgb)


def motif_cells(design: Design) -> float:
    """The design's motif area in coarse stitch cells (SPACINGS["coarse"] px square at 64 px, and
    scaled with the side): how many of the largest stitches its regions can hold."""
    side = SPACINGS["coarse"] * min(design.labels.shape) / BASE_SIDE
    return float((design.labels > 0).sum() / side ** 2)


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


def _shift(a: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """``a`` moved by (dy, dx); uncovered pixels get ``fill``."""
    out = np.full_like(a, fill)
    h, w = a.shape
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        a[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def _box_blur(a: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)^2 box, edges treated as zero."""
    k = 2 * radius + 1
    p = np.pad(a, (radius + 1, radius)).cumsum(0).cumsum(1)  # leading zero row and column
    return (p[k:, k:] - p[:-k, k:] - p[k:, :-k] + p[:-k, :-k]) / (k * k)


def _strand_profile(f: np.ndarray) -> np.ndarray:
    """Brightness across one thread, f in [0, 1): dark edges, bright middle (a lit cylinder)."""
    return 0.5 + 0.6 * np.sin(np.pi * f)


def _strand_sheen(f: np.ndarray, strength: float) -> np.ndarray:
    """Narrow specular line along the middle of a thread (what makes even black thread shine)."""
    return strength * np.sin(np.pi * f) ** 8


# --- one renderer per kind -------------------------------------------------------------------

class Cells(NamedTuple):
    """Every pixel in cell coordinates: square cells of ``period`` px on the image grid, one
    stitch each, with the stitch's row running along the technique's direction."""

    across: np.ndarray  # 0..1 across the row
    along: np.ndarray  # 0..1 along the row, within one cell
    row: np.ndarray  # int row index
    col: np.ndarray  # int cell index along the row
    period: float  # px


class Stitches(NamedTuple):
    """What a kind lays down inside the regions: per pixel, how the thread is lit and which stitch."""

    shade: np.ndarray  # multiplies the thread colour
    gloss: np.ndarray  # added as white (specular highlights)
    stitch: np.ndarray  # int id, for per-stitch colour variation


def _cells(shape: tuple[int, int], direction: str, period: float) -> Cells:
    """Cell coordinates on the image grid (pixel centres). "vertical" is "horizontal" turned by
    90 degrees: a pattern P(along, across) drawn at (x, y) becomes P(y, 1 - x), so every kind
    shows its direction (a transpose would leave a knot's or a cross's cell unchanged)."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64) + 0.5
    fy, fx = yy / period, xx / period
    if direction == "horizontal":
        along, across, row, col = fx - np.floor(fx), fy - np.floor(fy), np.floor(fy), np.floor(fx)
    else:
        along, across, row, col = fy - np.floor(fy), 1 - (fx - np.floor(fx)), np.floor(fx), np.floor(fy)
    return Cells(across, along, row.astype(np.int64), col.astype(np.int64), period)


def _satin(c: Cells) -> Stitches:
    """Long parallel strands along the rows, one strand per row, with a sheen line."""
    return Stitches(_strand_profile(c.across), _strand_sheen(c.across, 0.25), c.row)


def _tatami(c: Cells) -> Stitches:
    """Short stitches, one per cell: strands broken by a dark needle hole where a stitch starts,
    in the middle of the strand (an eighth of the cell in, so that even a 4 px cell shows it on
    one pixel column)."""
    to_hole = (c.along - 0.125) / 0.1  # in tenths of a cell
    hole = 1 - 0.65 * np.exp(-to_hole ** 2 - ((c.across - 0.5) / 0.3) ** 2)
    return Stitches(_strand_profile(c.across) * hole, _strand_sheen(c.across, 0.15) * hole,
                    c.row * 100003 + c.col)


def _knot(c: Cells) -> Stitches:
    """A dome per cell, lit from the row's start (the side of its specular spot); thread shadow
    between domes."""
    dy, dx = c.across - 0.5, c.along - 0.5
    r2 = (dy ** 2 + dx ** 2) / 0.46 ** 2
    z = np.sqrt(np.clip(1 - r2, 0, 1))
    shade = np.where(r2 < 1, 0.5 + 0.6 * z - 0.5 * dx, GAP_SHADE)
    gloss = np.where(r2 < 1, 0.35 * np.exp(-(dy ** 2 + (dx + 0.2) ** 2) / 0.12 ** 2), 0.0)
    return Stitches(shade, gloss, c.row * 100003 + c.col)


def _cross(c: Cells) -> Stitches:
    """An X per cell, the '/' leg over the '\\' leg; thread shadow around the legs."""
    under, over = np.abs(c.along - c.across) / 0.3, np.abs(c.along + c.across - 1) / 0.3
    top, bottom = over < 1, under < 1
    f = 0.5 * (1 - np.where(top, over, under).clip(0, 1))  # 0 at a leg's edge, 0.5 in its middle
    shade = np.where(top, _strand_profile(f), np.where(bottom, 0.7 * _strand_profile(f), GAP_SHADE))
    gloss = np.where(top, _strand_sheen(f, 0.15), 0.0)
    return Stitches(shade, gloss, (c.row * 100003 + c.col) * 2 + top)


def _chain(c: Cells) -> Stitches:
    """Linked teardrop loops along the rows, the tail at the start of a period, the round end at its end."""
    half_width = 0.5 * (0.55 + 0.45 * c.along)
    q = ((c.along - 0.5) / 0.5) ** 2 + ((c.across - 0.5) / half_width) ** 2
    ring = (q > 0.3) & (q < 1)
    f = ((q - 0.3) / 0.7).clip(0, 1)  # position across the loop's thread
    return Stitches(np.where(ring, _strand_profile(f), GAP_SHADE), np.where(ring, _strand_sheen(f, 0.2), 0.0),
                    c.row * 100003 + c.col)


_RENDERERS: dict[str, Callable[[Cells], Stitches]] = {
    "satin": _satin,
    "tatami": _tatami,
    "knot": _knot,
    "cross": _cross,
    "chain": _chain,
}


def _lustre(shape: tuple[int, int], unit: float) -> np.ndarray:
    """Metallic thread's broad diagonal bands of light, a brightness factor around 1."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64) + 0.5
    return 1 + LUSTRE_AMPLITUDE * np.sin(2 * np.pi * (xx + yy) / (LUSTRE_PERIOD * unit))


# --- compositing -----------------------------------------------------------------------------

def _thread_rgb(design: Design, st: Stitches, mask: np.ndarray, salt: int) -> np.ndarray:
    """Region colour x shade, with a slight per-stitch brightness/tint and fibre noise, + gloss.

    The shade is scaled to mean 1 over the stitches, so on average the thread keeps the design's
    colour and the texture adds detail without shifting the colour.
    """
    h, w = design.labels.shape
    base = design.region_rgb[design.labels].astype(np.float64)
    key = st.stitch * 31 + design.labels
    bright = 1 + STITCH_BRIGHTNESS_JITTER * (2 * _hash01(key, 0, salt) - 1)
    tint = np.stack([STITCH_TINT_JITTER * (2 * _hash01(key, c + 1, salt) - 1) for c in range(3)], -1)
    fibre = 1 + FIBRE_NOISE * (2 * _hash01(np.arange(h * w).reshape(h, w), 9, salt) - 1)
    mean = st.shade[mask].mean() if mask.any() else 1.0
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
    """Stitch ``design`` in ``technique`` ("knot vertical fine metallic"); returns (image (H, W, 3) float32
    0..1, stitched mask). Every kind covers its regions, so the mask is the design's motif area.

    Stitch sizes are defined at 64 px and scale with the image side, so a 128 px render shows
    the same embroidery at twice the resolution. The seed draws only the per-stitch and fibre
    variation: the stitch layout is the fabric grid's.
    """
    kind, direction, spacing, sheen = attributes(technique)
    rng = np.random.default_rng(seed)
    unit = min(design.labels.shape) / BASE_SIDE
    st = _RENDERERS[kind](_cells(design.labels.shape, direction, SPACINGS[spacing] * unit))
    if sheen == "metallic":
        st = st._replace(shade=st.shade * _lustre(design.labels.shape, unit))
    mask = design.labels > 0
    thread = _thread_rgb(design, st, mask, int(rng.integers(2 ** 31)))
    image = np.where(mask[..., None], thread, _fabric_rgb(design, mask, unit))
    return np.clip(image, 0, 1).astype(np.float32), mask.copy()


# --- words -----------------------------------------------------------------------------------

_TOKEN_ID = {w: i for i, w in enumerate(VOCAB)}


def tokenize(text: str, length: int = PROMPT_LENGTH) -> list[int]:
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


def sample_pair(seed: int, technique: str, size: int = 64, colours: tuple[str, ...] | None = None) -> dict:
    """One analogy pair for demos: a design, its embroidery in ``technique`` and both prompts.

    Keys: design (H, W, 3), embroidery (H, W, 3), mask, labels, fabric_rgb, words,
    design_prompt ("a red circle blue star") and embroidery_prompt ("... in <trigger> style").
    Prompts have at most 10 words, so they fit ``tokenize``'s default length (PROMPT_LENGTH).
    ``colours`` limits the design's thread colours (see make_design).
    """
    design = make_design(seed, size, colours)
    embroidery, mask = render_embroidery(design, technique, seed)
    prompt = "a " + " ".join(design.words)
    return dict(design=design.image, embroidery=embroidery, mask=mask, labels=design.labels,
                fabric_rgb=design.fabric_rgb, words=list(design.words), design_prompt=prompt,
                embroidery_prompt=f"{prompt} in {TRIGGER} style")
