"""Noise schedules, training targets and the losses of the trainers, as pure functions.

Sigma follows ComfyUI's convention so the same numbers mean the same thing in both places:
for epsilon and v-prediction models ``x_t = x0 + sigma * noise`` and the network sees
``x_t / sqrt(sigma^2 + 1)``; for flow (rectified-flow, "CONST") models
``x_t = sigma * noise + (1 - sigma) * x0``. The network's raw output is compared with the
target of its own parameterisation, never with x0, so every timestep weighs as in the papers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

PREDICTIONS = ("eps", "v", "flow")


def _view(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(sigma.shape[:1] + (1,) * (like.ndim - 1)).to(like.dtype)


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unsupported model prediction {prediction!r}; supported: {PREDICTIONS}")


def add_noise(prediction: str, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    check_prediction(prediction)
    s = _view(sigma, x0)
    if prediction == "flow":
        return s * noise + (1 - s) * x0
    return x0 + s * noise


def model_input(prediction: str, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    check_prediction(prediction)
    if prediction == "flow":
        return x_t
    return x_t / (_view(sigma, x_t) ** 2 + 1).sqrt()


def target(prediction: str, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """What the raw network output should equal.

    eps: the noise. v: ``(noise - sigma * x0) / sqrt(sigma^2 + 1)``, i.e. alpha*eps - sigma_vp*x0
    with alpha = 1/sqrt(1+sigma^2). flow: the velocity ``noise - x0``.
    """
    check_prediction(prediction)
    if prediction == "eps":
        return noise
    if prediction == "v":
        s = _view(sigma, x0)
        return (noise - s * x0) / (s ** 2 + 1).sqrt()
    return noise - x0


def denoised(prediction: str, output: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 estimated from a raw output (inverse of :func:`target` given x_t)."""
    check_prediction(prediction)
    s = _view(sigma, x_t)
    if prediction == "v":
        return x_t / (s ** 2 + 1) - output * s / (s ** 2 + 1).sqrt()
    return x_t - output * s


def eps_and_x0(prediction: str, output: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor):
    """(eps, x0) from a raw output, in the sigma form ``x_t = x0 + sigma * eps``: what a DDIM step
    (down or up the schedule) needs."""
    x0 = denoised(prediction, output.float(), x_t, sigma)
    return (x_t - x0) / _view(sigma, x_t), x0


@dataclass(frozen=True)
class DiscreteSchedule:
    """SD's DDPM schedule: 1000 steps, scaled-linear betas 0.00085..0.012."""

    steps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012

    def sigmas(self) -> torch.Tensor:
        betas = torch.linspace(math.sqrt(self.beta_start), math.sqrt(self.beta_end), self.steps,
                               dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        return ((1 - alphas_cumprod) / alphas_cumprod).sqrt().float()


class Denoiser(Protocol):
    """What the trainers need from a diffusion model; ComfyUI's and the toy model's adapt to it."""

    prediction: str

    def sample_sigma(self, batch: int, generator: torch.Generator) -> torch.Tensor: ...

    def __call__(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: "Cond") -> torch.Tensor: ...


@dataclass
class Cond:
    """Text conditioning of one prompt: token context [B,T,D] and, for SDXL, the ``y`` vector."""

    context: torch.Tensor
    y: torch.Tensor | None = None

    def repeat_to(self, batch: int) -> "Cond":
        rep = lambda t: None if t is None else (t if t.shape[0] == batch else t[:1].expand(batch, *t.shape[1:]))
        return Cond(rep(self.context), rep(self.y))

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        ys = [c.y for c in conds]
        return Cond(torch.cat([c.context for c in conds]), None if ys[0] is None else torch.cat(ys))


# ---------------------------------------------------------------------------- losses

def diffusion_loss(output: torch.Tensor, goal: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per sample, then a weighted sum over the batch (weights default 1/B).

    Stage 2 weighs the reference pair 1 and the generated pair 0.1 in one batched pass.
    """
    per_sample = (output.float() - goal.float()).pow(2).flatten(1).mean(1)
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights.to(per_sample)).sum()


def _log_mean_exp(values: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(values, dim=0) - math.log(values.numel())


def contrastive_loss(eps_star: torch.Tensor, eps_des: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """EmoLoRA's stage-2 loss (METHODS.md section 1), over a batch of B >= 2 samples:

        L = -log[ mean_{i<j} exp(s(e*_i, e*_j)/tau) / mean_{i!=j} exp(s(e*_i, d_j)/tau) ]

    with s the cosine similarity of the flattened tensors, ``e* = eps_emb - eps_des`` the style
    residual and ``d = eps_des`` the design residual (both base-subtracted). Style residuals of
    different images are pulled together, each away from the other images' design residual.
    """
    if tau <= 0:
        raise ValueError(f"contrastive temperature tau must be > 0, got {tau}")
    b = eps_star.shape[0]
    if b < 2 or eps_des.shape[0] != b:
        raise ValueError(f"the contrastive loss needs a batch of >= 2 matching samples, got {b} and {eps_des.shape[0]}")
    a = F.normalize(eps_star.float().flatten(1), dim=1)
    d = F.normalize(eps_des.float().flatten(1), dim=1)
    upper = torch.triu_indices(b, b, offset=1, device=a.device)
    positives = (a @ a.T)[upper[0], upper[1]] / tau
    off_diagonal = ~torch.eye(b, dtype=torch.bool, device=a.device)
    negatives = (a @ d.T)[off_diagonal] / tau
    return -(_log_mean_exp(positives) - _log_mean_exp(negatives))


# ---------------------------------------------------------------------------- plain-torch denoiser

class TorchDenoiser:
    """A plain torch UNet (``unet(x, timesteps, context, y)``) on SD's discrete schedule."""

    def __init__(self, unet: torch.nn.Module, prediction: str = "eps", schedule: DiscreteSchedule = DiscreteSchedule()):
        check_prediction(prediction)
        if prediction == "flow":
            raise ValueError("TorchDenoiser implements the discrete SD schedule (eps or v)")
        self.unet = unet
        self.prediction = prediction
        self.sigmas = schedule.sigmas()

    def sample_sigma(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(0, len(self.sigmas), (batch,), generator=generator)
        return self.sigmas[index]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return (self.sigmas[None, :] - sigma.float().cpu()[:, None]).abs().argmin(dim=1).float()

    def __call__(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        cond = cond.repeat_to(x_t.shape[0])
        x_in = model_input(self.prediction, x_t, sigma)
        return self.unet(x_in, self.timestep(sigma).to(x_t.device), cond.context, cond.y)
