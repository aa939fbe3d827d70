"""StyleGallery's semantic regions in plain torch (METHODS.md section 4): decoder features of a
short DDIM inversion, mixed over timesteps, standardised, reduced by PCA and clustered with
k-means, k chosen by the silhouette; close clusters merged, an optional depth split, small islands
absorbed. No scikit-learn: every step is a small seeded torch function, tested on its own.

Reading order: timestep weights, PCA, k-means and the silhouette, then the clean-ups (merge,
depth, islands), then :func:`find_regions`, the whole recipe.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .blocks import NUM_RES_BLOCKS, _upsampler_part
from .clustering import lloyd, plus_plus
from .diffusion import eps_and_x0


@dataclass(frozen=True)
class RegionConfig:
    """Every constant of the official clustering recipe in one place."""

    inversion_steps: int = 15
    time_sharpness: float = 5.0  # w_x ~ 1 / (1 + e^{sharpness (x/N - centre)}), x the inversion step
    time_centre: float = 0.7
    components: int = 60  # PCA
    k_min: int = 2
    k_max: int = 10
    kmeans_iterations: int = 64
    kmeans_restarts: int = 10
    silhouette_points: int = 5000  # the official sample size: every pixel of a 64 x 64 map
    merge_distance: float = 0.85  # regions whose mean latents are closer are one (single linkage)
    depth_span: float = 0.75  # p95 - p5 of depth (0..1) at which a region splits in two by depth
    depth_min_pixels: int = 20  # smaller regions are never split
    depth_merge_latent: float = 0.35  # re-merge when the latent distance is below this ...
    depth_merge_depth: float = 0.3  # ... and the mean depth differs by less than this
    min_island: int = 20  # pixels (at the feature map's size): smaller connected pieces are absorbed
    seed: int = 42


# ---------------------------------------------------------------------------- features


def time_weights(steps: int, sharpness: float = 5.0, centre: float = 0.7) -> torch.Tensor:
    """w_x proportional to 1 / (1 + e^{sharpness (x/N - centre)}) for the inversion's steps
    x = 0..N-1 (0 the least noisy), summing to 1: sharp low-noise features count most (the
    official code weighs by step index, not by timestep)."""
    x = torch.arange(steps, dtype=torch.float64)
    w = 1.0 / (1.0 + torch.exp(sharpness * (x / steps - centre)))
    return (w / w.sum()).float()


def mix_features(features: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_t w_t F_t over feature maps [C, h, w] of one image."""
    if len(features) != len(weights):
        raise ValueError(f"{len(features)} feature maps but {len(weights)} weights")
    return sum(w * f.float() for w, f in zip(weights.tolist(), features))


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Rows are points, columns features: zero mean and unit (unbiased) variance per column (a
    constant column stays 0)."""
    std = x.std(dim=0)
    return (x - x.mean(dim=0)) / torch.where(std > 0, std, torch.ones_like(std))


def pca(x: torch.Tensor, components: int) -> torch.Tensor:
    """The points ``x`` [n, d] projected on their first ``components`` principal axes: an exact
    SVD of the centred data (the official code's randomised ``pca_lowrank`` approximates it),
    signs fixed so the largest loading of each axis is positive."""
    centred = x - x.mean(dim=0)
    _, _, vh = torch.linalg.svd(centred.double(), full_matrices=False)
    axes = vh[: min(components, vh.shape[0])]
    signs = torch.sign(axes.gather(1, axes.abs().argmax(dim=1, keepdim=True)))
    return (centred.double() @ (axes * signs).T).float()


# ---------------------------------------------------------------------------- k-means


def kmeans(x: torch.Tensor, k: int, iterations: int = 50, restarts: int = 3, seed: int = 0) -> torch.Tensor:
    """Labels [n] of Lloyd's k-means from k-means++ seeds, the best of ``restarts`` by inertia."""
    if not 1 <= k <= len(x):
        raise ValueError(f"k must be in 1..{len(x)} (the number of points), got {k}")
    generator = torch.Generator().manual_seed(seed)
    best, best_inertia = None, math.inf
    for _ in range(restarts):
        centres, _ = lloyd(x, plus_plus(x, k, generator), iterations)
        labels = torch.cdist(x, centres).argmin(dim=1)
        inertia = float(((x - centres[labels]) ** 2).sum())
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def silhouette(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean silhouette (b - a) / max(a, b) over the points; points alone in their cluster count 0.
    One cluster only: -1 (never the best choice)."""
    clusters = labels.unique()
    if len(clusters) < 2:
        return -1.0
    d = torch.cdist(x.double(), x.double())
    mean_to = torch.stack([d[:, labels == c].mean(dim=1) for c in clusters], dim=1)  # [n, K]
    own = (labels[:, None] == clusters[None, :])
    sizes = own.double().sum(dim=0)
    size_of = (own.double() * sizes).sum(dim=1)
    a = (mean_to * own).sum(dim=1) * size_of / (size_of - 1).clamp(min=1)  # exclude the point itself
    b = mean_to.masked_fill(own, math.inf).min(dim=1).values
    s = (b - a) / torch.maximum(a, b).clamp(min=1e-12)
    return float(torch.where(size_of > 1, s, torch.zeros_like(s)).mean())


def best_k(x: torch.Tensor, k_min: int = 2, k_max: int = 10, sample: int = 2000, iterations: int = 50,
           restarts: int = 3, seed: int = 0) -> tuple[int, torch.Tensor, dict[int, float]]:
    """k-means for every k in k_min..k_max, scored by the silhouette on a seeded subsample of at
    most ``sample`` points; returns (k, labels of all points, {k: score})."""
    generator = torch.Generator().manual_seed(seed)
    subset = torch.randperm(len(x), generator=generator)[: min(sample, len(x))]
    scores, labelings = {}, {}
    for k in range(k_min, min(k_max, len(x) - 1) + 1):
        labels = kmeans(x, k, iterations, restarts, seed)
        labelings[k] = labels
        scores[k] = silhouette(x[subset], labels[subset])
    if not scores:
        raise ValueError(f"{len(x)} points are too few to cluster into {k_min}..{k_max} regions")
    k = max(scores, key=lambda j: (scores[j], -j))  # ties: the fewer regions
    return k, labelings[k], scores


# ---------------------------------------------------------------------------- clean-ups


def relabel(labels: torch.Tensor) -> torch.Tensor:
    """Labels renumbered 0..K-1 in order of first appearance (row-major)."""
    flat = labels.flatten()
    order: dict[int, int] = {}
    for v in flat.tolist():
        order.setdefault(v, len(order))
    return torch.tensor([order[v] for v in flat.tolist()], dtype=torch.long).reshape(labels.shape)


def _union(labels: torch.Tensor, close: Callable[[int, int], bool]) -> torch.Tensor:
    """Single linkage: every pair of regions for which ``close(a, b)`` holds (judged on the
    regions as they are now) ends in one region. Returns relabelled labels."""
    ids = labels.unique().tolist()
    root = {i: i for i in ids}

    def find(i):
        while root[i] != i:
            i = root[i]
        return i

    for x, a in enumerate(ids):
        for b in ids[x + 1:]:
            if close(a, b):
                root[find(b)] = find(a)
    out = labels.clone()
    for i in ids:
        out[labels == i] = find(i)
    return relabel(out)


def merge_close(labels: torch.Tensor, values: torch.Tensor, threshold: float) -> torch.Tensor:
    """Regions whose mean ``values`` (per pixel [h, w, d], the latent) are closer (L2) than
    ``threshold`` are merged, with single linkage on the means before merging (as the official
    code chains its pairs)."""
    means = {i: values[labels == i].float().mean(dim=0) for i in labels.unique().tolist()}
    return _union(labels, lambda a, b: float((means[a] - means[b]).norm()) < threshold)


def split_by_depth(labels: torch.Tensor, depth: torch.Tensor, span: float, min_pixels: int = 20,
                   seed: int = 42) -> torch.Tensor:
    """Split every region of at least ``min_pixels`` whose depth span (95th - 5th percentile by
    rank, depth in 0..1) is >= ``span`` into its near and far part (2-means on depth)."""
    out = labels.clone()
    next_id = int(labels.max()) + 1
    for i in labels.unique().tolist():
        inside = labels == i
        d = depth[inside].float()
        n = len(d)
        if n < min_pixels:
            continue
        ranked = d.sort().values
        if float(ranked[int(0.95 * n)] - ranked[int(0.05 * n)]) < span:
            continue
        halves = kmeans(d[:, None], 2, restarts=1, seed=seed)
        far = torch.zeros_like(inside)
        far[inside] = halves == 1
        out[far] = next_id
        next_id += 1
    return relabel(out)


def merge_by_depth(labels: torch.Tensor, values: torch.Tensor, depth: torch.Tensor, latent_threshold: float,
                   depth_threshold: float) -> torch.Tensor:
    """Re-merge regions close in mean ``values`` (< latent_threshold) and in mean depth
    (< depth_threshold): what a depth split separated needlessly."""
    means = {i: values[labels == i].float().mean(dim=0) for i in labels.unique().tolist()}
    depths = {i: float(depth[labels == i].float().mean()) for i in means}
    return _union(labels, lambda a, b: float((means[a] - means[b]).norm()) < latent_threshold
                  and abs(depths[a] - depths[b]) < depth_threshold)


def components(mask: torch.Tensor) -> torch.Tensor:
    """4-connected components of a boolean [h, w] mask: ids 1..N inside, 0 outside (label
    propagation with min-pooling, so plain torch)."""
    h, w = mask.shape
    big = h * w + 1
    ids = torch.where(mask, torch.arange(1, h * w + 1, dtype=torch.long).reshape(h, w), torch.full((h, w), big))
    while True:
        padded = torch.nn.functional.pad(ids[None, None].float(), (1, 1, 1, 1), value=float(big))[0, 0]
        neighbours = torch.stack([padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2],
                                  padded[1:-1, 2:]]).min(dim=0).values.long()
        new = torch.where(mask, neighbours, ids)
        if torch.equal(new, ids):
            break
        ids = new
    out = torch.zeros((h, w), dtype=torch.long)
    for n, v in enumerate(ids[mask].unique().tolist(), start=1):
        out[ids == v] = n
    return out


def absorb_islands(labels: torch.Tensor, min_pixels: int) -> torch.Tensor:
    """Every 4-connected piece of a region smaller than ``min_pixels`` takes the label most
    frequent on its ring (a one-step cross dilation, its own label excluded), read from the
    labels before any absorption, as the official code does."""
    out = labels.clone()
    for i in labels.unique().tolist():
        comp = components(labels == i)
        for n in range(1, int(comp.max()) + 1):
            piece = comp == n
            if int(piece.sum()) >= min_pixels:
                continue
            around = labels[_cross_dilate(piece) & ~piece]
            around = around[around != i]
            if len(around):
                out[piece] = int(torch.mode(around).values)
    return relabel(out)


def _cross_dilate(mask: torch.Tensor) -> torch.Tensor:
    cross = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]])[None, None]
    return torch.nn.functional.conv2d(mask[None, None].float(), cross, padding=1)[0, 0] > 0


# ---------------------------------------------------------------------------- the recipe


def find_regions(features: torch.Tensor, latent: torch.Tensor, depth: torch.Tensor | None = None,
                 config: RegionConfig = RegionConfig()) -> tuple[torch.Tensor, dict[int, float]]:
    """Region labels [h, w] (0..K-1) of one image from its mixed decoder features [C, h, w] and
    its latent [c, h, w] at the same size (resize first); with ``depth`` [h, w] in 0..1, the depth
    split and re-merge. Returns (labels, silhouette score per k)."""
    c, h, w = features.shape
    if latent.shape[-2:] != (h, w) or (depth is not None and depth.shape != (h, w)):
        raise ValueError(f"features are {h} x {w}; latent {tuple(latent.shape[-2:])} and depth "
                         f"{None if depth is None else tuple(depth.shape)} must match")
    points = pca(standardise(features.reshape(c, h * w).T.float()), config.components)
    _, labels, scores = best_k(points, config.k_min, config.k_max, config.silhouette_points,
                               config.kmeans_iterations, config.kmeans_restarts, config.seed)
    labels = labels.reshape(h, w)
    values = latent.float().permute(1, 2, 0)
    labels = merge_close(labels, values, config.merge_distance)
    if depth is not None:
        labels = split_by_depth(labels, depth, config.depth_span, config.depth_min_pixels, config.seed)
        labels = merge_by_depth(labels, values, depth, config.depth_merge_latent, config.depth_merge_depth)
    return absorb_islands(labels, config.min_island), scores


def region_masks(labels: torch.Tensor) -> torch.Tensor:
    """Labels [h, w] -> one boolean mask per region [K, h, w]."""
    return torch.stack([labels == i for i in range(int(labels.max()) + 1)])


# ---------------------------------------------------------------------------- where the features come from


def feature_block(arch, level: int | None = None) -> str:
    """The module whose output StyleGallery clusters: the output of SD1.5's up_blocks.2, i.e. its
    upsampler (output_blocks.8.2: 640 channels at the latent's full size). The same rule, the
    upsampler ending the second-to-last decoder level, gives SDXL's output_blocks.5.2 (the end of
    up_blocks.1, 640 channels at full size; our extension). The upsampler rather than the whole
    block, because ComfyUI's UNet runs a block's layers one by one, never the block's forward.

    ``level`` (decoder levels counted from the middle block, 0-based) picks the end of another
    level; the default is the official ``arch.levels - 2``. The last level has no upsampler: its
    end is its last block's last layer (the attention block where it has one)."""
    level = arch.levels - 2 if level is None else level
    if not 0 <= level < arch.levels:
        raise ValueError(f"decoder level {level} does not exist; this UNet has levels 0..{arch.levels - 1}")
    last = level == arch.levels - 1
    part = (1 if arch.up_attention[level] else 0) if last else _upsampler_part(level, arch)
    return f"output_blocks.{(level + 1) * (NUM_RES_BLOCKS + 1) - 1}.{part}"


def invert_for_regions(model, prediction: str, source: torch.Tensor, schedule: torch.Tensor, steps: int = 15):
    """The official clustering inversion, in the sigma form: diffusers' DDIM timesteps with
    "leading" spacing (1, 67, ..., 925 for 15 steps) climbed in order, each step evaluating the
    model on the current latent labelled with the step's own timestep (so the model sees the
    latent of the level below at that timestep, as the official loop does) and moving it up one
    level. ``model(x, sigma)`` returns the raw output; the caller records features at each call
    (step x = 0 is the least noisy). Returns the latent at the last level (the official C15)."""
    stride = len(schedule) // steps
    x = source.float()
    for t in [stride * i + 1 for i in range(steps)]:
        below, here = float(schedule[max(0, t - stride)]), float(schedule[t])
        # the same VP latent, labelled with the step's timestep: sigma form scales by sqrt(1 + sigma^2)
        shown = x * ((1 + here ** 2) / (1 + below ** 2)) ** 0.5
        at = torch.full((x.shape[0],), here)
        eps, _ = eps_and_x0(prediction, model(shown, at), shown, at)
        x = (x - below * eps) + here * eps  # x0 estimate at the level below, then up to this level
    return x


class BlockRecorder:
    """A forward wrapper (``adapters.installed`` on a plain UNet, an object patch on a ComfyUI
    clone) keeping one module's output, the first sample's, at every call."""

    def __init__(self, name: str):
        self.names, self.outputs = [name], []

    def wrap(self, name, original):
        def forward(*args, **kwargs):
            out = original(*args, **kwargs)
            self.outputs.append(out.detach()[0].float().cpu())
            return out

        return forward


@dataclass
class RegionAnalysis:
    labels: torch.Tensor    # [h, w], 0..K-1
    features: torch.Tensor  # mixed decoder features [C, h, w]
    inverted: torch.Tensor  # the latent at the last inversion level [1, c, h, w]


def depth_map(depth: torch.Tensor, size) -> torch.Tensor:
    """A depth IMAGE [1, H, W, 3] (any depth node's output) -> [h, w] in 0..1 at ``size``:
    channel mean, nearest resize, min-max normalised as the official code does."""
    d = depth[0, ..., :3].float().mean(dim=-1)
    d = torch.nn.functional.interpolate(d[None, None], size=tuple(size), mode="nearest")[0, 0]
    return (d - d.min()) / (d.max() - d.min() + 1e-6)


def analyse_image(model, prediction: str, latent: torch.Tensor, schedule: torch.Tensor, recorder: BlockRecorder,
                  depth: torch.Tensor | None = None, config: RegionConfig = RegionConfig()) -> RegionAnalysis:
    """The whole recipe for one image: ``model(x, sigma)`` (empty prompt, ``recorder`` installed
    on the feature block) runs the inversion, whose recorded features are mixed and clustered
    with the latent (area-resized to them) and an optional depth IMAGE."""
    recorder.outputs.clear()
    inverted = invert_for_regions(model, prediction, latent, schedule, config.inversion_steps)
    features = mix_features(recorder.outputs, time_weights(len(recorder.outputs), config.time_sharpness,
                                                           config.time_centre))
    small = torch.nn.functional.interpolate(latent.float().cpu(), size=features.shape[-2:], mode="area")[0]
    d = None if depth is None else depth_map(depth, features.shape[-2:])
    labels, _ = find_regions(features, small, d, config)
    return RegionAnalysis(labels, features, inverted)
