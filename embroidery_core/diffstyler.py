"""DiffStyler's pieces in plain torch (METHODS.md section 3): DDIM inversion of the source, the
self-attention q/k blend of the source branch into the others, and the masked fusion of the
style branches' predictions. The sampler-graph nodes (issue 13) are built on these.

Sigma form of :mod:`diffusion` throughout (``x_t = x0 + sigma * eps`` for eps and v models), so a
DDIM step between two noise levels is ``x' = x0_hat + sigma' * eps_hat``, the same formula up and
down the schedule; inversion runs it upwards from the clean source.

Reading order: the schedule, inversion, the attention blend, the fusion.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .diffusion import check_prediction, denoised

# raw model output for (x_t, sigma [B]): what diffusion.Denoiser returns with its conditioning bound
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_sigmas(schedule: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` noise levels evenly spaced in timestep from the last one down to timestep 0, then
    0: the descending levels a DDIM sampler visits, and (reversed) the ones inversion climbs."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    index = torch.linspace(len(schedule) - 1, 0, steps).round().long()
    return torch.cat([schedule[index].float(), torch.zeros(1)])


def _eps_and_x0(prediction: str, output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor):
    x0 = denoised(prediction, output.float(), x, sigma)
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return (x - x0) / s, x0


@dataclass
class Inversion:
    """The source latent at every level of a DDIM schedule: ``latents[i]`` lies at
    ``sigmas[i]`` (descending, ``sigmas[-1] = 0`` is the source itself). The source branch of
    DiffStyler replays ``latents[i]`` at sampling step i."""

    sigmas: torch.Tensor   # [N + 1], descending, last 0
    latents: torch.Tensor  # [N + 1, B, C, H, W]

    @property
    def noisy(self) -> torch.Tensor:
        """The fully inverted latent, where sampling starts."""
        return self.latents[0]


@torch.no_grad()
def invert(model: ModelFn, prediction: str, source: torch.Tensor, sigmas: torch.Tensor,
           sigma_min: float) -> Inversion:
    """DDIM inversion: from the clean ``source`` up the levels of ``sigmas`` (descending, as
    :func:`ddim_sigmas` gives them), each step predicting eps at the current latent and level
    (``sigma_min``, the schedule's smallest level, stands in for 0 at the first step)."""
    check_prediction(prediction)
    if prediction == "flow":
        raise ValueError("DDIM inversion here is for eps and v models (SD1.5, SD2.x, SDXL); flow models differ")
    up = sigmas.flip(0)
    x = source.float()
    latents = [x]
    for sigma, sigma_next in zip(up[:-1], up[1:]):
        at = torch.full((x.shape[0],), max(float(sigma), sigma_min))
        eps, x0 = _eps_and_x0(prediction, model(x, at), x, at)
        x = x0 + sigma_next * eps
        latents.append(x)
    return Inversion(sigmas.float(), torch.stack(latents[::-1]))


@torch.no_grad()
def ddim_sample(model: ModelFn, prediction: str, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta 0) down ``sigmas`` from ``x``: the inverse of :func:`invert` when
    the model's prediction barely changes between neighbouring levels."""
    x = x.float()
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        at = torch.full((x.shape[0],), float(sigma))
        eps, x0 = _eps_and_x0(prediction, model(x, at), x, at)
        x = x0 + sigma_next * eps
    return x


# ---------------------------------------------------------------------------- attention blend

def blend_ratio(timestep: float, total: int = 1000) -> float:
    """DiffStyler's adaptive attention fusion weight r = min(1, 2t / T)."""
    return min(1.0, 2.0 * float(timestep) / total)


def blend(x: torch.Tensor, source: torch.Tensor, ratio: float) -> torch.Tensor:
    """r x_src + (1 - r) x; r = 0 returns ``x`` itself. A source of batch 1 serves every sample."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"the blend ratio must be in [0, 1], got {ratio}")
    if ratio == 0.0:
        return x
    if source.shape[0] == 1 and x.shape[0] != 1:
        source = source.expand_as(x)
    return ratio * source.to(x.dtype) + (1 - ratio) * x


def blend_query_key(q: torch.Tensor, k: torch.Tensor, q_source: torch.Tensor, k_source: torch.Tensor,
                    ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q <- r q_src + (1 - r) q and k <- r k_src + (1 - r) k; v is untouched. r = 0 returns the
    inputs themselves."""
    return blend(q, q_source, ratio), blend(k, k_source, ratio)


class SourceInjection:
    """DiffStyler's injection as forward wrappers (``adapters.installed`` on a plain UNet; object
    patches on a ComfyUI clone): while :meth:`recording`, the source branch's self-attention
    queries and keys (``attn1.to_q`` / ``to_k`` of ``attention_blocks``) and the residual-branch
    output of ``feature_block`` (its ``out_layers``) are kept; while :meth:`injecting`, every
    other branch's queries and keys are blended with them (:func:`blend`, ratio r) and, with
    ``features``, that residual output is replaced by the source's. Values are untouched.
    Outside both, the wrappers change nothing."""

    def __init__(self, arch, attention_blocks: list[str], feature_block: str | None):
        self.attention = [f"{b}.transformer_blocks.{i}.attn1.{p}" for b in attention_blocks
                          for i in range(arch.transformer_depth(b)) for p in ("to_q", "to_k")]
        self.feature = None if feature_block is None else f"{feature_block}.out_layers"
        self.names = self.attention + ([self.feature] if self.feature else [])
        self.mode: str | None = None
        self.ratio, self.features = 0.0, False
        self.store: dict[str, torch.Tensor] = {}

    @contextlib.contextmanager
    def recording(self):
        self.store.clear()
        previous, self.mode = self.mode, "record"
        try:
            yield
        finally:
            self.mode = previous

    @contextlib.contextmanager
    def injecting(self, ratio: float, features: bool):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"the blend ratio must be in [0, 1], got {ratio}")
        previous = self.mode, self.ratio, self.features
        self.mode, self.ratio, self.features = "inject", ratio, features
        try:
            yield
        finally:
            self.mode, self.ratio, self.features = previous

    def _source(self, name: str) -> torch.Tensor:
        if name not in self.store:
            raise ValueError(f"no source output of {name} was recorded; run the source branch first")
        return self.store[name]

    def wrap(self, name: str, original):
        is_feature = name == self.feature

        def forward(x, *args, **kwargs):
            out = original(x, *args, **kwargs)
            if self.mode == "record":
                self.store[name] = out.detach()
            elif self.mode == "inject":
                if is_feature:
                    return self._source(name).expand_as(out).to(out.dtype) if self.features else out
                return blend(out, self._source(name), self.ratio)
            return out

        return forward


# ---------------------------------------------------------------------------- fusion

def latent_masks(masks: list[torch.Tensor], height: int, width: int) -> list[torch.Tensor]:
    """Masks [H, W] or [1, H, W] (any size, 0..1) -> boolean [1, 1, height, width] at the latent's
    size: nearest resize, then > 0.5 (DiffStyler's masks are boolean)."""
    out = []
    for i, mask in enumerate(masks):
        m = mask.float()
        if m.ndim == 3:
            m = m[:1]
        elif m.ndim != 2:
            raise ValueError(f"mask {i + 1} must be [H, W] or [1, H, W], got {tuple(mask.shape)}")
        m = m.reshape(1, 1, *m.shape[-2:])
        out.append(F.interpolate(m, size=(height, width), mode="nearest") > 0.5)
    return out


def fuse(base: torch.Tensor, styles: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The base branch's prediction with each style branch's prediction inside its mask
    (``styles = [(prediction, boolean mask [1, 1, h, w])]``). Where masks overlap, the later
    style wins (the official code overwrites in order). Outside every mask the result is the
    base prediction, bit for bit."""
    out = base.clone()
    for i, (prediction, mask) in enumerate(styles):
        if prediction.shape != base.shape:
            raise ValueError(f"style {i + 1}'s prediction is {tuple(prediction.shape)}, the base's {tuple(base.shape)}")
        out = torch.where(mask.to(base.device), prediction.to(base.dtype), out)
    return out
