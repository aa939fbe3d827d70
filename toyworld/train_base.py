"""Train the toy world's base model: designs and the TRAIN_TECHNIQUES embroideries, with prompts.

    python -m toyworld.train_base --out toy_base.safetensors [--steps N] [--threads T] [--minutes M]
    python -m toyworld.train_base --out round2.safetensors --init toy_base.safetensors --seed 1 ...
    python -m toyworld.train_base --out gpu.safetensors --device cuda --workers 12 --batch 128 ...  # GPU machine

What it sees: flat designs prompted "a red circle blue star" and their embroideries in the 28
training techniques prompted "a red circle blue star in knot horizontal fine matte style" (a
technique's four attribute words are its style words). The held-out combinations (HELD_OUT),
the new kind (NEW_KIND_TECHNIQUES) and the trigger word are never seen: the first must come from
words the model knows, the others a one-shot LoRA has to add. The training techniques are drawn
uniformly, or by ``--attribute-weight`` (``coarse=2``: every coarse technique twice as often as a
fine one) and ``--balance-geometry`` (every kind-direction-spacing geometry equally often), levers
for cells the base learns slowest. ``--img2img-fraction`` teaches a share of the
embroideries as img2img from their flat design (see BaseTrainConfig.img2img_fraction), the task the
gate and the benchmark ask of the base, at timesteps from ``--img2img-min-t`` (300) up. SD's discrete schedule with
timesteps drawn towards the noisy end (``timestep_exponent``), the empty prompt for 10 % of
examples so classifier-free guidance works; an EMA of the weights is what gets saved.

v-prediction, not eps: in pixel space SD's schedule ends at sigma 14.6, where an eps model must
output an almost exact copy of its input, and every error there is multiplied by sigma when the
sampler turns it into an image (measured on the first toy base: after 500 steps the eps model's
x0 error at the last timestep was 10.4 and DDIM gave pure noise; the v model's was 0.21).

Reproducible and resumable: data, noise and timesteps come from ``--seed`` and the step only,
the learning rate follows ``--steps``. Every ``--checkpoint-every`` steps the whole state
(weights, EMA, optimizer, data generator, loss history) goes to ``<out>.resume`` atomically; the
same command finds it and continues, and gives the same file as a run that was never stopped
(same torch and thread count). ``--minutes`` caps the wall clock of one invocation: it then
writes the checkpoint and stops, so a long training fits sessions of any length. The checkpoint
is removed once the finished model is saved. ``--init`` starts a further round from a finished
base model's weights (a fresh optimizer and schedule; give it another ``--seed`` so it sees new
examples): the file records its start's name and digest and the steps and minutes of every
round, so a base trained in rounds is rebuilt by running the rounds' commands in order.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import numpy as np
import torch

from embroidery_core.diffusion import TorchDenoiser, add_noise, diffusion_loss, target
from embroidery_core.files import atomic_path
from embroidery_core.provenance import arithmetic
from embroidery_core.tiny_unet import TinyUNetConfig
from .generator import ATTRIBUTES, TRAIN_TECHNIQUES, make_design, render_embroidery
from .model import IMAGE_SIZE, TOY_UNET, UNCOND, build_toy_model, load_toy_model, read_metadata, save_toy_model, to_latent

SCRIPT_VERSION = "3"
TRAIN_DESIGN_SEEDS = 1_000_000  # designs 0..999999 train the base; evaluations draw above
log = logging.getLogger("toyworld.train_base")


@dataclass
class BaseTrainConfig:
    """Every default of the base training in one place."""

    seed: int = 0
    steps: int = 6000
    batch: int = 16
    learning_rate: float = 1e-3
    final_lr_fraction: float = 0.05  # cosine decay to this fraction of the peak
    warmup: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    design_fraction: float = 0.25  # the rest are embroideries, techniques drawn by attribute_weights
    uncond_fraction: float = 0.1
    # t = T * u ** exponent, u uniform: below 1 more examples at high noise, where the layout of
    # the stitches over a region is decided (0.75: 60 % of examples above t = 500, not 50 %).
    timestep_exponent: float = 0.75
    # Share of embroideries whose prompt names only some of the technique's four attribute words
    # ("in knot style", "in vertical fine style"; the image is still one full training technique):
    # each word then has to carry its own attribute, the usual lever for composing unseen
    # combinations (docs/FIDELITY.md, the first world's round 3).
    partial_fraction: float = 0.3
    # (attribute word, weight) pairs: a training technique is drawn with the product of its words'
    # weights (unnamed words weigh 1), e.g. (("coarse", 2.0),) draws every coarse technique twice as
    # often as a fine one. Empty: uniform, the draw the shipped base was trained with.
    attribute_weights: tuple = ()
    # Draw the 16 stitch geometries (kind, direction, spacing) equally often: each training
    # technique's weight is divided by how many training techniques share its geometry. Four
    # geometries are trained in one sheen only (their other sheen is a held-out combination), so
    # a uniform draw shows them half as often as the other twelve, and those four cells were the
    # gate's weakest on rounds 5-6. Measured in docs/FIDELITY.md, rounds 7-8 (against round 5 on
    # every design it gave nothing). False: the shipped base's draw.
    balance_geometry: bool = False
    # Share of embroideries taught as SDEdit's task: the noisy input is made from the flat design,
    # the target is still its embroidery (the x0 the network's output must denoise to), at
    # timesteps >= img2img_min_t only (below it the flat-to-stitched difference over sigma grows
    # without bound). What the gate and the benchmark ask of a base is exactly this: img2img from a
    # flat design, stitches drawn where the input has none. Never with the empty prompt, so the
    # unconditional branch keeps the design and guidance pushes towards the stitches. 0: the plain
    # diffusion objective, the shipped base's.
    img2img_fraction: float = 0.0
    img2img_min_t: int = 300
    threads: int = 2
    prediction: str = "v"  # see the module docstring
    init: str = ""  # digest of the base model this run continues from ("" = from scratch), see init_digest


HEAD_CHANNELS = TOY_UNET.model_channels // TOY_UNET.heads  # 16
CHECKPOINT_SUFFIX = ".resume"


def wider(model_channels: int) -> TinyUNetConfig:
    """The toy UNet at another width, with as many channels per attention head as the shipped one."""
    return replace(TOY_UNET, model_channels=model_channels, heads=model_channels // HEAD_CHANNELS)


# --- data ------------------------------------------------------------------------------------

PARTIAL_MASKS = 2 ** len(ATTRIBUTES) - 2  # the non-empty proper subsets of a technique's words


def partial_words(technique: str, mask: int) -> str:
    """The attribute words of ``technique`` whose bit is set in ``mask`` (1..14: a non-empty proper
    subset of the four), in order: ("knot vertical fine metallic", 0b0101) -> "knot fine"."""
    if not 1 <= mask <= PARTIAL_MASKS:
        raise ValueError(f"mask must name a non-empty proper subset of {len(ATTRIBUTES)} words "
                         f"(1..{PARTIAL_MASKS}), got {mask}")
    return " ".join(w for i, w in enumerate(technique.split()) if mask >> i & 1)


def geometry(technique: str) -> str:
    """A technique's stitch geometry, its words but the sheen: "knot vertical fine metallic" ->
    "knot vertical fine" (the sheen is a lustre laid over the same stitches)."""
    return technique.rsplit(" ", 1)[0]


def technique_probabilities(attribute_weights, balance_geometry: bool = False) -> np.ndarray:
    """The draw probability of each of TRAIN_TECHNIQUES: the product of its attribute words'
    weights from ``attribute_weights`` ((word, weight) pairs; other words weigh 1), divided by the
    number of training techniques of its geometry when ``balance_geometry``, normalised."""
    weights = dict(attribute_weights)
    known = set(sum(ATTRIBUTES, ()))
    for word, weight in weights.items():
        if word not in known:
            raise ValueError(f"attribute weight for {word!r}: not an attribute word; use one of {sorted(known)}")
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"attribute weight for {word!r} must be a positive number, got {weight}")
    p = np.array([math.prod(weights.get(w, 1.0) for w in t.split()) for t in TRAIN_TECHNIQUES])
    if balance_geometry:
        shared = [sum(geometry(u) == geometry(t) for u in TRAIN_TECHNIQUES) for t in TRAIN_TECHNIQUES]
        p = p / np.array(shared)
    return p / p.sum()


def training_example(rng: np.random.Generator, design_fraction: float,
                     partial_fraction: float = 0.0, attribute_weights=(), balance_geometry: bool = False
                     ) -> tuple[np.ndarray, str]:
    """One (image, prompt): a design or its embroidery in a training technique (drawn uniformly, or
    by ``attribute_weights`` and ``balance_geometry``, see BaseTrainConfig), named by all its
    attribute words or (``partial_fraction`` of embroideries) by a random proper subset of them."""
    image, prompt, _ = training_example_with_design(rng, design_fraction, partial_fraction, attribute_weights,
                                                    balance_geometry)
    return image, prompt


def training_example_with_design(rng: np.random.Generator, design_fraction: float, partial_fraction: float = 0.0,
                                 attribute_weights=(), balance_geometry: bool = False
                                 ) -> tuple[np.ndarray, str, np.ndarray | None]:
    """training_example, and the flat design an embroidery was rendered from (None for a design)."""
    design_seed = int(rng.integers(TRAIN_DESIGN_SEEDS))
    design = make_design(design_seed, IMAGE_SIZE)
    prompt = "a " + " ".join(design.words)
    if rng.random() < design_fraction:
        return design.image, prompt, None
    if attribute_weights or balance_geometry:
        technique = str(rng.choice(TRAIN_TECHNIQUES, p=technique_probabilities(attribute_weights, balance_geometry)))
    else:  # the uniform draw keeps its own call: the shipped base's data stream depends on it
        technique = str(rng.choice(TRAIN_TECHNIQUES))
    image, _ = render_embroidery(design, technique, int(rng.integers(2 ** 31)))
    words = technique
    if partial_fraction and rng.random() < partial_fraction:
        words = partial_words(technique, int(rng.integers(1, PARTIAL_MASKS + 1)))
    return image, f"{prompt} in {words} style", design.image


class Batch(NamedTuple):
    """One step's examples: the latents the network must denoise to (``x0``), their prompts, the
    latents the noisy inputs are made from (``source``: the very tensor x0 unless some examples
    are img2img ones, whose rows hold their flat designs) and which those are (``img2img``, [B])."""

    x0: torch.Tensor
    prompts: list[str]
    source: torch.Tensor
    img2img: torch.Tensor


def make_batch(rng: np.random.Generator, config: BaseTrainConfig) -> Batch:
    images, sources, prompts = [], [], []
    for _ in range(config.batch):
        image, prompt, design = training_example_with_design(rng, config.design_fraction, config.partial_fraction,
                                                             config.attribute_weights, config.balance_geometry)
        unconditional = rng.random() < config.uncond_fraction
        # the img2img draw only when asked for, so the plain objective's data stream stays the shipped base's
        img2img = design is not None and config.img2img_fraction > 0 and rng.random() < config.img2img_fraction
        images.append(image)
        sources.append(design if img2img else image)
        prompts.append(UNCOND if unconditional and not img2img else prompt)
    x0 = to_latent(torch.from_numpy(np.stack(images)))
    img2img = torch.tensor([s is not i for s, i in zip(sources, images)])
    source = to_latent(torch.from_numpy(np.stack(sources))) if img2img.any() else x0
    return Batch(x0, prompts, source, img2img)


def step_batch(config: BaseTrainConfig, step: int) -> Batch:
    """The batch of ``step`` in the per-step data stream (``--workers``): drawn from its own seed
    (config.seed, step), so any number of processes can make the batches ahead of the training."""
    torch.set_num_threads(1)  # a worker process: one core each
    return make_batch(np.random.default_rng([config.seed, step]), config)


class Batches:
    """Where a training's batches come from. ``workers`` 0: one generator drawn through the whole
    run in this process (how the shipped base was made; its state is checkpointed). ``workers``
    >= 1: the per-step stream (step_batch), made up to 2 x workers steps ahead by that many processes;
    the same batches for any number of workers, not the same as 0's."""

    def __init__(self, config: BaseTrainConfig, workers: int = 0):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.config, self.workers = config, workers
        self.rng = np.random.default_rng(config.seed)
        self.pool, self.ahead = None, {}

    @property
    def stream(self) -> str:
        return "per_step" if self.workers else "sequential"

    def get(self, step: int) -> Batch:
        if not self.workers:
            return make_batch(self.rng, self.config)
        if self.pool is None:
            import concurrent.futures
            import multiprocessing

            self.pool = concurrent.futures.ProcessPoolExecutor(self.workers, multiprocessing.get_context("spawn"))
        for ahead in range(step, step + 2 * self.workers):
            if ahead < self.config.steps and ahead not in self.ahead:
                self.ahead[ahead] = self.pool.submit(step_batch, self.config, ahead)
        return self.ahead.pop(step).result()

    def close(self) -> None:
        if self.pool is not None:
            for future in self.ahead.values():
                future.cancel()
            self.pool.shutdown()
            self.pool, self.ahead = None, {}


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


def sample_sigma(denoiser: TorchDenoiser, batch: int, generator: torch.Generator, exponent: float) -> torch.Tensor:
    """Noise levels of SD's discrete schedule at t = T * u ** exponent (u uniform in [0, 1))."""
    u = torch.rand(batch, generator=generator)
    index = (u ** exponent * len(denoiser.sigmas)).long().clamp(max=len(denoiser.sigmas) - 1)
    return denoiser.sigmas[index]


def img2img_sigma(denoiser: TorchDenoiser, batch: int, generator: torch.Generator, exponent: float,
                  min_t: int) -> torch.Tensor:
    """sample_sigma's rule over the timesteps min_t..T-1 only: the img2img examples' noise levels."""
    u = torch.rand(batch, generator=generator)
    span = len(denoiser.sigmas) - min_t
    index = (min_t + u ** exponent * span).long().clamp(max=len(denoiser.sigmas) - 1)
    return denoiser.sigmas[index]


def training_pair(config: BaseTrainConfig, batch: Batch, noise: torch.Tensor, sigma: torch.Tensor):
    """(noisy input, target) of a batch: the diffusion objective's, x_t = x0 + sigma * noise; for
    img2img examples x_t = source + sigma * noise with the target that denoises x_t to x0 (the
    noise term the sigma form then implies is noise + (source - x0) / sigma)."""
    x_t = add_noise(config.prediction, batch.source, noise, sigma)
    if batch.source is batch.x0:  # no img2img example: exactly the plain objective's arithmetic
        return x_t, target(config.prediction, batch.x0, noise, sigma)
    implied = noise + (batch.source - batch.x0) / sigma.view(-1, *[1] * (noise.dim() - 1))
    return x_t, target(config.prediction, batch.x0, implied, sigma)


def config_json(config: BaseTrainConfig) -> str:
    """The config as the saved file records it. A field added after the shipped base leaves the
    record when it has its default, so files of the older options rebuild byte-identically."""
    record = asdict(config)
    if not record["attribute_weights"]:
        del record["attribute_weights"]
    if not record["balance_geometry"]:
        del record["balance_geometry"]
    if not record["img2img_fraction"]:  # its timestep floor is recorded whenever img2img examples are drawn
        del record["img2img_fraction"], record["img2img_min_t"]
    return json.dumps(record, sort_keys=True)


def parse_attribute_weight(text: str) -> tuple[str, float]:
    """"coarse=2" -> ("coarse", 2.0), checked against the attribute words (ValueError otherwise)."""
    word, sep, value = text.partition("=")
    try:
        weight = float(value)
    except ValueError:
        weight = None
    if not sep or weight is None:
        raise ValueError(f"--attribute-weight {text!r}: write WORD=WEIGHT, e.g. coarse=2")
    technique_probabilities(((word, weight),))  # the word and the weight are checked there
    return word, weight


def checkpoint_path(out: str) -> str:
    return out + CHECKPOINT_SUFFIX


def _save_checkpoint(path: str, step: int, parts: dict, rng: np.random.Generator, history: list,
                     config: BaseTrainConfig, unet_config: TinyUNetConfig, minutes: float, running: list,
                     stream: str = "sequential") -> None:
    state = {name: part.state_dict() for name, part in parts.items()}
    state.update(step=step, rng=rng.bit_generator.state, history=list(history), minutes=minutes,
                 config=asdict(config), unet_config=asdict(unet_config), running=list(running), stream=stream)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: str, config: BaseTrainConfig, unet_config: TinyUNetConfig, device: str = "cpu") -> dict:
    state = torch.load(path, weights_only=False, map_location=device)
    if state["config"] != asdict(config) or state["unet_config"] != asdict(unet_config):
        raise ValueError(f"{path} is a checkpoint of another training (config {state['config']}, "
                         f"architecture {state['unet_config']}); pass the same options or delete it")
    return state


def init_digest(path: str) -> str:
    """First 16 hex digits of the SHA-256 of a base model file: what a continued run records."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def train(config: BaseTrainConfig, minutes: float | None = None, log_every: int = 100, on_log=None,
          unet_config: TinyUNetConfig = TOY_UNET, checkpoint: str | None = None, checkpoint_every: int = 0,
          init_from: str | None = None, device: str = "cpu", workers: int = 0):
    """Returns the EMA (unet, encoder), the steps done, the mean loss per ``log_every`` steps and
    the minutes trained over all invocations.

    ``on_log(step, ema_unet, ema_encoder, history)`` is called after each log line.
    ``unet_config`` is the architecture (recorded in the saved file's metadata). With
    ``checkpoint``, training starts from that file if it exists and writes it every
    ``checkpoint_every`` steps and when the ``minutes`` cap stops the run. ``init_from``
    continues from the weights of a saved base model (``config.init`` must be its digest): a
    longer training in rounds that each fit a session, every round one command.

    ``device`` ("cuda" on the GPU machine) is where the networks and the arithmetic go; data,
    noise and timesteps are still drawn on the CPU from the same seeds, so a run sees the same
    examples on any device (its floating-point result differs from a CPU run's). The returned
    networks are on the CPU. ``workers`` (see Batches) makes the batches in other processes, so
    a GPU is not kept waiting by one CPU core drawing them."""
    torch.manual_seed(config.seed)
    unet, encoder = build_toy_model(unet_config)
    if init_from is not None:
        if init_digest(init_from) != config.init:
            raise ValueError(f"{init_from} does not match the config's init digest {config.init!r}")
        start_unet, start_encoder = load_toy_model(init_from)
        if start_unet.cfg != unet_config:
            raise ValueError(f"{init_from} has another architecture ({start_unet.cfg}) than {unet_config}")
        unet.load_state_dict(start_unet.state_dict())
        encoder.load_state_dict(start_encoder.state_dict())  # loading keeps the fresh modules trainable
    unet.to(device)
    encoder.to(device)
    ema = copy.deepcopy(torch.nn.ModuleList([unet, encoder])).requires_grad_(False)
    params = list(unet.parameters()) + list(encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    parts = {"unet": unet, "encoder": encoder, "ema": ema, "optimizer": optimizer}
    denoiser = TorchDenoiser(unet, config.prediction)
    batches = Batches(config, workers)
    rng = batches.rng
    step, history, before = 0, [], 0.0
    running = []  # the losses since the last log line: checkpointed too, so a resumed run logs as an unbroken one
    if checkpoint and os.path.isfile(checkpoint):
        state = _load_checkpoint(checkpoint, config, unet_config, device)
        if state.get("stream", "sequential") != batches.stream:
            raise ValueError(f"{checkpoint} is a checkpoint of a run with the {state.get('stream', 'sequential')} data "
                             f"stream; continue it with the same --workers setting (0, or >= 1)")
        for name, part in parts.items():
            part.load_state_dict(state[name])
        rng.bit_generator.state = state["rng"]
        step, history, before = state["step"], list(state["history"]), state["minutes"]
        running = list(state.get("running", []))
        log.info("resuming from %s at step %d (%.1f min trained)", checkpoint, step, before)
    deadline = None if minutes is None else time.monotonic() + 60 * minutes
    start = time.monotonic()

    def trained_minutes():
        return before + (time.monotonic() - start) / 60

    try:
        while step < config.steps:
            if deadline is not None and time.monotonic() > deadline:
                log.warning("stopping at step %d of %d: the %.1f-minute cap is reached", step, config.steps, minutes)
                if checkpoint:
                    _save_checkpoint(checkpoint, step, parts, rng, history, config, unet_config, trained_minutes(),
                                     running, batches.stream)
                    log.warning("the state is in %s; run the same command again to continue", checkpoint)
                break
            batch = batches.get(step)
            g = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            noise = torch.randn(batch.x0.shape, generator=g)
            sigma = sample_sigma(denoiser, batch.x0.shape[0], g, config.timestep_exponent)
            if config.img2img_fraction > 0:  # drawn only then: the plain objective's noise stream is the shipped one
                sigma = torch.where(batch.img2img, img2img_sigma(denoiser, len(sigma), g, config.timestep_exponent,
                                                                 config.img2img_min_t), sigma)
            x_t, goal = training_pair(config, batch, noise, sigma)
            sigma = sigma.to(device)
            out = denoiser(x_t.to(device), sigma, encoder.encode(batch.prompts))
            loss = diffusion_loss(out, goal.to(device))
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
                log.info("step %d/%d  loss %.4f  lr %.2e  %.1f min", step, config.steps, history[-1],
                         learning_rate(step - 1, config), trained_minutes())
                if on_log is not None:
                    on_log(step, ema[0], ema[1], history)
            if checkpoint and checkpoint_every and step % checkpoint_every == 0 and step < config.steps:
                _save_checkpoint(checkpoint, step, parts, rng, history, config, unet_config, trained_minutes(),
                                 running, batches.stream)
    finally:
        batches.close()
    ema_unet, ema_encoder = ema.cpu()
    return ema_unet.eval(), ema_encoder.eval(), step, history, trained_minutes()


def main(argv: list[str] | None = None) -> int:
    defaults = BaseTrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where to write the .safetensors file")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps (sets the LR schedule)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="wall-clock cap of this invocation: writes the checkpoint and stops; rerun to continue")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="peak learning rate")
    parser.add_argument("--init", default=None,
                        help="continue from this base model file (its weights; give another --seed for new data)")
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="torch CPU threads (part of what makes the file reproducible)")
    parser.add_argument("--partial-fraction", type=float, default=defaults.partial_fraction,
                        help="share of embroidery prompts that name only some attribute words (0..1)")
    parser.add_argument("--attribute-weight", action="append", default=[], metavar="WORD=WEIGHT",
                        help="draw the training techniques with this attribute word WEIGHT times as often "
                             "(repeatable; a technique's weight is the product of its words'), e.g. coarse=2; "
                             "default: uniform, as the shipped base")
    parser.add_argument("--balance-geometry", action="store_true",
                        help="draw the 16 stitch geometries (kind, direction, spacing) equally often: the four "
                             "trained in one sheen only are drawn twice as often as each other technique; "
                             "default: uniform over the techniques, as the shipped base")
    parser.add_argument("--img2img-fraction", type=float, default=defaults.img2img_fraction,
                        help="share of embroideries taught as img2img: the noisy input made from the flat design, "
                             "the embroidery the target (0..1; timesteps >= %d only); default 0, the plain "
                             "diffusion objective of the shipped base" % defaults.img2img_min_t)
    parser.add_argument("--img2img-min-t", type=int, default=defaults.img2img_min_t,
                        help="with --img2img-fraction: the lowest timestep of an img2img example (1..999; "
                             "default %(default)s; the gate starts at strength 0.6, timestep 600)")
    parser.add_argument("--prediction", default=defaults.prediction, choices=("eps", "v"))
    parser.add_argument("--workers", type=int, default=0,
                        help="0: draw the examples in this process from one generator (how the shipped base was "
                             "made); N >= 1: each step's batch from its own seed, made ahead by N processes (the "
                             "same file for any N >= 1, not the same as 0's); for the GPU machine's cores")
    parser.add_argument("--device", default="cpu",
                        help="where to train: cpu, or cuda on a GPU machine (the same examples; the numbers "
                             "differ from a CPU run's, and the file records the device)")
    parser.add_argument("--checkpoint-every", type=int, default=250,
                        help="write the resumable state to <out>.resume every N steps (0 = only at the cap)")
    parser.add_argument("--snapshot-every", type=int, default=0,
                        help="also write the EMA model to <out> every N steps, to inspect it while training")
    parser.add_argument("--model-channels", type=int, default=TOY_UNET.model_channels,
                        help="UNet width (a multiple of 16; heads grow with it, 16 channels each); "
                             "the shipped model is %(default)s")
    args = parser.parse_args(argv)
    if args.model_channels < HEAD_CHANNELS or args.model_channels % HEAD_CHANNELS:
        parser.error(f"--model-channels must be a positive multiple of {HEAD_CHANNELS}, got {args.model_channels}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if not 0 <= args.partial_fraction <= 1:
        parser.error(f"--partial-fraction must be in 0..1, got {args.partial_fraction}")
    if not 0 <= args.img2img_fraction <= 1:
        parser.error(f"--img2img-fraction must be in 0..1, got {args.img2img_fraction}")
    if not 1 <= args.img2img_min_t <= 999:
        parser.error(f"--img2img-min-t must be in 1..999 (a timestep of the 1000-step schedule), "
                     f"got {args.img2img_min_t}")
    try:
        attribute_weights = tuple(sorted(dict(parse_attribute_weight(a) for a in args.attribute_weight).items()))
    except ValueError as e:
        parser.error(str(e))
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device {args.device!r}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this machine has no CUDA GPU (torch {torch.__version__}); "
                     "use --device cpu")
    unet_config = wider(args.model_channels)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    if args.init and not os.path.isfile(args.init):
        parser.error(f"--init {args.init}: no such file")
    if args.init and os.path.abspath(args.init) == os.path.abspath(args.out):
        parser.error("--out must differ from --init (the run writes snapshots and checkpoints next to --out)")
    config = BaseTrainConfig(seed=args.seed, steps=args.steps, batch=args.batch, threads=args.threads,
                             prediction=args.prediction, learning_rate=args.learning_rate,
                             partial_fraction=args.partial_fraction, attribute_weights=attribute_weights,
                             balance_geometry=args.balance_geometry,
                             img2img_fraction=args.img2img_fraction, img2img_min_t=args.img2img_min_t,
                             init=init_digest(args.init) if args.init else "")
    before = read_metadata(args.init) if args.init else {}
    torch.set_num_threads(config.threads)
    checkpoint = checkpoint_path(args.out)

    def save(step, unet, encoder, history, minutes):
        meta = {"prediction": config.prediction, "seed": config.seed, "steps": step, "script": "toyworld.train_base",
                "script_version": SCRIPT_VERSION, "train_config": config_json(config),
                "torch": torch.__version__, "threads": config.threads, "train_minutes": f"{minutes:.1f}",
                "built_on": arithmetic(),
                "final_loss": f"{history[-1]:.5f}" if history else "nan"}
        if args.workers:  # the default stream's files keep the metadata they always had
            meta["data_stream"] = "per_step"
        if args.device != "cpu":  # a CPU file's metadata names no device, so both runs of a CPU command agree
            meta["device"] = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
        if args.init:  # the chain of rounds: this one's start, and the steps and minutes of all so far
            meta.update(init=f"{os.path.basename(args.init)} ({config.init})",
                        total_steps=int(before.get("total_steps", before.get("steps", 0))) + step,
                        total_train_minutes=f"{float(before.get('total_train_minutes', before.get('train_minutes', 0))) + minutes:.1f}")
        save_toy_model(args.out, unet, encoder, meta)

    def snapshot(step, unet, encoder, history):
        if args.snapshot_every and step % args.snapshot_every == 0 and step < config.steps:
            save(step, unet, encoder, history, float("nan"))

    try:
        unet, encoder, done, history, minutes = train(config, args.minutes, on_log=snapshot, unet_config=unet_config,
                                                      checkpoint=checkpoint, checkpoint_every=args.checkpoint_every,
                                                      init_from=args.init, device=args.device, workers=args.workers)
    except ValueError as e:
        parser.error(str(e))
    if done < config.steps:
        log.info("stopped after %d of %d steps (%.1f min in all); rerun the same command to continue",
                 done, config.steps, minutes)
        return 0
    save(done, unet, encoder, history, minutes)
    if os.path.isfile(checkpoint):
        os.remove(checkpoint)
    log.info("saved %s after %d steps in %.1f min", args.out, done, minutes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
