"""EmoLoRA's block-selection metric: which attention blocks see the stitches.

Both images of the pair are noised with the same noise at several timesteps; at each, the
output of every self-attention layer (F = to_out(softmax(QK^T/sqrt(d))V), i.e. attn1.to_out.0)
is recorded for both. A block's score is the cosine similarity of the two images' outputs,
each channel centred over the tokens first (:func:`centred_cosine`), averaged over its layers and
the timesteps. Low similarity = the block reacts to embroidery
texture rather than to the picture, so it is a candidate style block. The paper inverts both
images with ReNoise first; we noise them directly (same noise), which needs no inversion and
compares the same thing at each noise level.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable

import torch
import torch.nn.functional as F

from .blocks import block_of, block_sort_key

SELF_ATTENTION_OUTPUT = "attn1.to_out.0"
DEFAULT_TIMESTEPS = 10  # the paper averages over 10 segments of its 50 steps


class FeatureRecorder:
    """A forward wrapper provider (like AdapterSet) that records self-attention outputs."""

    def __init__(self, names: list[str]):
        self.names = [n for n in names if n.endswith(SELF_ATTENTION_OUTPUT)]
        self.records: dict[str, list[torch.Tensor]] = defaultdict(list)

    def wrap(self, name: str, original: Callable) -> Callable:
        def forward(x, *args, **kwargs):
            out = original(x, *args, **kwargs)
            self.records[name].append(out.detach().float().cpu())
            return out

        return forward

    def take(self) -> dict[str, list[torch.Tensor]]:
        records, self.records = dict(self.records), defaultdict(list)
        return records


def centred_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per batch item of two ``[batch, tokens, channels]`` feature maps, each
    channel centred over the tokens first. A plain cosine over the whole map is dominated by the
    channels' mean, which both images share: on the toy base every block scored >= 0.99, so the
    ranking was noise. Centred, it compares how the features vary across the picture (a
    correlation), which is what stitches change. A one-token map has nothing to centre over and is
    compared plainly. The paper does not give its exact reduction (METHODS.md section 1)."""
    if a.ndim >= 3 and a.shape[-2] > 1:
        a = a - a.mean(dim=-2, keepdim=True)
        b = b - b.mean(dim=-2, keepdim=True)
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


def block_similarity(first: dict[str, list[torch.Tensor]], second: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """Mean centred cosine similarity per block between two recordings of the same calls."""
    per_block: dict[str, list[float]] = defaultdict(list)
    for name, outputs in first.items():
        block = block_of(name)
        for a, b in zip(outputs, second.get(name, [])):
            per_block[block].append(centred_cosine(a, b).mean().item())
    return {b: sum(v) / len(v) for b, v in sorted(per_block.items(), key=lambda kv: block_sort_key(kv[0])) if v}


def rank_blocks(similarity: dict[str, float]) -> list[tuple[str, float]]:
    """Blocks from most to least stitch-sensitive (lowest similarity first)."""
    return sorted(similarity.items(), key=lambda kv: (kv[1], block_sort_key(kv[0])))


def measure(run: Callable[[torch.Tensor, torch.Tensor], None], recorder: FeatureRecorder,
            design: torch.Tensor, embroidery: torch.Tensor, sigmas: list[torch.Tensor],
            noise: torch.Tensor, prediction: str = "eps") -> dict[str, float]:
    """``run(x_t, sigma)`` calls the model once (with the recorder installed); returns the mean
    similarity per block over all sigmas."""
    from .diffusion import add_noise

    totals: dict[str, list[float]] = defaultdict(list)
    for sigma in sigmas:
        run(add_noise(prediction, design, noise, sigma), sigma)
        a = recorder.take()
        run(add_noise(prediction, embroidery, noise, sigma), sigma)
        b = recorder.take()
        for block, value in block_similarity(a, b).items():
            totals[block].append(value)
    return {b: sum(v) / len(v) for b, v in totals.items()}


def evenly_spaced(sigmas: torch.Tensor, count: int = DEFAULT_TIMESTEPS) -> list[torch.Tensor]:
    """``count`` sigmas spread over a schedule table, from low to high noise."""
    index = torch.linspace(0, len(sigmas) - 1, count + 2)[1:-1].round().long()
    return [sigmas[i].reshape(1) for i in index]


def format_ranking(ranking: list[tuple[str, float]], chosen: list[str]) -> str:
    lines = ["rank  block                 similarity (low = stitch-sensitive)"]
    for i, (block, value) in enumerate(ranking, 1):
        lines.append(f"{i:>4}  {block:<20}  {value:.4f}{'  *' if block in chosen else ''}")
    lines.append("* = returned as style blocks")
    return "\n".join(lines)
