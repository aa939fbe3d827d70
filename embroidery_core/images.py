"""Image helpers for the embroidery pack: colour spaces, EmoLoRA's colour fix, a model-free
embroidery -> flat design filter, and small previews (side-by-side strips, bar charts).

Every function takes and returns ComfyUI-style tensors unless said otherwise:
IMAGE is float32 ``[B, H, W, C]`` in 0..1 (C = 3; a 4th alpha channel is dropped, a single
grey channel is repeated), MASK is ``[B, H, W]`` or ``[H, W]`` in 0..1. Results are float32 on
the input's device, deterministic, and cheap enough to run on CPU at 1024 px.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .clustering import lloyd, plus_plus

# --- colour space constants (sRGB, D65) -----------------------------------------------------------
_SRGB_TO_XYZ = torch.tensor(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ],
    dtype=torch.float64,
)
_XYZ_TO_SRGB = torch.linalg.inv(_SRGB_TO_XYZ)
# White taken from the matrix itself (not the rounded 0.95047/1/1.08883) so that sRGB white
# lands on exactly L=100, a=b=0.
_D65_WHITE = _SRGB_TO_XYZ.sum(dim=1)
_LAB_EPS = (6.0 / 29.0) ** 3
_LAB_KAPPA = 3.0 * (6.0 / 29.0) ** 2

# --- flatten_design defaults ----------------------------------------------------------------------
FLATTEN_COLOURS = 8
FLATTEN_SMOOTH_ITERS = 3
FLATTEN_OUTLINE = 0.5
MAX_COLOURS = 32  # a flat design rarely needs more; also bounds the mode filter's one-hot memory
MAX_SMOOTH_ITERS = 20
KMEANS_SAMPLES = 20_000  # k-means runs on a subsample; every pixel is assigned afterwards
KMEANS_ITERS = 20
# Clusters whose centres are closer than this (delta E in k-means space, see below) are one
# colour split in two by thread shading; merging them keeps a plain background from turning
# into outlined blotches.
MERGE_DELTA_E = 10.0
# Thread relief and sheen swing lightness far more than hue, so k-means sees L at half weight:
# clusters then follow thread colours instead of light and shadow (black vs white still differ by 50).
KMEANS_LAB_WEIGHTS = (0.5, 1.0, 1.0)
# Thread texture scales with the picture, so the filter sizes do too (fractions of the long side).
# Floors keep the filters useful on small previews and test images.
KUWAHARA_RADIUS_FRAC, KUWAHARA_MIN_RADIUS = 1 / 256, 2  # 4 px at 1024
MODE_FILTER_FRAC, MODE_FILTER_MIN = 1 / 200, 3  # majority vote over ~5 px at 1024 removes speckles
OUTLINE_WIDTH_FRAC = 1 / 512  # line half-width: 2 px lines at 1024, 1 px below 768
OUTLINE_RGB = (0.06, 0.05, 0.05)  # near-black, like the ink lines of a vector design

# --- preview defaults -----------------------------------------------------------------------------
PREVIEW_HEIGHT = 512
PREVIEW_GAP = 8
CHART_WIDTH = 768
CHART_MIN_WIDTH = 320  # room for labels (<= 40 %), two value columns and a bar
CHART_FONT_SIZE = 13
CHART_PAD = 10
CHART_BAR_RGB = (70, 110, 170)
CHART_HIGHLIGHT_RGB = (230, 120, 30)
CHART_TEXT_RGB = (30, 30, 30)
CHART_AXIS_RGB = (150, 150, 150)
LATENT_MULTIPLE = 8


# === shape helpers ================================================================================
def _as_rgb(img: torch.Tensor, name: str = "image") -> torch.Tensor:
    """Validate an IMAGE and return it as float32 [B,H,W,3] (alpha dropped, grey repeated)."""
    if not isinstance(img, torch.Tensor) or img.dim() != 4 or img.shape[-1] not in (1, 3, 4):
        shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
        raise ValueError(f"{name} must be an IMAGE tensor [B,H,W,C] with C in 1/3/4, got {shape}")
    if img.shape[0] == 0 or img.shape[1] == 0 or img.shape[2] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(img.shape)}")
    img = img.float()
    if img.shape[-1] == 1:
        return img.expand(-1, -1, -1, 3)
    return img[..., :3]


def _resize_bhwc(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize [B,H,W,C]: area when shrinking both sides (no aliasing from thread texture),
    antialiased bicubic otherwise; clamped because bicubic overshoots."""
    if img.shape[1] == height and img.shape[2] == width:
        return img
    x = img.movedim(-1, 1)
    if height <= img.shape[1] and width <= img.shape[2]:
        x = F.interpolate(x, size=(height, width), mode="area")
    else:
        x = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return x.movedim(1, -1).clamp(0.0, 1.0)


def _match_batch(t: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Broadcast a batch of 1 to ``batch``; any other mismatch is an error."""
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise ValueError(f"{name} has batch {t.shape[0]} but the output has batch {batch}; use 1 or {batch}")


# === colour spaces ================================================================================
def rgb_to_lab(img: torch.Tensor) -> torch.Tensor:
    """sRGB in 0..1 (last dim 3) -> CIE L*a*b* (D65): L in 0..100, a/b roughly -128..127.

    Uses the exact piecewise sRGB curve; inputs are clamped to 0..1 first because the curve
    is undefined for negatives. Works on any leading shape.
    """
    if img.shape[-1] != 3:
        raise ValueError(f"rgb_to_lab expects 3 channels in the last dim, got shape {tuple(img.shape)}")
    c = img.float().clamp(0.0, 1.0)
    linear = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = (_SRGB_TO_XYZ / _D65_WHITE[:, None]).to(device=c.device, dtype=c.dtype)
    xyz = linear @ m.T  # already divided by the white point
    f = torch.where(xyz > _LAB_EPS, xyz.clamp_min(_LAB_EPS) ** (1.0 / 3.0), xyz / _LAB_KAPPA + 4.0 / 29.0)
    fx, fy, fz = f.unbind(-1)
    return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=-1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* (D65) -> sRGB, clamped to 0..1 (out-of-gamut colours are clipped per channel)."""
    if lab.shape[-1] != 3:
        raise ValueError(f"lab_to_rgb expects 3 channels in the last dim, got shape {tuple(lab.shape)}")
    L, a, b = lab.float().unbind(-1)
    fy = (L + 16.0) / 116.0
    f = torch.stack((fy + a / 500.0, fy, fy - b / 200.0), dim=-1)
    xyz = torch.where(f > 6.0 / 29.0, f**3, _LAB_KAPPA * (f - 4.0 / 29.0))
    m = (_XYZ_TO_SRGB * _D65_WHITE[None, :]).to(device=lab.device, dtype=torch.float32)
    linear = (xyz @ m.T).clamp(0.0, 1.0)
    srgb = torch.where(linear <= 0.0031308, linear * 12.92, 1.055 * linear ** (1.0 / 2.4) - 0.055)
    return srgb.clamp(0.0, 1.0)


# === EmoLoRA colour fix ===========================================================================
def _prepare_mask(mask: torch.Tensor | None, batch: int, height: int, width: int, device) -> torch.Tensor:
    """MASK [B,H,W] or [H,W] -> [B,H,W,1] matching the output (bilinear resize, batch-1 broadcast)."""
    if mask is None:
        return torch.ones(batch, height, width, 1, device=device)
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() != 3:
        raise ValueError(f"mask must be [B,H,W] or [H,W], got shape {tuple(mask.shape)}")
    mask = _match_batch(mask.float().to(device), batch, "mask")
    if mask.shape[1:] != (height, width):
        mask = F.interpolate(mask[:, None], size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    return mask.clamp(0.0, 1.0)[..., None]


def colour_fix(
    output: torch.Tensor, design: torch.Tensor, strength: float = 1.0, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """EmoLoRA's inference-time colour fix: keep the output's lightness (the stitches, shading and
    thread relief live there) and take the chroma a/b from the design (the colours the user asked for).

    The blend happens in LAB: L from ``output``, ``ab = lerp(ab_output, ab_design, strength * mask)``,
    then back to sRGB. Where the weight is 0 the output is returned bit-exactly (no round trip).
    A design chroma that is out of gamut at the output's lightness is clipped per channel, which
    can shift L a little there (saturated colours on near-white or near-black stitches).
    ``design`` is resized (bilinear) to the output size and a batch of 1 is broadcast; the same
    for ``mask``.
    """
    if not isinstance(strength, numbers.Real) or not 0.0 <= strength <= 1.0:  # NaN fails the range too
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    out = _as_rgb(output, "output")
    des = _match_batch(_as_rgb(design, "design").to(out.device), out.shape[0], "design")
    batch, height, width, _ = out.shape
    if des.shape[1:3] != (height, width):
        des = des.movedim(-1, 1)
        des = F.interpolate(des, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        des = des.movedim(1, -1).clamp(0.0, 1.0)
    weight = _prepare_mask(mask, batch, height, width, out.device) * float(strength)
    if strength == 0.0:
        return out.clone()
    lab_out, lab_des = rgb_to_lab(out), rgb_to_lab(des)
    ab = torch.lerp(lab_out[..., 1:], lab_des[..., 1:], weight)
    fixed = lab_to_rgb(torch.cat((lab_out[..., :1], ab), dim=-1))
    return torch.where(weight > 0, fixed, out)


# === embroidery -> flat design ====================================================================
def _kuwahara(x: torch.Tensor, radius: int) -> torch.Tensor:
    """One Kuwahara pass on [1,C,H,W]: each pixel takes the mean of whichever of its four
    (radius+1)^2 corner windows has the least variance. Flattens stitch texture but keeps
    edges, because the window never straddles an edge when a flat one exists.
    Box means via avg_pool, so the cost does not grow with the radius."""
    _, c, h, w = x.shape
    padded = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    # Pool the channels and their summed square together: var = E[|x|^2] - |E[x]|^2.
    stacked = torch.cat((padded, (padded * padded).sum(1, keepdim=True)), dim=1)
    pooled = F.avg_pool2d(stacked, radius + 1, stride=1)
    mean, var = pooled[:, :c], pooled[:, c] - (pooled[:, :c] ** 2).sum(1)
    best_mean, best_var = mean[:, :, :h, :w], var[:, :h, :w]
    for dy, dx in ((0, radius), (radius, 0), (radius, radius)):
        q_var = var[:, dy : dy + h, dx : dx + w]
        better = q_var < best_var
        best_mean = torch.where(better[:, None], mean[:, :, dy : dy + h, dx : dx + w], best_mean)
        best_var = torch.where(better, q_var, best_var)
    return best_mean


def _kmeans(points: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on a seeded subsample of [N,3] LAB points (CPU, so any device gives the
    same palette). Returns [k,3] centres and [k] counts; an empty cluster keeps its centre."""
    gen = torch.Generator().manual_seed(seed)
    points = points.cpu()
    if len(points) > KMEANS_SAMPLES:
        points = points[torch.randint(len(points), (KMEANS_SAMPLES,), generator=gen)]
    return lloyd(points, plus_plus(points, k, gen), KMEANS_ITERS, atol=1e-4)


def _merge_close(centres: torch.Tensor, counts: torch.Tensor, delta_e: float) -> torch.Tensor:
    """Merge the closest pair of centres (count-weighted) until all are ``delta_e`` apart;
    empty clusters are dropped. ``colours`` is thus a maximum, not a quota."""
    keep = counts > 0
    centres, counts = centres[keep], counts[keep]
    while len(centres) > 1:
        d = torch.cdist(centres, centres) + torch.eye(len(centres)) * 1e9
        i, j = divmod(int(d.argmin()), len(centres))
        if float(d[i, j]) >= delta_e:
            break
        total = counts[i] + counts[j]
        centres[i] = (centres[i] * counts[i] + centres[j] * counts[j]) / total
        counts[i] = total
        rest = torch.arange(len(centres)) != j
        centres, counts = centres[rest], counts[rest]
    return centres


def _mode_filter(labels: torch.Tensor, k: int, size: int) -> torch.Tensor:
    """Majority vote of the labels in a size x size window ([H,W] long): removes the speckles
    and jagged boundaries that per-pixel assignment leaves, as a vector design would have."""
    if size < 3:
        return labels
    one_hot = F.one_hot(labels, k).movedim(-1, 0)[None].float()
    # Box counts are separable; zero padding is harmless because argmax ignores a per-pixel scale.
    votes = F.avg_pool2d(one_hot, (1, size), stride=1, padding=(0, size // 2))
    votes = F.avg_pool2d(votes, (size, 1), stride=1, padding=(size // 2, 0))
    return votes[0].argmax(0)


def _boundaries(labels: torch.Tensor, half_width: int) -> torch.Tensor:
    """[H,W] bool: pixels within ``half_width`` of a change of label (lines sit on both sides
    of the boundary, so they are centred on it). Image borders are not boundaries."""
    size = 2 * half_width + 1
    x = F.pad(labels[None, None].float(), (half_width,) * 4, mode="replicate")
    hi = F.max_pool2d(x, size, stride=1)
    lo = -F.max_pool2d(-x, size, stride=1)
    return (hi != lo)[0, 0]


def _filter_sizes(long_side: int) -> tuple[int, int, int]:
    """Kuwahara radius, mode filter size (odd) and outline half-width for an image's long side."""
    radius = max(KUWAHARA_MIN_RADIUS, round(long_side * KUWAHARA_RADIUS_FRAC))
    mode_size = max(MODE_FILTER_MIN, 2 * round(long_side * MODE_FILTER_FRAC / 2) + 1)
    return radius, mode_size, max(1, round(long_side * OUTLINE_WIDTH_FRAC))


def _flatten_one(
    rgb: torch.Tensor, colours: int, smooth_iters: int, outline: float, seed: int
) -> torch.Tensor:
    """flatten_design for a single [H,W,3] image."""
    h, w, _ = rgb.shape
    radius, mode_size, half_width = _filter_sizes(max(h, w))
    lab = rgb_to_lab(rgb).movedim(-1, 0)[None]
    for _ in range(smooth_iters):
        lab = _kuwahara(lab, radius)
    weights = torch.tensor(KMEANS_LAB_WEIGHTS, device=rgb.device)
    pixels = lab[0].flatten(1).T * weights  # [H*W, 3], k-means space
    centres = _merge_close(*_kmeans(pixels, colours, seed), MERGE_DELTA_E).to(pixels.device)
    labels = torch.cdist(pixels, centres).argmin(1).view(h, w)
    labels = _mode_filter(labels, len(centres), mode_size)
    result = lab_to_rgb(centres / weights)[labels]
    if outline > 0.0:
        edges = _boundaries(labels, half_width)[..., None]
        ink = torch.tensor(OUTLINE_RGB, device=rgb.device)
        result = torch.where(edges, torch.lerp(result, ink.expand_as(result), outline), result)
    return result


def flatten_design(
    img: torch.Tensor,
    colours: int = FLATTEN_COLOURS,
    smooth_iters: int = FLATTEN_SMOOTH_ITERS,
    outline: float = FLATTEN_OUTLINE,
    seed: int = 0,
) -> torch.Tensor:
    """Model-free stand-in for EmoLoRA's SD3+ControlNet "embroidery -> flat design" step.

    Kuwahara smoothing in LAB (removes thread texture, keeps shape edges), seeded k-means in LAB
    to ``colours`` flat colours, a majority filter to clean the label map, then dark lines on the
    label boundaries with opacity ``outline`` (0 = none). The result has at most ``colours``
    colours plus the outline colour (``outline`` = 1) or plus one blend per colour (0 < outline < 1).
    Each image of the batch is processed alone with the same seed, so a picture's design does not
    depend on its position in the batch.
    """
    if not isinstance(colours, int) or not 1 <= colours <= MAX_COLOURS:
        raise ValueError(f"colours must be an integer in [1, {MAX_COLOURS}], got {colours!r}")
    if not isinstance(smooth_iters, int) or not 0 <= smooth_iters <= MAX_SMOOTH_ITERS:
        raise ValueError(f"smooth_iters must be an integer in [0, {MAX_SMOOTH_ITERS}], got {smooth_iters!r}")
    if not isinstance(outline, numbers.Real) or not 0.0 <= outline <= 1.0:
        raise ValueError(f"outline must be a number in [0, 1], got {outline!r}")
    rgb = _as_rgb(img, "image")
    return torch.stack([_flatten_one(one, colours, smooth_iters, float(outline), seed) for one in rgb])


# === sizing and PIL ===============================================================================
def resize_to_multiple(img: torch.Tensor, long_side: int, multiple: int = LATENT_MULTIPLE) -> torch.Tensor:
    """Resize keeping the aspect ratio so the longer side is ``long_side`` and both sides are
    multiples of ``multiple`` (8 for SD/SDXL latents; 64 keeps every UNet level even).
    ``long_side`` itself is rounded to the nearest multiple; the short side never drops below one."""
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be a positive integer, got {multiple!r}")
    if not isinstance(long_side, int) or long_side < multiple:
        raise ValueError(f"long_side must be an integer >= multiple ({multiple}), got {long_side!r}")
    rgb = _as_rgb(img, "image")
    h, w = rgb.shape[1:3]
    scale = long_side / max(h, w)
    new_h = max(multiple, round(h * scale / multiple) * multiple)
    new_w = max(multiple, round(w * scale / multiple) * multiple)
    return _resize_bhwc(rgb, new_h, new_w).clamp(0.0, 1.0)


def to_pil(img: torch.Tensor) -> Image.Image:
    """First image of the batch -> PIL RGB (values clamped, rounded to 8 bits)."""
    rgb = _as_rgb(img, "image")[0].clamp(0.0, 1.0)
    array = (rgb * 255.0).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def from_pil(pil: Image.Image) -> torch.Tensor:
    """PIL image (any mode; alpha is dropped) -> IMAGE [1,H,W,3] float32 in 0..1."""
    array = np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy())[None]


# === previews =====================================================================================
def side_by_side(
    images: list[torch.Tensor], height: int = PREVIEW_HEIGHT, gap: int = PREVIEW_GAP
) -> torch.Tensor:
    """A [1,H,W,3] strip for previews: the first image of each batch, scaled to ``height``
    (aspect kept), left to right with ``gap`` white columns between them."""
    if not images:
        raise ValueError("side_by_side needs at least one image, got an empty list")
    if not isinstance(height, int) or height < 1 or not isinstance(gap, int) or gap < 0:
        raise ValueError(f"height must be >= 1 and gap >= 0, got height={height!r}, gap={gap!r}")
    parts = []
    for i, img in enumerate(images):
        rgb = _as_rgb(img, f"images[{i}]")[:1].cpu()
        width = max(1, round(rgb.shape[2] * height / rgb.shape[1]))
        if parts and gap:
            parts.append(torch.ones(1, height, gap, 3))
        parts.append(_resize_bhwc(rgb, height, width).clamp(0.0, 1.0))
    return torch.cat(parts, dim=2)


def _chart_font(size: int = CHART_FONT_SIZE) -> ImageFont.ImageFont:
    """PIL's default font, at ``size`` where this Pillow supports it (>= 10.1), else the bitmap one."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _format_value(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.4g}"


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, max_width: float) -> str:
    """Cut ``text`` with '...' until it fits ``max_width`` pixels (long block names)."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "...", font=font) > max_width:
        text = text[:-1]
    return text + "..."


def _bar_geometry(values: list[float], x0: float, x1: float) -> tuple[float, float]:
    """Map the finite values (and 0) onto pixels x0..x1: returns (x of zero, pixels per unit)."""
    finite = [v for v in values if math.isfinite(v)]
    lo, hi = min([0.0, *finite]), max([0.0, *finite])
    per_unit = (x1 - x0) / ((hi - lo) or 1.0)
    return x0 - lo * per_unit, per_unit


def _draw_row(draw, font, y: int, row: int, value: float, colour, zero: float, per_unit: float) -> None:
    """One bar from the zero line, its value at the bar's end (left of it for negatives)."""
    text = _format_value(value)
    if not math.isfinite(value):
        draw.text((zero + 4, y + 4), text, fill=CHART_TEXT_RGB, font=font)
        return
    end = zero + value * per_unit
    draw.rectangle([(min(zero, end), y + 3), (max(zero, end), y + row - 3)], fill=colour)
    text_x = end + 4 if value >= 0 else end - 4 - draw.textlength(text, font=font)
    draw.text((text_x, y + 4), text, fill=CHART_TEXT_RGB, font=font)


def bar_chart(
    labels: list[str],
    values: list[float],
    title: str = "",
    highlight: set[str] | None = None,
    width: int = CHART_WIDTH,
) -> torch.Tensor:
    """Horizontal bar chart as an IMAGE [1,H,W,3]: one row per label, the value printed at the
    bar's end, ``highlight`` labels in a second colour (e.g. the chosen style blocks).
    Bars grow from a zero line, so negative values point left; NaN/inf get no bar and read "n/a".
    No labels gives a small chart that says "no data"."""
    if len(labels) != len(values):
        raise ValueError(f"bar_chart got {len(labels)} labels but {len(values)} values")
    if not isinstance(width, int) or width < CHART_MIN_WIDTH:
        raise ValueError(f"width must be an integer >= {CHART_MIN_WIDTH}, got {width!r}")
    labels, values, highlight = [str(s) for s in labels], [float(v) for v in values], set(highlight or ())
    font = _chart_font()
    row = sum(font.getmetrics()) + 8
    top = CHART_PAD + (row if title else 0)
    image = Image.new("RGB", (width, top + row * max(1, len(labels)) + CHART_PAD), "white")
    draw = ImageDraw.Draw(image)
    title = _fit_text(draw, title, font, width - 2 * CHART_PAD)
    draw.text((CHART_PAD, CHART_PAD), title, fill=CHART_TEXT_RGB, font=font)
    if not labels:
        draw.text((CHART_PAD, top + 4), "no data", fill=CHART_TEXT_RGB, font=font)
        return from_pil(image)
    label_w = min(max(draw.textlength(s, font=font) for s in labels), width * 0.4)
    value_w = max(draw.textlength(_format_value(v), font=font) for v in values) + 6
    x0 = CHART_PAD + label_w + 8 + (value_w if any(v < 0 for v in values) else 0)
    zero, per_unit = _bar_geometry(values, x0, width - CHART_PAD - value_w)
    draw.line([(zero, top), (zero, image.height - CHART_PAD)], fill=CHART_AXIS_RGB)
    for i, (label, value) in enumerate(zip(labels, values)):
        y = top + i * row
        draw.text((CHART_PAD, y + 4), _fit_text(draw, label, font, label_w), fill=CHART_TEXT_RGB, font=font)
        colour = CHART_HIGHLIGHT_RGB if label in highlight else CHART_BAR_RGB
        _draw_row(draw, font, y, row, value, colour, zero, per_unit)
    return from_pil(image)


# ---------------------------------------------------------------------------- region pictures

REGION_COLOURS = ((0.90, 0.25, 0.20), (0.20, 0.55, 0.90), (0.25, 0.75, 0.30), (0.95, 0.75, 0.15), (0.60, 0.30, 0.80),
                  (0.10, 0.75, 0.75), (0.95, 0.45, 0.65), (0.55, 0.40, 0.25), (0.50, 0.50, 0.50), (0.80, 0.85, 0.20))
UNMATCHED = (0.15, 0.15, 0.15)


def _palette(count: int) -> torch.Tensor:
    return torch.tensor([REGION_COLOURS[i % len(REGION_COLOURS)] for i in range(count)])


def region_preview(image: torch.Tensor, labels: torch.Tensor, colours: torch.Tensor | None = None,
                   opacity: float = 0.55) -> torch.Tensor:
    """IMAGE [1, H, W, 3] with each label of ``labels`` [H, W] tinted in its colour ([K, 3];
    region i gets REGION_COLOURS[i] by default) -> [H, W, 3]."""
    colours = _palette(int(labels.max()) + 1) if colours is None else colours
    tint = colours[labels.long()]
    return (image[0, ..., :3] * (1 - opacity) + tint * opacity).clamp(0, 1)


def matched_regions_sheet(content: torch.Tensor, content_labels: torch.Tensor, styles: torch.Tensor,
                          style_labels: list[torch.Tensor], matches: list[tuple[int, int]], semantic: bool,
                          height: int = 256) -> torch.Tensor:
    """Which reference region feeds which content region: the content with region c in colour c,
    then every reference with the regions matched to content region c in the same colour
    (unmatched regions dark); a caption says what the semantic term was. -> [h, W, 3]."""
    palette = _palette(len(matches))
    tiles = [region_preview(content, content_labels, palette)]
    for s, labels in enumerate(style_labels):
        colours = torch.tensor(UNMATCHED).repeat(int(labels.max()) + 1, 1)
        for c, (image, region) in enumerate(matches):
            if image == s:
                colours[region] = palette[c]
        tiles.append(region_preview(styles[s:s + 1], labels, colours))
    sheet = to_pil(side_by_side([t[None] for t in tiles], height))
    caption = "semantic: DINOv2" if semantic else "semantic: decoder features (no CLIP vision connected)"
    ImageDraw.Draw(sheet).text((6, 6), caption, fill=(255, 255, 255), font=_chart_font())
    return from_pil(sheet)[0]
