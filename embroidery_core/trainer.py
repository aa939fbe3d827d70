"""EmoLoRA's two-stage trainer (METHODS.md section 1), independent of ComfyUI.

One iteration of stage 1 makes two optimizer steps with the same noise and timestep:
(a) the design loss on the flat design, updating the whole LoRA theta_a;
(b) the embroidery loss on the reference, updating only the style blocks theta_e, while the
    style blocks' cross-attention reads the embroidery prompt and every other block the
    design prompt (the prompt router).
Stage 2 adds generated pairs (weight 0.1) and a third, contrastive step (see
:func:`stage2_iteration`). The global step counts iterations over both stages, so stage 2 of
the official schedule runs from 400 to 600.

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
from typing import Callable

import torch

from .adapters import AdapterSet
from .blocks import block_of, block_sort_key
from .diffusion import Cond, Denoiser, add_noise, contrastive_loss, denoised, diffusion_loss, target


@dataclass
class EmoLoRAConfig:
    """Every default of the method in one place (official code unless noted)."""

    rank: int = 32
    alpha: float = 32.0
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    stage1_iterations: int = 400
    stage2_iterations: int = 200          # the official run stops at global step 600
    generated_weight: float = 0.1         # weight of a generated pair next to the reference
    contrastive_weight: float = 1e-4
    tau: float = 1.0
    seed: int = 42

    def metadata(self) -> dict[str, str]:
        return {f"embroidery.{k}": str(v) for k, v in asdict(self).items()}


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

    @staticmethod
    def batch(pairs: list["PairLatents"]) -> "PairLatents":
        return PairLatents(torch.cat([p.design for p in pairs]), torch.cat([p.embroidery for p in pairs]),
                           Cond.cat([p.design_cond for p in pairs]), Cond.cat([p.embroidery_cond for p in pairs]))


OptimizerFactory = Callable[[list[torch.nn.Parameter], EmoLoRAConfig], torch.optim.Optimizer]


def adamw(params: list[torch.nn.Parameter], config: EmoLoRAConfig) -> torch.optim.Optimizer:
    """The method's optimizer: plain AdamW, state on the parameters' device."""
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


@dataclass
class Trainer:
    """Holds what persists across iterations: the adapters, one AdamW and the step count."""

    denoiser: Denoiser
    adapters: AdapterSet
    config: EmoLoRAConfig
    compute_dtype: torch.dtype | None = None   # autocast dtype; None = the model's own
    step: int = 0
    optimizer_factory: OptimizerFactory | None = None  # None = adamw; presets.MemoryPreset swaps it
    optimizer: torch.optim.Optimizer = field(init=False)
    last_x0: torch.Tensor | None = field(init=False, default=None)  # for previews
    # Blocks whose adapters actually received a gradient, per kind of step ("all" = design,
    # "style" = embroidery and contrastive): written to the file so anyone can check it.
    updated_blocks: dict[str, set[str]] = field(init=False, default_factory=lambda: {"all": set(), "style": set()})

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
        self.adapters.set_trainable(trainable)
        self.optimizer.zero_grad(set_to_none=True)
        self._backward(loss)
        self._record_updated(trainable)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def _backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def _record_updated(self, trainable: str) -> None:
        for name in self.adapters.names:
            if any(p.grad is not None for p in self.adapters.adapter(name).parameters()):
                self.updated_blocks[trainable].add(block_of(name))


def _draw(trainer: Trainer, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = trainer.generator()
    noise = torch.randn(like.shape, generator=g).to(like)
    sigma = trainer.denoiser.sample_sigma(like.shape[0], g).to(like.device)
    return noise, sigma


def _step_loss(trainer: Trainer, trainable: str, x0, noise, sigma, cond, routed=None, weights=None):
    trainer.adapters.set_trainable(trainable)
    x_t = add_noise(trainer.denoiser.prediction, x0, noise, sigma)
    # Routing stays on through backward: gradient checkpointing re-runs the forward there.
    with trainer.adapters.routed(None if routed is None else routed.context):
        out = trainer.predict(x_t, sigma, cond, routed)
        trainer.last_x0 = denoised(trainer.denoiser.prediction, out.detach().float(), x_t, sigma)
        loss = diffusion_loss(out, target(trainer.denoiser.prediction, x0, noise, sigma), weights)
        return trainer.update(trainable, loss)


def stage1_iteration(trainer: Trainer, pair: PairLatents) -> dict[str, torch.Tensor]:
    """Design step (theta_a) then embroidery step (theta_e, routed), same noise and t."""
    noise, sigma = _draw(trainer, pair.design)
    design = _step_loss(trainer, "all", pair.design, noise, sigma, pair.design_cond)
    embroidery = _step_loss(trainer, "style", pair.embroidery, noise, sigma, pair.design_cond,
                            routed=pair.embroidery_cond)
    trainer.step += 1
    return {"design": design, "embroidery": embroidery}


def stage2_iteration(trainer: Trainer, pair: PairLatents, generated: PairLatents) -> dict[str, torch.Tensor]:
    """Stage 2: the reference pair and one generated pair in one batch, three steps.

    1. L_des(ref) + w * L_des(gen), theta_a.  2. L_emb(ref) + w * L_emb(gen), theta_e, routed.
    3. Contrastive step on the noised design latents z, theta_e only:
       eps_des = eps_{0+a}(z, c_des) - eps_0(z, c_des), and
       eps_emb = eps_{0+a}(z, routed c_emb) - eps_0(z, routed c_emb); eps* = eps_emb - eps_des.

    "Self-knowledge distillation" here: the model is its own teacher. eps_des, and both base
    predictions, come from the current model under ``no_grad``; they are targets the style
    residual eps* is measured against, never trained through. Only eps_{0+a}(z, routed c_emb)
    carries gradients, into the style blocks. Six UNet passes per iteration, three with
    gradients.
    """
    batch = PairLatents.batch([pair, generated])
    weights = torch.tensor([1.0, trainer.config.generated_weight])
    noise, sigma = _draw(trainer, batch.design)
    design = _step_loss(trainer, "all", batch.design, noise, sigma, batch.design_cond, weights=weights)
    embroidery = _step_loss(trainer, "style", batch.embroidery, noise, sigma, batch.design_cond,
                            routed=batch.embroidery_cond, weights=weights)
    z = add_noise(trainer.denoiser.prediction, batch.design, noise, sigma)
    with torch.no_grad():
        eps_des = (trainer.predict(z, sigma, batch.design_cond)
                   - trainer.predict(z, sigma, batch.design_cond, lora=False)).float()
        emb_base = trainer.predict(z, sigma, batch.design_cond, routed=batch.embroidery_cond, lora=False).float()
    trainer.adapters.set_trainable("style")
    with trainer.adapters.routed(batch.embroidery_cond.context):
        eps_emb = trainer.predict(z, sigma, batch.design_cond, routed=batch.embroidery_cond).float() - emb_base
        loss = trainer.config.contrastive_weight * contrastive_loss(eps_emb - eps_des, eps_des, trainer.config.tau)
        contrastive = trainer.update("style", loss)
    trainer.step += 1
    return {"design": design, "embroidery": embroidery, "contrastive": contrastive}


def single_prompt_iteration(trainer: Trainer, x0: torch.Tensor, cond: Cond) -> dict[str, torch.Tensor]:
    """One DreamBooth-style step, as B-LoRA and a plain LoRA train: the diffusion loss on ``x0``
    with one prompt in every block, every adapter trains (no design step, no routing)."""
    noise, sigma = _draw(trainer, x0)
    loss = _step_loss(trainer, "all", x0, noise, sigma, cond)
    trainer.step += 1
    return {"loss": loss}


StepCallback = Callable[[int, int, dict[str, torch.Tensor]], None]


def run_stage1(trainer: Trainer, pair: PairLatents, until: int, on_step: StepCallback | None = None):
    """Iterate stage 1 until the global step reaches ``until``; returns the losses per step."""
    history = []
    while trainer.step < until:
        losses = stage1_iteration(trainer, pair)
        history.append(losses)
        if on_step is not None:
            on_step(trainer.step, until, losses)
    return history


def run_stage2(trainer: Trainer, pair: PairLatents, generated: list[PairLatents], until: int,
               on_step: StepCallback | None = None):
    """Iterate stage 2 until the global step reaches ``until``, cycling the generated pairs."""
    if not generated:
        raise ValueError("stage 2 needs at least one generated pair")
    history = []
    while trainer.step < until:
        losses = stage2_iteration(trainer, pair, generated[trainer.step % len(generated)])
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

RUN_ID_KEY = "embroidery.run_id"
# Metadata that does not change what a run learns: a resumed run with more iterations is the same
# run, and so is the record of what it updated so far, which a resumed run carries in.
_NOT_IDENTITY = ("embroidery.stage1_iterations", "embroidery.stage2_iterations", "embroidery.memory_preset",
                 RUN_ID_KEY)


def run_identity(tensors: list[torch.Tensor], settings: dict[str, str]) -> str:
    """Eight hex digits that tell one training run from another: a digest of its images and
    every setting that changes what it learns (iteration counts, memory preset and the record of
    updated blocks are left out). A checkpoint name carries it, so two styles trained with the
    same trigger word never overwrite each other's files, while a resumed run (same inputs) keeps
    writing its own."""
    settings = {k: v for k, v in settings.items()
                if k not in _NOT_IDENTITY and not k.startswith("embroidery.updated_blocks.")}
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


def export(trainer: Trainer, arch: str, stage: int, metadata: dict[str, str] | None = None):
    """The trained LoRA with everything needed to use or resume it in its metadata; ValueError
    if the weights have diverged to NaN/inf (a checkpoint never overwrites a good one with them)."""
    meta = {**trainer.config.metadata(), **(metadata or {}),
            "embroidery.method": "emolora", "embroidery.stage": str(stage), "embroidery.step": str(trainer.step)}
    for kind, key in (("all", "design"), ("style", "embroidery")):
        previous = [b for b in meta.get(f"embroidery.updated_blocks.{key}", "").split(",") if b]
        blocks = set(previous) | trainer.updated_blocks[kind]
        meta[f"embroidery.updated_blocks.{key}"] = ",".join(sorted(blocks, key=block_sort_key))
    lora = trainer.adapters.to_style_lora(arch, meta)
    diverged = lora.non_finite()
    if diverged:
        raise ValueError(f"training diverged by step {trainer.step}: {len(diverged)} LoRA modules hold "
                         "NaN or inf; the last checkpoint is kept. Lower the learning rate, or use precision fp32")
    return lora


def resume_point(lora) -> tuple[int, int]:
    """(stage, global step) of a LoRA this trainer wrote; read from metadata, never the name."""
    meta = lora.metadata
    try:
        return int(meta["embroidery.stage"]), int(meta["embroidery.step"])
    except (KeyError, ValueError):
        raise ValueError("this LoRA has no training state (embroidery.stage / embroidery.step metadata); "
                         "resume only from a file written by EmbroideryTrainStage1/2 or their checkpoints") from None


class Checkpointer:
    """Saves the LoRA every ``every`` steps (atomically, via ``save``) so a crash or a Cancel
    loses at most ``every`` steps; the file always holds a complete, resumable state."""

    def __init__(self, trainer: Trainer, arch: str, stage: int, save: Callable, every: int,
                 metadata: dict[str, str] | None = None):
        self.trainer, self.arch, self.stage, self.save, self.every = trainer, arch, stage, save, every
        self.metadata = metadata or {}
        self.saved: list[int] = []

    def __call__(self, step: int, total: int, losses) -> None:
        if self.every > 0 and (step % self.every == 0 or step == total):
            self.save(export(self.trainer, self.arch, self.stage, self.metadata))
            self.saved.append(step)


# ---------------------------------------------------------------------------- the whole pipeline

def train_emolora(denoiser: Denoiser, unet: torch.nn.Module, pair: PairLatents, style_blocks: list[str], arch,
                  config: EmoLoRAConfig = EmoLoRAConfig(),
                  generate: Callable[[AdapterSet], list[PairLatents]] | None = None,
                  on_step: StepCallback | None = None, compute_dtype: torch.dtype | None = None,
                  gradient_checkpointing: bool = False, metadata: dict[str, str] | None = None):
    """EmoLoRA from one pair on a plain torch UNet: stage 1, then (if ``generate`` is given)
    the complementary pairs it returns, sampled while the stage-1 LoRA is installed, and stage 2.

    Returns (the LoRA with its training state in metadata, the loss curves). The ComfyUI
    trainer nodes run the same Trainer and stage functions on ComfyUI's model.
    """
    from .adapters import Checkpointing, installed, linear_targets

    adapters = AdapterSet(linear_targets(unet, arch.attention_modules()), style_blocks, config.rank, config.alpha,
                          seed=config.seed)
    trainer = Trainer(denoiser, adapters, config, compute_dtype)
    history = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(installed(unet, adapters))
        if gradient_checkpointing:
            stack.enter_context(installed(unet, Checkpointing(unet)))
        history += run_stage1(trainer, pair, config.stage1_iterations, on_step)
        stage = 1
        if generate is not None and config.stage2_iterations > 0:
            with torch.no_grad():
                generated = generate(adapters)
            history += run_stage2(trainer, pair, generated, config.stage1_iterations + config.stage2_iterations,
                                  on_step)
            stage = 2
    meta = {**(metadata or {}), "embroidery.style_blocks": ",".join(style_blocks)}
    return export(trainer, arch.name, stage, meta), loss_map(history)
