"""Train the toy world's base model: designs and the TRAIN_TECHNIQUES embroideries, with prompts.

    python -m toyworld.train_base --out toy_base.safetensors [--steps N] [--minutes M] [--model-channels C]

What it sees: flat designs prompted "a red circle blue star" and their embroideries in the four
training techniques prompted "a red circle blue star in satin style" (the technique word is the
style word). The held-out techniques (HELD_OUT) and the trigger word are never seen: they are
what a one-shot LoRA must add. SD's discrete schedule, the empty prompt for 10 % of examples so
classifier-free guidance works; an EMA of the weights is what gets saved.

v-prediction, not eps: in pixel space SD's schedule ends at sigma 14.6, where an eps model must
output an almost exact copy of its input, and every error there is multiplied by sigma when the
sampler turns it into an image. Measured on this script: after 500 steps the eps model's x0 error
at the last timestep was 10.4 (MSE, images in -1..1) and DDIM gave pure noise, while the v model
had 0.21 after 200 steps and DDIM gave shapes. ``--prediction eps`` still trains the eps version.

Reproducible: data, noise and timesteps come from ``--seed`` and the step only, the learning
rate follows ``--steps``; the same command on the same torch and thread count gives the same
file. ``--minutes`` is a wall-clock cap for slow machines: the run then stops early and saves
what it has (the step count is in the file's metadata).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from embroidery_core.diffusion import TorchDenoiser, add_noise, diffusion_loss, target
from embroidery_core.tiny_unet import TinyUNetConfig
from .generator import TRAIN_TECHNIQUES, make_design, render_embroidery
from .model import IMAGE_SIZE, TOY_UNET, UNCOND, build_toy_model, save_toy_model, to_latent

SCRIPT_VERSION = "1"
TRAIN_DESIGN_SEEDS = 1_000_000  # designs 0..999999 train the base; evaluations draw above
log = logging.getLogger("toyworld.train_base")


@dataclass
class BaseTrainConfig:
    """Every default of the base training in one place."""

    seed: int = 0
    steps: int = 4000
    batch: int = 16
    learning_rate: float = 1e-3
    final_lr_fraction: float = 0.05  # cosine decay to this fraction of the peak
    warmup: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    design_fraction: float = 1 / 3  # the rest are embroideries, techniques drawn uniformly
    uncond_fraction: float = 0.1
    threads: int = 1
    prediction: str = "v"  # see the module docstring


HEAD_CHANNELS = TOY_UNET.model_channels // TOY_UNET.heads  # 16


def wider(model_channels: int) -> TinyUNetConfig:
    """The toy UNet at another width, with as many channels per attention head as the shipped one."""
    return replace(TOY_UNET, model_channels=model_channels, heads=model_channels // HEAD_CHANNELS)


# --- data ------------------------------------------------------------------------------------

def training_example(rng: np.random.Generator, design_fraction: float) -> tuple[np.ndarray, str]:
    """One (image, prompt): a design or its embroidery in a training technique."""
    design_seed = int(rng.integers(TRAIN_DESIGN_SEEDS))
    design = make_design(design_seed, IMAGE_SIZE)
    prompt = "a " + " ".join(design.words)
    if rng.random() < design_fraction:
        return design.image, prompt
    technique = str(rng.choice(TRAIN_TECHNIQUES))
    image, _ = render_embroidery(design, technique, int(rng.integers(2 ** 31)))
    return image, f"{prompt} in {technique} style"


def make_batch(rng: np.random.Generator, config: BaseTrainConfig) -> tuple[torch.Tensor, list[str]]:
    images, prompts = [], []
    for _ in range(config.batch):
        image, prompt = training_example(rng, config.design_fraction)
        images.append(image)
        prompts.append(UNCOND if rng.random() < config.uncond_fraction else prompt)
    return to_latent(torch.from_numpy(np.stack(images))), prompts


# --- optimisation ----------------------------------------------------------------------------

def learning_rate(step: int, config: BaseTrainConfig) -> float:
    """Linear warmup, then cosine from the peak down to ``final_lr_fraction`` of it."""
    if step < config.warmup:
        return config.learning_rate * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    floor = config.final_lr_fraction
    return config.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    """EMA with a warm start: early on the average forgets fast (decay (1+s)/(10+s))."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - d)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def train(config: BaseTrainConfig, minutes: float | None = None, log_every: int = 100, on_log=None,
          unet_config: TinyUNetConfig = TOY_UNET):
    """Returns the EMA (unet, encoder), the steps done and the mean loss per ``log_every`` steps.
    ``on_log(step, ema_unet, ema_encoder, history)`` is called after each log line.
    ``unet_config`` is the architecture (recorded in the saved file's metadata)."""
    torch.manual_seed(config.seed)
    unet, encoder = build_toy_model(unet_config)
    ema = copy.deepcopy(torch.nn.ModuleList([unet, encoder])).requires_grad_(False)
    params = list(unet.parameters()) + list(encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    denoiser = TorchDenoiser(unet, config.prediction)
    rng = np.random.default_rng(config.seed)
    deadline = None if minutes is None else time.monotonic() + 60 * minutes
    start, history, running = time.monotonic(), [], []
    step = 0
    while step < config.steps:
        if deadline is not None and time.monotonic() > deadline:
            log.warning("stopping at step %d of %d: the %.1f-minute cap is reached", step, config.steps, minutes)
            break
        x0, prompts = make_batch(rng, config)
        g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        noise = torch.randn(x0.shape, generator=g)
        sigma = denoiser.sample_sigma(x0.shape[0], g)
        out = denoiser(add_noise(config.prediction, x0, noise, sigma), sigma, encoder.encode(prompts))
        loss = diffusion_loss(out, target(config.prediction, x0, noise, sigma))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        update_ema(ema, torch.nn.ModuleList([unet, encoder]), step, config.ema_decay)
        step += 1
        running.append(float(loss.detach()))
        if step % log_every == 0 or step == config.steps:
            history.append(float(np.mean(running)))
            running = []
            elapsed = time.monotonic() - start
            log.info("step %d/%d  loss %.4f  lr %.2e  %.0f s (%.2f s/step)", step, config.steps, history[-1],
                     learning_rate(step - 1, config), elapsed, elapsed / step)
            if on_log is not None:
                on_log(step, ema[0], ema[1], history)
    ema_unet, ema_encoder = ema
    return ema_unet.eval(), ema_encoder.eval(), step, history


def main(argv: list[str] | None = None) -> int:
    defaults = BaseTrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where to write the .safetensors file")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps (sets the LR schedule)")
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock cap; stops early if reached")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch CPU threads")
    parser.add_argument("--prediction", default=defaults.prediction, choices=("eps", "v"))
    parser.add_argument("--save-every", type=int, default=0, help="also save the EMA every N steps (0 = end only)")
    parser.add_argument("--model-channels", type=int, default=TOY_UNET.model_channels,
                        help="UNet width (a multiple of 16; heads grow with it, 16 channels each); "
                             "the shipped model is %(default)s")
    args = parser.parse_args(argv)
    if args.model_channels < HEAD_CHANNELS or args.model_channels % HEAD_CHANNELS:
        parser.error(f"--model-channels must be a positive multiple of {HEAD_CHANNELS}, got {args.model_channels}")
    unet_config = wider(args.model_channels)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    config = BaseTrainConfig(seed=args.seed, steps=args.steps, batch=args.batch, threads=args.threads,
                             prediction=args.prediction)
    torch.set_num_threads(config.threads)
    start = time.monotonic()

    def save(step, unet, encoder, history):
        minutes = (time.monotonic() - start) / 60
        meta = {"prediction": config.prediction, "seed": config.seed, "steps": step, "script": "toyworld.train_base",
                "script_version": SCRIPT_VERSION, "train_config": json.dumps(asdict(config), sort_keys=True),
                "torch": torch.__version__, "threads": config.threads, "train_minutes": f"{minutes:.1f}",
                "final_loss": f"{history[-1]:.5f}" if history else "nan"}
        save_toy_model(args.out, unet, encoder, meta)
        return minutes

    def checkpoint(step, unet, encoder, history):
        if args.save_every and step % args.save_every == 0:
            save(step, unet, encoder, history)

    unet, encoder, done, history = train(config, args.minutes, on_log=checkpoint, unet_config=unet_config)
    minutes = save(done, unet, encoder, history)
    log.info("saved %s after %d steps in %.1f min", args.out, done, minutes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
