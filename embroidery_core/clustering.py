"""Seeded k-means in plain torch, shared by the design flattener (colours) and StyleGallery's
regions (diffusion features): k-means++ seeding and Lloyd's iterations.

No scikit-learn: the pack depends on torch alone, and a seeded torch generator makes every
palette and region map reproducible on any device.
"""
from __future__ import annotations

import torch


def plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding of [k, d] centres from [n, d] points: the first uniformly, each next
    one with probability proportional to its squared distance to the nearest centre so far (a
    point set with fewer distinct points than k duplicates one)."""
    centres = points[torch.randint(len(points), (1,), generator=generator)]
    for _ in range(1, k):
        d2 = torch.cdist(points, centres).amin(1) ** 2
        if float(d2.sum()) <= 0.0:
            idx = torch.randint(len(points), (1,), generator=generator)
        else:
            idx = torch.multinomial(d2, 1, generator=generator)
        centres = torch.cat((centres, points[idx]))
    return centres


def lloyd(points: torch.Tensor, centres: torch.Tensor, iterations: int,
          atol: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's iterations from ``centres``: (centres, counts of the last assignment). An empty
    cluster keeps its centre; it stops early once no centre moves by more than ``atol``."""
    k = len(centres)
    counts = torch.zeros(k, 1, dtype=points.dtype)
    for _ in range(iterations):
        labels = torch.cdist(points, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, labels, points)
        counts = torch.bincount(labels, minlength=k).to(points.dtype)[:, None]
        moved = torch.where(counts > 0, sums / counts.clamp_min(1.0), centres)
        converged = torch.allclose(moved, centres, atol=atol)
        centres = moved
        if converged:
            break
    return centres, counts[:, 0]
