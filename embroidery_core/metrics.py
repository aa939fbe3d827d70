"""Image metrics of the EmoLoRA evaluation (METHODS.md section 1, "Evaluation"), for toy and real images.

Images are float arrays in 0..1, shaped (H, W, 3) or as a ComfyUI batch (B, H, W, 3); numpy
arrays and torch tensors both work (torch is never imported here). (H, W) is read as grey.

The paper's definitions are not available, so these are ours, chosen to mirror its columns:

- HFRD (lower is better): |HFR(output) - HFR(reference)| in percentage points, where HFR is the
  share of spectral energy above a radial frequency cutoff. The paper's cutoff is unknown; ours
  is 0.25 of Nyquist.
- Hist(design) (lower is better): chi-square distance between RGB histograms of the output and
  the design, x 100. It asks: did the output keep the design's colours?
- Hist(ref) (higher is better): histogram intersection of the output and the reference
  embroidery, x 100. It asks: does the output use the reference's thread colours and shading?

A batch is pooled: HFR is averaged over its images, histograms count all of its pixels.
"""
from __future__ import annotations

import numpy as np

LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601 luminance weights
NYQUIST = 0.5  # cycles per pixel
HFR_CUTOFF = 0.25  # fraction of Nyquist; our choice, the paper's value is unknown
HIST_BINS = 16  # per channel, so 16^3 colour bins
FABRIC_TOL = 0.12  # max per-channel difference still counted as fabric
_FLAT_VARIANCE = 1e-12  # luminance variance below this is a constant image


def _numpy(x) -> np.ndarray:
    """A float64 numpy copy of a numpy array or a torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float64)


def _batch(img) -> np.ndarray:
    """Any accepted image as (B, H, W, 3) float64."""
    a = _numpy(img)
    shape = a.shape
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected an image (H, W, 3) or a batch (B, H, W, 3), got shape {shape}")
    return a


# --- high-frequency energy ---------------------------------------------------------------------

def _radial_frequency(h: int, w: int) -> np.ndarray:
    """|f| / Nyquist for every FFT bin of an h x w array (0 at DC, sqrt(2) in the corners)."""
    fy, fx = np.fft.fftfreq(h), np.fft.fftfreq(w)
    return np.hypot(fy[:, None], fx[None, :]) / NYQUIST


def _hfr_one(luma: np.ndarray, cutoff: float) -> float:
    """High-frequency ratio of one (H, W) luminance image."""
    y = luma - luma.mean()
    if y.var() < _FLAT_VARIANCE:
        return 0.0
    # Mirror to 2H x 2W so the FFT sees no jump where the image wraps around (as a DCT would);
    # otherwise a smooth gradient would count its border as a high-frequency edge.
    y = np.concatenate([y, y[::-1]], axis=0)
    y = np.concatenate([y, y[:, ::-1]], axis=1)
    power = np.abs(np.fft.fft2(y)) ** 2
    return float(power[_radial_frequency(*y.shape) > cutoff].sum() / power.sum())


def high_frequency_ratio(img, cutoff: float = HFR_CUTOFF) -> float:
    """Share of spectral energy at high frequency, in 0..1.

    HFR = sum_{rho > cutoff} |F(u, v)|^2 / sum |F(u, v)|^2, where F is the 2-D FFT of the
    luminance Y = 0.299 R + 0.587 G + 0.114 B with its mean removed (the image mirrored to
    2H x 2W first), and rho = sqrt(fx^2 + fy^2) / 0.5 is the radial frequency relative to the
    Nyquist frequency 0.5 cycles/pixel (so rho = 1 at Nyquist on an axis, sqrt(2) in the corner).
    The paper's cutoff is unknown; 0.25 of Nyquist (periods shorter than 8 px) is our choice.
    A constant image gives 0, a one-pixel checkerboard nearly 1. A batch gives the mean over images.
    """
    luma = _batch(img) @ LUMA
    return float(np.mean([_hfr_one(y, cutoff) for y in luma]))


def hfrd(output, reference, cutoff: float = HFR_CUTOFF) -> float:
    """High-frequency ratio difference, in percentage points (lower is better).

    HFRD = |HFR(output) - HFR(reference)| x 100. For a batch of outputs it is the mean over the
    outputs of |HFR(output_i) - HFR(reference)|, the reference's HFR being averaged over its batch.
    """
    ref = high_frequency_ratio(reference, cutoff)
    return float(np.mean([abs(high_frequency_ratio(o, cutoff) - ref) for o in _batch(output)]) * 100)


# --- colour histograms -------------------------------------------------------------------------

def colour_histogram(img, bins: int = HIST_BINS) -> np.ndarray:
    """Joint RGB histogram, shape (bins, bins, bins), summing to 1.

    Channel values in 0..1 fall into bin floor(v x bins) (1.0 into the last bin); a batch
    pools all of its pixels.
    """
    idx = np.clip(np.floor(_batch(img).reshape(-1, 3) * bins), 0, bins - 1).astype(np.int64)
    flat = (idx[:, 0] * bins + idx[:, 1]) * bins + idx[:, 2]
    counts = np.bincount(flat, minlength=bins ** 3).astype(np.float64)
    return (counts / counts.sum()).reshape(bins, bins, bins)


def _histogram(x, bins: int) -> np.ndarray:
    """``x`` itself if it is already a (bins, bins, bins) histogram, else its colour histogram."""
    if np.ndim(x) == 3 and np.shape(x) == (bins,) * 3:
        return _numpy(x)
    return colour_histogram(x, bins)


def histogram_distance(a, b, bins: int = HIST_BINS, kind: str = "chi2") -> float:
    """Distance between the colour histograms p, q of ``a`` and ``b`` (images or histograms).

    - "chi2":         0.5 x sum (p - q)^2 / (p + q), over bins with p + q > 0; in 0..1.
                      Used (x 100) for Hist(design), see ``hist_design_distance``.
    - "intersection": 1 - sum min(p, q); in 0..1. One minus it (x 100) is Hist(ref), see
                      ``hist_ref_similarity``.
    - "l1":           sum |p - q|; in 0..2 (for normalised histograms it is exactly twice the
                      intersection distance).
    All are 0 for identical colour content and maximal (1, 1, 2) for disjoint colours.
    """
    p, q = _histogram(a, bins), _histogram(b, bins)
    if kind == "chi2":
        total = p + q
        used = total > 0
        return float(0.5 * np.sum((p[used] - q[used]) ** 2 / total[used]))
    if kind == "intersection":
        return float(1.0 - np.minimum(p, q).sum())
    if kind == "l1":
        return float(np.abs(p - q).sum())
    raise ValueError(f"unknown histogram distance {kind!r}; expected 'chi2', 'intersection' or 'l1'")


def hist_design_distance(output, design, bins: int = HIST_BINS) -> float:
    """Hist(design), lower is better: 100 x chi-square distance of the RGB histograms (0..100)."""
    return 100.0 * histogram_distance(output, design, bins, kind="chi2")


def hist_ref_similarity(output, reference, bins: int = HIST_BINS) -> float:
    """Hist(ref), higher is better: 100 x sum min(p, q), the histogram intersection (0..100)."""
    return 100.0 * (1.0 - histogram_distance(output, reference, bins, kind="intersection"))


# --- content -----------------------------------------------------------------------------------

def content_iou(pred_mask, true_mask) -> float:
    """Intersection over union |P and T| / |P or T| of two boolean masks; 1.0 if both are empty."""
    p, t = _numpy(pred_mask) > 0.5, _numpy(true_mask) > 0.5
    if p.shape != t.shape:
        raise ValueError(f"mask shapes differ: {p.shape} vs {t.shape}")
    union = np.logical_or(p, t).sum()
    return 1.0 if union == 0 else float(np.logical_and(p, t).sum() / union)


def stitched_mask(img, fabric_rgb, tol: float = FABRIC_TOL) -> np.ndarray:
    """Pixels that are not plain fabric: max_c |img_c - fabric_c| > tol.

    Returns bool (H, W), or (B, H, W) for a batch. ``tol`` must exceed the fabric's own texture
    and the stitches' shadow (both under 0.1 in the toy world).
    """
    a = _numpy(img)
    fabric = _numpy(fabric_rgb).reshape(3)
    if a.shape[-1] != 3:
        raise ValueError(f"expected RGB images (..., 3), got shape {a.shape}")
    return np.abs(a - fabric).max(axis=-1) > tol


def estimate_fabric_rgb(img) -> np.ndarray:
    """The fabric colour of an image whose motifs do not fill it: the median of its border pixels."""
    a = _batch(img)
    border = np.concatenate([a[:, 0], a[:, -1], a[:, :, 0], a[:, :, -1]], axis=1).reshape(-1, 3)
    return np.median(border, axis=0)
