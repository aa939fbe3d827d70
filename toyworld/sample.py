"""A small deterministic DDIM sampler (eta = 0) for the toy model, txt2img and img2img.

It works on any :class:`~embroidery_core.diffusion.TorchDenoiser`-like object (``sigmas``,
``prediction`` and ``denoiser(x_t, sigma, cond) -> raw output``), so a UNet with LoRA adapters
installed (``adapters.installed``) samples through the very code that trained it. In the sigma
form of :mod:`embroidery_core.diffusion` (``x_t = x0 + sigma * eps``) a DDIM step is

    x0 = denoised(output);   eps = (x_t - x0) / sigma_i;   x_{i+1} = x0 + sigma_{i+1} * eps,

with ``output`` the classifier-free-guided raw prediction (eps or v). Same seed, same inputs,
same output. With ``eta`` > 0 a step is ancestral (k-diffusion's rule in this sigma form): it
lands at sigma_down and adds fresh noise of sigma_up, sigma_down^2 + sigma_up^2 = sigma_{i+1}^2,

    sigma_up = min(sigma_{i+1}, eta * sqrt(sigma_{i+1}^2 (sigma_i^2 - sigma_{i+1}^2) / sigma_i^2)),

seeded per sample and step like the initial noise; eta 1 is DDPM-like, eta 0 plain DDIM.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from embroidery_core.adapters import AdapterSet, installed
from embroidery_core.diffstyler import Branch, Schedule, SourceInjection, ddim_sigmas, injection_blocks, invert, restyle
from embroidery_core.diffusion import Cond, denoised
from embroidery_core.guidance import combine_guidance
from embroidery_core.lora_file import StyleLoRA
from .model import IMAGE_SIZE, UNCOND, from_latent, to_latent, toy_denoiser
from .vae import PATCH

DEFAULT_STEPS = 20
DEFAULT_CFG = 3.0


def sigma_schedule(sigmas: torch.Tensor, steps: int, strength: float = 1.0) -> torch.Tensor:
    """``steps`` noise levels evenly spaced in timestep from ``strength`` x the last one down to
    timestep 0, then a final 0 (the last step lands on the x0 estimate)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    start = strength * (len(sigmas) - 1)
    index = torch.linspace(start, 0, steps).round().long()
    return torch.cat([sigmas[index].float(), torch.zeros(1)])


def ancestral_sigmas(sigma: torch.Tensor, sigma_next: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up) of one ancestral step from ``sigma`` to ``sigma_next`` (see the
    module docstring); eta 0 gives (sigma_next, 0)."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    up = eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2).clamp(min=0).sqrt()
    up = torch.minimum(up, sigma_next)
    return (sigma_next ** 2 - up ** 2).clamp(min=0).sqrt(), up


STEP_NOISE_SEED = 1_000_003  # step k's fresh noise (eta > 0) uses seed + STEP_NOISE_SEED * (k + 1)


def initial_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Sample i of a batch gets the noise of seed + i, so a picture never depends on its batch."""
    return torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(seed + i))
                        for i in range(shape[0])])


@dataclass
class StyleGuide:
    """Pair Customization's style guidance: every step one more pass with the style LoRA switched on
    (``adapters``, installed on the UNet and off for the other passes) and ``style_cond``, adding
    ``weight`` x (styled - positive) to the CFG result (guidance.combine_guidance)."""

    adapters: AdapterSet
    style_cond: Cond
    weight: float


def _guided(denoiser, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, uncond: Cond | None, cfg: float,
            style: StyleGuide | None = None):
    """out_u + cfg * (out_c - out_u), both branches in one batched call (linear in the output,
    so the same for eps and v); with ``style``, plus its guidance term."""
    b = x.shape[0]
    sig = sigma.expand(b)
    if style is not None:
        with style.adapters.disabled():
            both = Cond.cat([cond.repeat_to(b), uncond.repeat_to(b)])
            out_c, out_u = denoiser(torch.cat([x, x]), torch.cat([sig, sig]), both).chunk(2)
        out_s = denoiser(x, sig, style.style_cond.repeat_to(b))
        return combine_guidance(out_u, out_c, [(style.weight, out_s)], cfg)
    if uncond is None or cfg == 1.0:
        return denoiser(x, sig, cond.repeat_to(b))
    both = Cond.cat([cond.repeat_to(b), uncond.repeat_to(b)])
    out_c, out_u = denoiser(torch.cat([x, x]), torch.cat([sig, sig]), both).chunk(2)
    return out_u + cfg * (out_c - out_u)


@torch.no_grad()
def ddim(denoiser, cond: Cond, uncond: Cond | None, shape: tuple[int, ...], steps: int = DEFAULT_STEPS,
         cfg: float = DEFAULT_CFG, seed: int = 0, init: torch.Tensor | None = None,
         strength: float = 1.0, style: StyleGuide | None = None, eta: float = 0.0) -> torch.Tensor:
    """Latents of shape ``shape`` [B, C, h, w]; ``eta`` > 0: ancestral steps (module docstring).

    txt2img (``init`` None): start from N(0, 1 + sigma_max^2) at the last timestep.
    img2img: noise ``init`` to the level ``strength`` (1 = all the way) and denoise from there.
    """
    sigmas = sigma_schedule(denoiser.sigmas, steps, strength if init is not None else 1.0)
    noise = initial_noise(shape, seed)
    if init is None:
        x = noise * (1 + sigmas[0] ** 2).sqrt()
    else:
        x = init.float().expand(shape) + sigmas[0] * noise
    for k, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        out = _guided(denoiser, x, sigma.reshape(1), cond, uncond, cfg, style).float()
        x0 = denoised(denoiser.prediction, out, x, sigma.reshape(1))
        if not eta:
            x = x0 + sigma_next * (x - x0) / sigma
            continue
        down, up = ancestral_sigmas(sigma, sigma_next, eta)
        x = x0 + down * (x - x0) / sigma + up * initial_noise(shape, seed + STEP_NOISE_SEED * (k + 1))
    return x


def generate(unet, encoder, prompts: list[str], steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_CFG,
             seed: int = 0, init_images: torch.Tensor | None = None, strength: float = 1.0,
             size: int = IMAGE_SIZE, eta: float = 0.0) -> torch.Tensor:
    """Prompts -> IMAGE [B, size, size, 3]; with ``init_images`` [B, H, W, 3], img2img from them."""
    denoiser = toy_denoiser(unet)
    cond, uncond = encoder.encode(prompts), encoder.encode(UNCOND)
    init = None if init_images is None else to_latent(init_images)
    shape = (len(prompts), unet.cfg.in_channels, size // PATCH, size // PATCH) if init is None else tuple(init.shape)
    return from_latent(ddim(denoiser, cond, uncond, shape, steps, cfg, seed, init, strength, eta=eta))


def style_guided(unet, encoder, lora: StyleLoRA, weight: float, prompts: list[str], style_prompts: list[str],
                 steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_CFG, seed: int = 0,
                 init_images: torch.Tensor | None = None, strength: float = 1.0, eta: float = 0.0) -> torch.Tensor:
    """Like :func:`generate`, with Pair Customization's style guidance: ``prompts`` are the content
    prompts of the base passes, ``style_prompts`` those of the styled pass with ``lora``."""
    adapters = AdapterSet.from_style_lora(unet, lora)
    cond, uncond = encoder.encode(prompts), encoder.encode(UNCOND)
    init = None if init_images is None else to_latent(init_images)
    shape = (len(prompts), unet.cfg.in_channels, IMAGE_SIZE // PATCH, IMAGE_SIZE // PATCH) if init is None \
        else tuple(init.shape)
    with installed(unet, adapters), torch.no_grad():
        guide = StyleGuide(adapters, encoder.encode(style_prompts), weight)
        latents = ddim(toy_denoiser(unet), cond, uncond, shape, steps, cfg, seed, init, strength, guide, eta)
    return from_latent(latents)


@torch.no_grad()
def diffstyled(unet, encoder, lora: StyleLoRA, style_prompts: list[str], init_images: torch.Tensor,
               steps: int = DEFAULT_STEPS, cfg: float = DEFAULT_CFG, schedule: Schedule = Schedule()) -> torch.Tensor:
    """DiffStyler with one style covering the picture (the core's sampler, as the ComfyUI guider
    runs it): each image is DDIM-inverted with the empty prompt over ``steps`` levels, then
    sampled back with the base branch (no LoRA, empty prompt) and the style branch (``lora``,
    ``style_prompts``), both replaying the source and taking its decoder features and attn1
    queries and keys; CFG against the empty prompt."""
    denoiser = toy_denoiser(unet)
    source = to_latent(init_images)
    b = source.shape[0]
    empty, style = encoder.encode([UNCOND] * b), encoder.encode(style_prompts)
    arch = unet.cfg.arch()
    feature, attention = injection_blocks(arch)
    injection = SourceInjection(arch, attention, feature)
    adapters = AdapterSet.from_style_lora(unet, lora)
    sigmas = ddim_sigmas(denoiser.sigmas, steps)
    with installed(unet, adapters), installed(unet, injection):
        with adapters.disabled():
            inversion = invert(lambda x, sig: denoiser(x, sig, empty), denoiser.prediction, source, sigmas,
                               float(denoiser.sigmas[0]))

        def branch(cond, active, mask=None):
            return Branch(source=lambda x, sig: denoiser(x, sig, empty),
                          predict=lambda x, sig: (denoiser(x, sig, empty), denoiser(x, sig, cond)),
                          mask=mask, active=active)

        everywhere = torch.ones(1, 1, *source.shape[-2:], dtype=torch.bool)
        branches = [branch(empty, adapters.disabled), branch(style, contextlib.nullcontext, everywhere)]
        timestep = lambda sig: float(denoiser.timestep(torch.tensor([sig]))[0])  # noqa: E731
        latents = restyle(injection, branches, inversion, denoiser.prediction, cfg, timestep, schedule)
    return from_latent(latents)
