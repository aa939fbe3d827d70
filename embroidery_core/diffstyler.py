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

from .blocks import NUM_RES_BLOCKS
from .diffusion import check_prediction, eps_and_x0

# raw model output for (x_t, sigma [B]): what diffusion.Denoiser returns with its conditioning bound
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_sigmas(schedule: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` noise levels evenly spaced in timestep from the last one down to timestep 0, then
    0: the descending levels a DDIM sampler visits, and (reversed) the ones inversion climbs."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    index = torch.linspace(len(schedule) - 1, 0, steps).round().long()
    return torch.cat([schedule[index].float(), torch.zeros(1)])


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

    def level(self, sigma: float, rtol: float = 1e-3) -> int:
        """The index of the sampling level at noise ``sigma`` (the source branch replays
        ``latents[index]`` there); ValueError if no level lies within ``rtol`` of it, i.e. the
        sampler does not follow the inversion's schedule."""
        levels = self.sigmas[:-1].double()
        index = int((levels - float(sigma)).abs().argmin())
        if abs(float(levels[index]) - float(sigma)) > rtol * max(abs(float(sigma)), 1e-8):
            raise ValueError(f"the sampler is at sigma {float(sigma):.4g}, which is none of the inversion's "
                             f"{len(levels)} levels; give the sampler the inversion's own sigmas")
        return index


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
        eps, x0 = eps_and_x0(prediction, model(x, at), x, at)
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
        eps, x0 = eps_and_x0(prediction, model(x, at), x, at)
        x = x0 + sigma_next * eps
    return x


# ---------------------------------------------------------------------------- attention blend

def blend_ratio(timestep: float, total: int = 1000) -> float:
    """DiffStyler's adaptive attention fusion weight r = min(1, 2t / T)."""
    return min(1.0, 2.0 * float(timestep) / total)


def _tiled(source: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The source's batch repeated to ``like``'s: a sampler batches the negative and positive
    prompts (and ComfyUI several conds) as copies of the latent batch, one after the other."""
    if source.shape[1:] != like.shape[1:] or like.shape[0] % source.shape[0]:
        raise ValueError(f"the source branch's tensor {tuple(source.shape)} does not match this branch's "
                         f"{tuple(like.shape)} (area conditioning or another latent size?)")
    reps = like.shape[0] // source.shape[0]
    return (source if reps == 1 else source.repeat(reps, *([1] * (source.ndim - 1)))).to(like.dtype)


def blend(x: torch.Tensor, source: torch.Tensor, ratio: float) -> torch.Tensor:
    """r x_src + (1 - r) x; r = 0 returns ``x`` itself. The source's batch is tiled to ``x``'s."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"the blend ratio must be in [0, 1], got {ratio}")
    if ratio == 0.0:
        return x
    return ratio * _tiled(source, x) + (1 - ratio) * x


def blend_query_key(q: torch.Tensor, k: torch.Tensor, q_source: torch.Tensor, k_source: torch.Tensor,
                    ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q <- r q_src + (1 - r) q and k <- r k_src + (1 - r) k; v is untouched. r = 0 returns the
    inputs themselves."""
    return blend(q, q_source, ratio), blend(k, k_source, ratio)


def injection_blocks(arch) -> tuple[str, list[str]]:
    """Where DiffStyler injects, for any family of the block map: the feature block and the
    self-attention blocks. The official code (SD1.5/2.1) uses output_blocks.4.0's residual output
    and attn1 of output_blocks.4.1-11.1, i.e. the second ResBlock of the first decoder level that
    has attention and every attention block from there on; the same rule gives SDXL
    output_blocks.1.0 and 1.1-5.1 (our extension: SDXL's first decoder level is the one with
    attention at 1/32 of the image, like SD1.5's up_blocks.1)."""
    first = next((level for level, depth in enumerate(arch.up_attention) if depth), None)
    if first is None:
        raise ValueError(f"{arch.name} has no attention in its decoder; DiffStyler needs it")
    start = first * (NUM_RES_BLOCKS + 1) + 1
    attention = [b for b in arch.attention_blocks() if b.startswith("output_blocks.")
                 and int(b.split(".")[1]) >= start]
    return f"output_blocks.{start}.0", attention


class SourceInjection:
    """DiffStyler's injection: while :meth:`recording`, the source branch's self-attention
    queries and keys (attn1 of every transformer layer of ``attention_blocks``) and the
    residual-branch output of ``feature_block`` (its ``out_layers``) are kept; while
    :meth:`injecting`, every other branch's queries and keys are blended with them
    (:func:`blend`, ratio r) and, with ``features``, that residual output is replaced by the
    source's. Values are untouched. Outside both, nothing changes.

    Two ways in, one store: :meth:`query_key` / :meth:`feature_output` on already projected
    tensors (ComfyUI's attn1 replace patch and an ``out_layers`` object patch), and
    :meth:`wrap` as forward wrappers on ``to_q`` / ``to_k`` / ``out_layers`` of a plain UNet
    (``adapters.installed``)."""

    def __init__(self, arch, attention_blocks: list[str], feature_block: str | None):
        self.layers = [f"{b}.transformer_blocks.{i}.attn1" for b in attention_blocks
                       for i in range(arch.transformer_depth(b))]
        self.attention = [f"{layer}.{p}" for layer in self.layers for p in ("to_q", "to_k")]
        self.feature = None if feature_block is None else f"{feature_block}.out_layers"
        self.names = self.attention + ([self.feature] if self.feature else [])
        self.mode: str | None = None
        self.ratio, self.features = 0.0, False
        self.store: dict[str, torch.Tensor] = {}

    # One shared state: ComfyUI deep-copies model options (which hold the patches that call
    # this object) on every clone, and a copy would record into a store nobody reads.
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

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

    def projected(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """One of a layer's projected queries or keys (``<layer>.to_q`` / ``.to_k``): kept while
        recording, blended while injecting."""
        if self.mode == "record":
            self.store[name] = out.detach()
        elif self.mode == "inject":
            return blend(out, self._source(name), self.ratio)
        return out

    def query_key(self, layer: str, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.projected(f"{layer}.to_q", q), self.projected(f"{layer}.to_k", k)

    def feature_output(self, out: torch.Tensor) -> torch.Tensor:
        """The feature block's residual-branch output: kept while recording, replaced by the
        source's while injecting with ``features``."""
        if self.mode == "record":
            self.store[self.feature] = out.detach()
        elif self.mode == "inject" and self.features:
            return _tiled(self._source(self.feature), out)
        return out

    def wrap(self, name: str, original):
        is_feature = name == self.feature

        def forward(x, *args, **kwargs):
            out = original(x, *args, **kwargs)
            return self.feature_output(out) if is_feature else self.projected(name, out)

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


# ---------------------------------------------------------------------------- one step, all branches

@dataclass(frozen=True)
class Schedule:
    """When the style branches inject (the base branch always does, as in the official code):
    the source's features for the first ``feature_fraction`` of the steps and the attention blend
    for the first ``attention_fraction`` (official: 30 and 25 of 50)."""

    feature_fraction: float = 0.6
    attention_fraction: float = 0.5

    def __post_init__(self):
        for name in ("feature_fraction", "attention_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in 0..1, got {getattr(self, name)}")

    def style(self, step: int, steps: int) -> tuple[bool, bool]:
        """(features, attention) for a style branch at ``step`` of ``steps`` (0 = the noisiest)."""
        return step < round(self.feature_fraction * steps), step < round(self.attention_fraction * steps)


@dataclass
class Branch:
    """One model of a DiffStyler step. The base branch has no mask; a style branch has its mask
    (boolean [1, 1, h, w] at the latent's size). ``active`` puts the model in this branch's state
    around its passes (a style's LoRA on; the base's off, where a LoRA stays installed). ``source(x_src, sigma)`` runs the source latent through this branch's model (the
    source prompt; only what it records matters) and ``predict(x, sigma)`` returns the
    (negative, positive) predictions at the sampled latent."""

    source: Callable[[torch.Tensor, torch.Tensor], object]
    predict: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor | None = None
    active: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


def fused_step(injection: SourceInjection, branches: list[Branch], schedule: Schedule, step: int, steps: int,
               x: torch.Tensor, source: torch.Tensor, sigma: torch.Tensor, timestep: float,
               total: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """The (negative, positive) predictions of one DiffStyler step, CFG not yet applied: every
    branch first replays the source latent through its own model (the cross-LoRA part), then
    predicts with the source injected (r = min(1, 2t/T)); each style branch's predictions replace
    the base's inside its mask (:func:`fuse`). A style branch whose schedule injects nothing this
    step skips its source pass."""
    if not branches or branches[0].mask is not None or any(b.mask is None for b in branches[1:]):
        raise ValueError("the first branch must be the base (no mask) and every other one a style with a mask")
    ratio = blend_ratio(timestep, total)
    outputs = []
    for branch in branches:
        features, attention = (True, True) if branch.mask is None else schedule.style(step, steps)
        with branch.active():
            if features or attention:
                with injection.recording():
                    branch.source(source, sigma)
            with injection.injecting(ratio if attention else 0.0, features):
                outputs.append(branch.predict(x, sigma))
    (base_negative, base_positive), styles = outputs[0], list(zip(outputs[1:], [b.mask for b in branches[1:]]))
    return (fuse(base_negative, [(neg, mask) for (neg, _), mask in styles]),
            fuse(base_positive, [(pos, mask) for (_, pos), mask in styles]))


@torch.no_grad()
def restyle(injection: SourceInjection, branches: list[Branch], inversion: Inversion, prediction: str,
            cfg: float, timestep: Callable[[float], float], schedule: Schedule = Schedule()) -> torch.Tensor:
    """DiffStyler's sampler in plain torch (the toy world and tests; ComfyUI runs
    :func:`fused_step` inside its own sampler): deterministic DDIM from the inverted latent down
    the inversion's levels, the source branch replaying the inverted latent of each level, CFG
    after fusion on the raw model outputs (linear, so the same as CFG on eps or x0)."""
    check_prediction(prediction)
    sigmas, x = inversion.sigmas, inversion.noisy.float()
    steps = len(sigmas) - 1
    for i in range(steps):
        at = torch.full((x.shape[0],), float(sigmas[i]))
        negative, positive = fused_step(injection, branches, schedule, i, steps, x, inversion.latents[i], at,
                                        timestep(float(sigmas[i])))
        guided = negative + cfg * (positive - negative)
        eps, x0 = eps_and_x0(prediction, guided, x, at)
        x = x0 + sigmas[i + 1] * eps
    return x
