"""StyleGallery's semantic regions in plain torch (METHODS.md section 4): decoder features of a
short DDIM inversion, mixed over timesteps, standardised, reduced by PCA and clustered with
k-means, k chosen by the silhouette; close clusters merged, an optional depth split, small islands
absorbed. No scikit-learn: every step is a small seeded torch function, tested on its own.

Reading order: timestep weights, PCA, k-means and the silhouette, then the clean-ups (merge,
depth, islands), then :func:`find_regions`, the whole recipe.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RegionConfig:
    """Every constant of the official clustering recipe in one place."""

    inversion_steps: int = 15
    time_sharpness: float = 5.0  # w_t ~ 1 / (1 + e^{sharpness (t/T - centre)})
    time_centre: float = 0.7
    components: int = 60  # PCA
    k_min: int = 2
    k_max: int = 10
    kmeans_iterations: int = 50
    kmeans_restarts: int = 3
    silhouette_points: int = 2000  # a seeded subsample keeps the silhouette O(n^2) small
    merge_distance: float = 0.85  # clusters whose mean latents are closer are one region
    depth_span: float = 0.75  # p95 - p5 of depth (0..1) at which a cluster splits in two by depth
    depth_merge_latent: float = 0.35  # re-merge when the latent distance is below this ...
    depth_merge_depth: float = 0.3  # ... and the mean depth differs by less than this
    min_island: int = 20  # pixels (at the feature map's size): smaller connected pieces are absorbed
    seed: int = 0


# ---------------------------------------------------------------------------- features


def time_weights(timesteps: list[float], total: int = 1000, sharpness: float = 5.0, centre: float = 0.7) -> torch.Tensor:
    """w_t proportional to 1 / (1 + e^{sharpness (t/T - centre)}), summing to 1: the low-noise
    steps, where features are sharp, count most."""
    t = torch.tensor([float(x) for x in timesteps], dtype=torch.float64)
    w = 1.0 / (1.0 + torch.exp(sharpness * (t / total - centre)))
    return (w / w.sum()).float()


def mix_features(features: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_t w_t F_t over feature maps [C, h, w] of one image."""
    if len(features) != len(weights):
        raise ValueError(f"{len(features)} feature maps but {len(weights)} weights")
    return sum(w * f.float() for w, f in zip(weights.tolist(), features))


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Rows are points, columns features: zero mean and unit variance per column (a constant
    column stays 0)."""
    std = x.std(dim=0, unbiased=False)
    return (x - x.mean(dim=0)) / torch.where(std > 0, std, torch.ones_like(std))


def pca(x: torch.Tensor, components: int) -> torch.Tensor:
    """The points ``x`` [n, d] projected on their first ``components`` principal axes (exact SVD
    of the centred data; signs fixed so the largest loading of each axis is positive)."""
    centred = x - x.mean(dim=0)
    _, _, vh = torch.linalg.svd(centred.double(), full_matrices=False)
    axes = vh[: min(components, vh.shape[0])]
    signs = torch.sign(axes.gather(1, axes.abs().argmax(dim=1, keepdim=True)))
    return (centred.double() @ (axes * signs).T).float()


# ---------------------------------------------------------------------------- k-means


def _plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to D^2."""
    centres = [x[torch.randint(len(x), (1,), generator=generator)].squeeze(0)]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centres)).min(dim=1).values ** 2
        if float(d2.sum()) == 0.0:
            centres.append(x[torch.randint(len(x), (1,), generator=generator)].squeeze(0))
            continue
        centres.append(x[torch.multinomial(d2 / d2.sum(), 1, generator=generator)].squeeze(0))
    return torch.stack(centres)


def kmeans(x: torch.Tensor, k: int, iterations: int = 50, restarts: int = 3, seed: int = 0) -> torch.Tensor:
    """Labels [n] of Lloyd's k-means from k-means++ seeds, the best of ``restarts`` by inertia."""
    if not 1 <= k <= len(x):
        raise ValueError(f"k must be in 1..{len(x)} (the number of points), got {k}")
    generator = torch.Generator().manual_seed(seed)
    best, best_inertia = None, math.inf
    for _ in range(restarts):
        centres = _plus_plus(x, k, generator)
        for _ in range(iterations):
            labels = torch.cdist(x, centres).argmin(dim=1)
            moved = torch.stack([x[labels == j].mean(dim=0) if (labels == j).any() else centres[j] for j in range(k)])
            if torch.allclose(moved, centres):
                break
            centres = moved
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


def merge_close(labels: torch.Tensor, values: torch.Tensor, threshold: float) -> torch.Tensor:
    """Repeatedly merge the two regions whose mean ``values`` (per pixel [h, w, d]) are closest
    (L2), while that distance is below ``threshold``. Returns relabelled labels."""
    labels = labels.clone()
    while True:
        ids = labels.unique()
        if len(ids) < 2:
            return relabel(labels)
        means = torch.stack([values[labels == i].float().mean(dim=0) for i in ids])
        d = torch.cdist(means, means).fill_diagonal_(math.inf)
        flat = int(d.argmin())
        i, j = divmod(flat, len(ids))
        if float(d[i, j]) >= threshold:
            return relabel(labels)
        labels[labels == ids[j]] = ids[i]


def split_by_depth(labels: torch.Tensor, depth: torch.Tensor, span: float, seed: int = 0) -> torch.Tensor:
    """Split every region whose depth span (95th - 5th percentile, depth in 0..1) is >= ``span``
    into its near and far part (2-means on depth)."""
    out = labels.clone()
    next_id = int(labels.max()) + 1
    for i in labels.unique().tolist():
        inside = labels == i
        d = depth[inside].float()
        if len(d) < 2 or float(torch.quantile(d, 0.95) - torch.quantile(d, 0.05)) < span:
            continue
        halves = kmeans(d[:, None], 2, seed=seed)
        far = torch.zeros_like(inside)
        far[inside] = halves == 1
        out[far] = next_id
        next_id += 1
    return relabel(out)


def merge_by_depth(labels: torch.Tensor, values: torch.Tensor, depth: torch.Tensor, latent_threshold: float,
                   depth_threshold: float) -> torch.Tensor:
    """Re-merge regions that are close in mean ``values`` (< latent_threshold) and in mean depth
    (< depth_threshold): what a depth split separated needlessly."""
    labels = labels.clone()
    merged = True
    while merged:
        merged = False
        ids = labels.unique().tolist()
        means = {i: values[labels == i].float().mean(dim=0) for i in ids}
        depths = {i: float(depth[labels == i].float().mean()) for i in ids}
        for a in ids:
            for b in ids:
                if a < b and float((means[a] - means[b]).norm()) < latent_threshold \
                        and abs(depths[a] - depths[b]) < depth_threshold:
                    labels[labels == b] = a
                    merged = True
                    break
            if merged:
                break
    return relabel(labels)


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
    """Every connected piece of a region smaller than ``min_pixels`` takes the label its border
    touches most (smallest pieces first), so no region is left with specks."""
    labels = labels.clone()
    changed = True
    while changed:
        changed = False
        pieces = []
        for i in labels.unique().tolist():
            comp = components(labels == i)
            pieces += [(int((comp == n).sum()), i, comp == n) for n in range(1, int(comp.max()) + 1)]
        for size, i, piece in sorted(pieces, key=lambda p: p[0]):
            if size >= min_pixels or len(pieces) < 2:
                continue
            ring = _dilate(piece) & ~piece
            around = labels[ring]
            around = around[around != i]
            if len(around) == 0:
                continue
            labels[piece] = int(torch.mode(around).values)
            changed = True
            break
    return relabel(labels)


def _dilate(mask: torch.Tensor) -> torch.Tensor:
    m = torch.nn.functional.max_pool2d(mask[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0
    return m


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
        labels = split_by_depth(labels, depth, config.depth_span, config.seed)
        labels = merge_by_depth(labels, values, depth, config.depth_merge_latent, config.depth_merge_depth)
    return absorb_islands(labels, config.min_island), scores


def region_masks(labels: torch.Tensor) -> torch.Tensor:
    """Labels [h, w] -> one boolean mask per region [K, h, w]."""
    return torch.stack([labels == i for i in range(int(labels.max()) + 1)])
