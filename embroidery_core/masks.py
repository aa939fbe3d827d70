"""Region masks for localized styles (DiffStyler, METHODS.md section 3), in plain torch.

Several styles, each inside its own mask, the rest from the base model. The sampler blends the
passes per pixel as ``sum_i m_i * pred_i / sum_i m_i``, and a pixel no pass covers comes out as zero,
so the masks handed to it must form a partition of the image. :func:`partition_masks` turns the
user's masks into one: where they overlap by more than one they are scaled down to sum to one, and
whatever they leave uncovered (``1 - sum``, clipped) becomes the base model's mask.

MASK tensors are ``[B, H, W]`` or ``[H, W]`` floats in 0..1, as in ComfyUI.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

# A remainder this small is rounding, not a region: dropping it saves the base model a whole pass.
REMAINDER_EPS = 1e-5


def as_mask_batch(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """A MASK as float32 ``[B, H, W]`` clamped to 0..1; ValueError for anything else."""
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a MASK [B,H,W] or [H,W], got {shape}")
    if mask.ndim == 2:
        mask = mask[None]
    if 0 in mask.shape:
        raise ValueError(f"{name} is empty: shape {tuple(mask.shape)}")
    if not torch.isfinite(mask).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return mask.float().clamp(0.0, 1.0)


def _common_batch(masks: list[torch.Tensor], names: Sequence[str]) -> int:
    batches = {m.shape[0] for m in masks} - {1}
    if len(batches) > 1:
        listed = ", ".join(f"{n}: {m.shape[0]}" for n, m in zip(names, masks))
        raise ValueError(f"masks have different batch sizes ({listed}); use batch 1 or one size for all")
    return batches.pop() if batches else 1


def partition_masks(masks: Sequence[torch.Tensor], names: Sequence[str] | None = None
                    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """``(region masks, base mask)`` that sum to exactly one at every pixel.

    - each mask is clamped to 0..1; all must have the same height and width (the sampler stretches
      masks to the latent, so different sizes would not line up); a batch of 1 is broadcast;
    - where the masks sum to more than one they are divided by their sum (overlaps are shared);
    - the base mask is ``1 - sum`` clipped at 0, or None when the regions cover everything;
    - an all-zero mask is an error: that region would have no effect (unpainted or inverted mask).
    """
    if not masks:
        raise ValueError("at least one region mask is needed")
    names = list(names) if names is not None else [f"mask {i + 1}" for i in range(len(masks))]
    if len(names) != len(masks):
        raise ValueError(f"got {len(masks)} masks but {len(names)} names")
    batched = [as_mask_batch(m, n) for m, n in zip(masks, names)]
    sizes = {tuple(m.shape[1:]) for m in batched}
    if len(sizes) > 1:
        listed = ", ".join(f"{n}: {m.shape[2]}x{m.shape[1]}" for n, m in zip(names, batched))
        raise ValueError(f"masks have different sizes ({listed}); make them the same size as the image")
    for name, mask in zip(names, batched):
        if not mask.any():
            raise ValueError(f"{name} is empty (all zero), so its style would never show; paint it or remove it")
    batch = _common_batch(batched, names)
    stacked = torch.stack([m.expand(batch, -1, -1) for m in batched])
    total = stacked.sum(0)
    regions = stacked / total.clamp_min(1.0)
    base = (1.0 - regions.sum(0)).clamp(0.0, 1.0)
    base = torch.where(base > REMAINDER_EPS, base, torch.zeros_like(base))
    return list(regions.unbind(0)), (base if base.any() else None)
