"""The training engine, independent of ComfyUI: one loop for every method (METHODS.md).

A method is data (:class:`Method`): its phases, each a list of loss terms run in order with the
same noise and timestep. A term names the adapter group that learns, the image of the pair that
is noised, the prompt every block reads and, for EmoLoRA's router, the prompt the style blocks
read instead. :func:`run_phase` drives any phase; :func:`export` writes the trained LoRA with
the method, phase and step in its metadata, and :func:`resume_point` reads them back. The
methods themselves (EmoLoRA's two stages, the one-image LoRA recipes) are defined in
``methods.py``.

EmoLoRA's stage 1, for example, makes two optimizer steps per iteration:
(a) the design loss on the flat design, updating the whole LoRA theta_a;
(b) the embroidery loss on the reference, updating only the style blocks theta_e, while the
    style blocks' cross-attention reads the embroidery prompt and every other block the
    design prompt (the prompt router).
The global step counts iterations over all phases, so stage 2 of the official schedule runs
from 400 to 600.

The caller owns the model: it installs ``adapters`` (ComfyUI: object patches on a clone;
plain torch: :func:`adapters.installed`) and calls these functions inside that scope. Nothing
here writes files, so a cancelled run leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from .adapters import AdapterSet
from . import keys
from .blocks import block_of, block_sort_key
from .diffusion import Cond, Denoiser, add_noise, contrastive_loss, denoised, diffusion_loss, target


@dataclass
class PairLatents:
    """One image-analogy pair in the model's latent space, with its two prompts encoded.

    ``embroidery_cond`` is what the style blocks read while routed ("a <subject> in <trigger>
    style"); ``design_cond`` is "a <subject>", read everywhere else and for the pooled/time
    embedding.
    """

    design: torch.Tensor
    embroidery: torch.Tensor
    design_cond: Cond
    embroidery_cond: Cond

    def image(self, name: str) -> torch.Tensor:
        """``design`` or ``embroidery``: the latent a loss term noises."""
        return {"design": self.design, "embroidery": self.embroidery}[name]

    def cond(self, name: str) -> Cond:
        """``design`` or ``embroidery``: the prompt a loss term reads."""
        return {"design": self.design_cond, "embroidery": self.embroidery_cond}[name]

    @staticmethod
    def batch(pairs: list["PairLatents"]) -> "PairLatents":
        return PairLatents(torch.cat([p.design for p in pairs]), torch.cat([p.embroidery for p in pairs]),
                           Cond.cat([p.design_cond for p in pairs]), Cond.cat([p.embroidery_cond for p in pairs]))


# A method's config: a dataclass with at least learning_rate, weight_decay and seed (methods.py).
Config = Any
OptimizerFactory = Callable[[list[torch.nn.Parameter], Config], torch.optim.Optimizer]


def adamw(params: list[torch.nn.Parameter], config: Config) -> torch.optim.Optimizer:
    """The method's optimizer: plain AdamW, state on the parameters' device."""
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


@dataclass
class Trainer:
    """Holds what persists across iterations: the adapters, one AdamW and the step count."""

    denoiser: Denoiser
    adapters: AdapterSet
    config: Config
    compute_dtype: torch.dtype | None = None   # autocast dtype; None = the model's own
    step: int = 0
    optimizer_factory: OptimizerFactory | None = None  # None = adamw; presets.MemoryPreset swaps it
    optimizer: torch.optim.Optimizer = field(init=False)
    last_x0: torch.Tensor | None = field(init=False, default=None)  # for previews
    # Blocks whose adapters actually received a gradient, per trainable group (EmoLoRA: "all" in
    # its design steps, "style" in its embroidery and contrastive steps): written to the file
    # under the method's labels, so anyone can check it.
    updated_blocks: dict[str, set[str]] = field(init=False, default_factory=dict)

    def __post_init__(self):
        # One optimizer for all adapters: a step whose frozen adapters have no gradient
        # leaves them (and their weight decay) untouched, as theta_e-only updates require.
        self.optimizer = (self.optimizer_factory or adamw)(list(self.adapters.parameters()), self.config)
        # fp16 gradients of small losses underflow; bf16 and fp32 need no scaling.
        self.scaler = torch.amp.GradScaler() if self.compute_dtype == torch.float16 else None

    def generator(self) -> torch.Generator:
        """Noise and timesteps depend only on (seed, step): a resumed run draws what an
        uninterrupted one would have drawn."""
        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.step)

    def autocast(self, device: torch.device):
        if self.compute_dtype is None or self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.compute_dtype)

    def predict(self, x_t, sigma, cond: Cond, routed: Cond | None = None, lora: bool = True):
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.autocast(x_t.device))
            stack.enter_context(self.adapters.routed(None if routed is None else routed.context))
            if not lora:
                stack.enter_context(self.adapters.disabled())
            return self.denoiser(x_t, sigma, cond)

    def update(self, trainable: str, loss: torch.Tensor) -> torch.Tensor:
        self.begin(trainable)
        self._backward(loss)
        self.finish(trainable)
        return loss.detach()

    def begin(self, trainable: str) -> None:
        """Start an optimizer step of group ``trainable``: only it learns, no gradient left over."""
        self.adapters.set_trainable(trainable)
        self.optimizer.zero_grad(set_to_none=True)

    def finish(self, trainable: str) -> None:
        """The optimizer step over the gradients backpropagated since :meth:`begin`."""
        self._record_updated(trainable)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def _backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def _record_updated(self, trainable: str) -> None:
        for name in self.adapters.names:
            if any(p.grad is not None for p in self.adapters.adapter(name).parameters()):
                self.updated_blocks.setdefault(trainable, set()).add(block_of(name))


# ---------------------------------------------------------------------------- optimizer state

ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")


def _state_of(optimizer, p) -> dict:
    return optimizer.state_of(p) if hasattr(optimizer, "state_of") else optimizer.state[p]


def optimizer_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    """AdamW's step count and moments of every adapter parameter that has them, on the CPU,
    keyed ``<parameter name>.<step|exp_avg|exp_avg_sq>``: what a continued run needs to make the
    updates an unbroken run would have made (the official EmoLoRA code's stage 2 resumes stage
    1's optimizer)."""
    out = {}
    for name, p in trainer.adapters.named_parameters():
        state = _state_of(trainer.optimizer, p)
        for key in ADAM_STATE:
            if key in state:
                out[f"{name}.{key}"] = state[key].detach().to("cpu", torch.float32).clone()
    return out


def load_optimizer_state(trainer: Trainer, state: dict[str, torch.Tensor]) -> int:
    """Continue AdamW from :func:`optimizer_state`'s output; returns how many parameters got
    their state. ValueError when it was taken from other adapters (names or shapes differ)."""
    params = dict(trainer.adapters.named_parameters())
    state = {k: v for k, v in state.items() if not k.startswith("extra.")}  # the adapters' own (extra_state)
    names = {key.rsplit(".", 1)[0] for key in state}
    unknown = sorted(names - set(params))
    if unknown:
        raise ValueError(f"the optimizer state is of other adapters ({len(unknown)} unknown parameters, "
                         f"e.g. {unknown[0]}); it cannot be continued here")
    for name in names:
        p = params[name]
        entry = {key: state[f"{name}.{key}"] for key in ADAM_STATE if f"{name}.{key}" in state}
        if entry.get("exp_avg") is not None and entry["exp_avg"].shape != p.shape:
            raise ValueError(f"the optimizer state of {name} has shape {tuple(entry['exp_avg'].shape)}, the "
                             f"adapter {tuple(p.shape)}; it cannot be continued here")
        if hasattr(trainer.optimizer, "set_state_of"):
            trainer.optimizer.set_state_of(p, entry)
        else:  # torch's AdamW: the step on the CPU, the moments beside the parameter
            trainer.optimizer.state[p] = {k: v.clone() if k == "step" else v.to(p.device, torch.float32).clone()
                                          for k, v in entry.items()}
    return len(names)


def _draws(trainer: Trainer, like: torch.Tensor, count: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` (noise, sigma) draws of one iteration, from the (seed, step) generator."""
    g = trainer.generator()
    draws = []
    for _ in range(count):
        noise = torch.randn(like.shape, generator=g).to(like)
        sigma = trainer.denoiser.sample_sigma(like.shape[0], g).to(like.device)
        draws.append((noise, sigma))
    return draws


def _step_loss(trainer: Trainer, trainable: str, x0, noise, sigma, cond, routed=None, weights=None):
    trainer.adapters.set_trainable(trainable)
    x_t = add_noise(trainer.denoiser.prediction, x0, noise, sigma)
    # Routing stays on through backward: gradient checkpointing re-runs the forward there.
    with trainer.adapters.routed(None if routed is None else routed.context):
        out = trainer.predict(x_t, sigma, cond, routed)
        trainer.last_x0 = denoised(trainer.denoiser.prediction, out.detach().float(), x_t, sigma)
        loss = diffusion_loss(out, target(trainer.denoiser.prediction, x0, noise, sigma), weights)
        return trainer.update(trainable, loss)


def _accumulated_loss(trainer: Trainer, trainable: str, x0, draws, cond, weights=None) -> torch.Tensor:
    """One optimizer step over the mean loss of several draws (gradient accumulation)."""
    trainer.begin(trainable)
    total = torch.zeros(())
    for noise, sigma in draws:
        x_t = add_noise(trainer.denoiser.prediction, x0, noise, sigma)
        out = trainer.predict(x_t, sigma, cond)
        trainer.last_x0 = denoised(trainer.denoiser.prediction, out.detach().float(), x_t, sigma)
        loss = diffusion_loss(out, target(trainer.denoiser.prediction, x0, noise, sigma), weights) / len(draws)
        trainer._backward(loss)
        total = total + loss.detach().float().cpu()
    trainer.finish(trainable)
    return total


# ---------------------------------------------------------------------------- methods as data

@dataclass(frozen=True)
class DiffusionTerm:
    """One optimizer step of an iteration: the diffusion loss on one image of the pair.

    ``trainable`` is the adapter group that learns (``AdapterSet.set_trainable``); ``image`` and
    ``prompt`` name a field of :class:`PairLatents` ("design" or "embroidery"); with ``routed``,
    the style blocks' cross-attention reads that prompt instead (EmoLoRA's router). The term
    runs from global step ``start`` on (Pair Customization's style step starts late).
    """

    name: str
    trainable: str
    image: str
    prompt: str = "design"
    routed: str | None = None
    start: int = 0
    active: tuple[str, ...] | None = None  # adapter groups that add their LoRA (None = every one)

    def __call__(self, trainer: Trainer, batch: PairLatents, draws, weights) -> torch.Tensor:
        only = contextlib.nullcontext() if self.active is None else trainer.adapters.only(self.active)
        with only:  # through backward too: gradient checkpointing re-runs the forward there
            if len(draws) > 1:
                if self.routed is not None:
                    raise ValueError("gradient accumulation with prompt routing is not supported")
                return _accumulated_loss(trainer, self.trainable, batch.image(self.image), draws,
                                         batch.cond(self.prompt), weights)
            (noise, sigma), = draws
            routed = None if self.routed is None else batch.cond(self.routed)
            return _step_loss(trainer, self.trainable, batch.image(self.image), noise, sigma, batch.cond(self.prompt),
                              routed=routed, weights=weights)


@dataclass(frozen=True)
class ContrastiveTerm:
    """EmoLoRA stage 2's third step, on the noised design latents z, style blocks only:
    eps_des = eps_{0+a}(z, c_des) - eps_0(z, c_des), and
    eps_emb = eps_{0+a}(z, routed c_emb) - eps_0(z, routed c_emb); eps* = eps_emb - eps_des.

    "Self-knowledge distillation" here: the model is its own teacher. eps_des, and both base
    predictions, come from the current model under ``no_grad``; they are targets the style
    residual eps* is measured against, never trained through. Only eps_{0+a}(z, routed c_emb)
    carries gradients, into the style blocks. Weight and temperature: the config's
    ``contrastive_weight`` and ``tau``.
    """

    name: str = "contrastive"
    trainable: str = "style"
    start: int = 0

    def __call__(self, trainer: Trainer, batch: PairLatents, draws, weights) -> torch.Tensor:
        if len(draws) != 1:
            raise ValueError("the contrastive step takes one draw per iteration (no gradient accumulation)")
        (noise, sigma), = draws
        z = add_noise(trainer.denoiser.prediction, batch.design, noise, sigma)
        with torch.no_grad():
            eps_des = (trainer.predict(z, sigma, batch.design_cond)
                       - trainer.predict(z, sigma, batch.design_cond, lora=False)).float()
            emb_base = trainer.predict(z, sigma, batch.design_cond, routed=batch.embroidery_cond, lora=False).float()
        trainer.adapters.set_trainable(self.trainable)
        with trainer.adapters.routed(batch.embroidery_cond.context):
            eps_emb = trainer.predict(z, sigma, batch.design_cond, routed=batch.embroidery_cond).float() - emb_base
            loss = trainer.config.contrastive_weight * contrastive_loss(eps_emb - eps_des, eps_des, trainer.config.tau)
            return trainer.update(self.trainable, loss)


Term = DiffusionTerm | ContrastiveTerm


@dataclass(frozen=True)
class Phase:
    """One phase of a method: the terms of each iteration, in order, with the same noise and
    timestep. With ``generated``, each iteration batches the reference pair with one generated
    pair, weighted 1 and the config's ``generated_weight`` (EmoLoRA's stage 2). With
    ``accumulate`` N, each term's optimizer step averages N draws, the k-th draw shared by all
    terms (Pair Customization: gradient accumulation 4)."""

    number: int
    terms: tuple[Term, ...]
    generated: bool = False
    accumulate: int = 1


@dataclass(frozen=True)
class Method:
    """A training method as data: its name in the file, its phases, the label under which each
    adapter group's updated blocks are recorded (``embroidery.updated_blocks.<label>``), and the
    tag of its checkpoint names (``<trigger>_<tag><phase>_<run id>``)."""

    name: str
    phases: tuple[Phase, ...]
    labels: tuple[tuple[str, str], ...]
    file_tag: str = "stage"

    def phase(self, number: int) -> Phase:
        for phase in self.phases:
            if phase.number == number:
                return phase
        raise ValueError(f"{self.name} has no phase {number} (phases: {[p.number for p in self.phases]})")


# ---------------------------------------------------------------------------- the one loop

def iteration(trainer: Trainer, phase: Phase, pair: PairLatents,
              generated: PairLatents | None = None) -> dict[str, torch.Tensor]:
    """One iteration of ``phase``: its terms in order, one noise draw and timestep for all."""
    batch, weights = pair, None
    if phase.generated:
        if generated is None:
            raise ValueError(f"phase {phase.number} trains on generated pairs; none was given")
        batch = PairLatents.batch([pair, generated])
        weights = torch.tensor([1.0, trainer.config.generated_weight])
    draws = _draws(trainer, batch.design, phase.accumulate)
    losses = {term.name: term(trainer, batch, draws, weights) for term in phase.terms if trainer.step >= term.start}
    trainer.step += 1
    return losses


StepCallback = Callable[[int, int, dict[str, torch.Tensor]], None]


def generated_index(seed: int, step: int, count: int) -> int:
    """Which of ``count`` generated pairs iteration ``step`` trains on: every pass over them in a
    new seeded random order (the official code shuffles its data loader), a function of the seed
    and the step only, so a resumed run picks what an unbroken run would have picked."""
    epoch, position = divmod(step, count)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1_000_003 + 500_009 + epoch))
    return int(order[position])


def run_phase(trainer: Trainer, phase: Phase, pair: PairLatents, until: int,
              generated: list[PairLatents] | None = None, on_step: StepCallback | None = None):
    """Iterate ``phase`` until the global step reaches ``until``; returns the losses per step.
    A phase with generated pairs takes one per iteration (:func:`generated_index`)."""
    if phase.generated and not generated:
        raise ValueError(f"phase {phase.number} needs at least one generated pair")
    history = []
    while trainer.step < until:
        pick = generated[generated_index(trainer.config.seed, trainer.step, len(generated))] if phase.generated else None
        losses = iteration(trainer, phase, pair, pick)
        history.append(losses)
        if on_step is not None:
            on_step(trainer.step, until, losses)
    return history


def loss_map(history: list[dict[str, torch.Tensor]]) -> dict[str, list[float]]:
    """Per-step losses as plain floats, one list per loss (None where a step had no such loss,
    e.g. ``contrastive`` during stage 1); ``loss`` is the sum per step (what ComfyUI's
    LossGraphNode plots)."""
    names = list(dict.fromkeys(name for h in history for name in h))
    out = {name: [float(h[name]) if name in h else None for h in history] for name in names}
    out["loss"] = [sum(float(v) for v in h.values()) for h in history]
    return out


# ---------------------------------------------------------------------------- files and resume

RUN_ID_KEY = keys.RUN_ID
# Metadata that does not change what a run learns: a resumed run with more iterations is the same
# run, and so is the record of what it updated so far, which a resumed run carries in.
_NOT_IDENTITY = (keys.config_key("stage1_iterations"), keys.config_key("stage2_iterations"),
                 keys.config_key("iterations"), keys.MEMORY_PRESET, keys.RUN_ID)


def run_identity(tensors: list[torch.Tensor], settings: dict[str, str]) -> str:
    """Eight hex digits that tell one training run from another: a digest of its images and
    every setting that changes what it learns (iteration counts, memory preset and the record of
    updated blocks are left out). A checkpoint name carries it, so two styles trained with the
    same trigger word never overwrite each other's files, while a resumed run (same inputs) keeps
    writing its own."""
    settings = {k: v for k, v in settings.items()
                if k not in _NOT_IDENTITY and not k.startswith(keys.UPDATED_BLOCKS)}
    digest = hashlib.sha256()
    for tensor in tensors:
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:8]


def check_resume_range(name: str, start: int, until: int, iterations_hint: str) -> None:
    """ValueError when a resumed run has nothing left to train (the file is at or past ``until``)."""
    if start >= until:
        raise ValueError(f"{name} is already at step {start}, and this run stops at step {until}: nothing is "
                         f"left to train. Raise {iterations_hint}, or set resume_from to (none) to start over")


def check_losses(step: int, losses: dict[str, torch.Tensor]) -> None:
    """ValueError as soon as a loss read back is NaN or inf: the run has diverged, and every
    further step (and checkpoint) would only carry the NaNs on."""
    bad = {k: float(v) for k, v in losses.items() if not math.isfinite(float(v))}
    if bad:
        raise ValueError(f"training diverged at step {step} ({', '.join(f'{k} {v}' for k, v in bad.items())}); "
                         "the last checkpoint is kept. Lower the learning rate, or use precision fp32")


def config_metadata(config: Config) -> dict[str, str]:
    """Every field of a method's config as ``embroidery.<field>``."""
    return {keys.config_key(k): str(v) for k, v in asdict(config).items()}


def export(trainer: Trainer, arch: str, method: Method, stage: int, metadata: dict[str, str] | None = None):
    """The trained LoRA with everything needed to use or resume it in its metadata: the config,
    ``metadata``, the method, phase and step, and the blocks each adapter group updated (merged
    with what an earlier run recorded); the optimizer's state rides along in memory
    (``optimizer_state``). ValueError if the weights have diverged to NaN/inf (a checkpoint never
    overwrites a good one with them)."""
    meta = {**config_metadata(trainer.config), **(metadata or {}),
            keys.METHOD: method.name, keys.STAGE: str(stage), keys.STEP: str(trainer.step)}
    for group, label in method.labels:
        key = keys.updated_blocks_key(label)
        previous = [b for b in meta.get(key, "").split(",") if b]
        blocks = set(previous) | trainer.updated_blocks.get(group, set())
        meta[key] = ",".join(sorted(blocks, key=block_sort_key))
    lora = trainer.adapters.to_style_lora(arch, meta)
    diverged = lora.non_finite()
    if diverged:
        raise ValueError(f"training diverged by step {trainer.step}: {len(diverged)} LoRA modules hold "
                         "NaN or inf; the last checkpoint is kept. Lower the learning rate, or use precision fp32")
    extra = trainer.adapters.extra_state() if hasattr(trainer.adapters, "extra_state") else {}
    lora.optimizer_state = {**optimizer_state(trainer), **extra}
    return lora


def resume_point(lora, method: Method | None = None) -> tuple[int, int]:
    """(phase, global step) of a LoRA a trainer of this pack wrote; read from metadata, never the
    name. With ``method``, the file must have been written by that method."""
    meta = lora.metadata
    try:
        stage, step = int(meta[keys.STAGE]), int(meta[keys.STEP])
    except (KeyError, ValueError):
        raise ValueError("this LoRA has no training state (embroidery.stage / embroidery.step metadata); "
                         "resume only from a file written by one of this pack's trainers or their checkpoints") from None
    written_by = meta.get(keys.METHOD, "")
    if method is not None and written_by != method.name:
        raise ValueError(f"this LoRA was written by the {written_by or 'unknown'} trainer, not {method.name}; "
                         "resume it in the trainer that wrote it")
    return stage, step


class Checkpointer:
    """Saves the LoRA every ``every`` steps (atomically, via ``save``) so a crash or a Cancel
    loses at most ``every`` steps; the file always holds a complete, resumable state."""

    def __init__(self, trainer: Trainer, arch: str, method: Method, stage: int, save: Callable, every: int,
                 metadata: dict[str, str] | None = None):
        self.trainer, self.arch, self.method, self.stage = trainer, arch, method, stage
        self.save, self.every = save, every
        self.metadata = metadata or {}
        self.saved: list[int] = []

    def __call__(self, step: int, total: int, losses) -> None:
        if self.every > 0 and (step % self.every == 0 or step == total):
            self.save(export(self.trainer, self.arch, self.method, self.stage, self.metadata))
            self.saved.append(step)
