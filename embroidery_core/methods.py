"""The training methods of the pack, as data for the one loop in ``trainer.py`` (METHODS.md).

Each method is a config dataclass (every default in one place, official code unless noted) and a
:class:`~trainer.Method`: its phases, each a list of loss terms. Adding a method is one config,
one ``Method`` here and one thin trainer node; the loop, export, resume, checkpoints and the
node layer's trainer base serve it unchanged.

Reading order: EmoLoRA (two stages), the one-image LoRA (B-LoRA's and DreamBooth's recipes),
then the plain-torch pipelines the toy world and the tests run.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from . import keys
from .adapters import AdapterSet, Checkpointing, PairAdapterSet, installed, linear_targets
from .diffusion import Denoiser
from .trainer import (ContrastiveTerm, DiffusionTerm, Method, PairLatents, Phase, StepCallback, Trainer, export,
                      loss_map, run_phase)


# --- EmoLoRA ---------------------------------------------------------------------------------

@dataclass
class EmoLoRAConfig:
    """Every default of EmoLoRA in one place (official code unless noted)."""

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


# Stage 1: the design step (whole LoRA, design prompt), then the embroidery step (style blocks
# only; they read the embroidery prompt, every other block the design prompt).
DESIGN_STEP = DiffusionTerm("design", trainable="all", image="design")
EMBROIDERY_STEP = DiffusionTerm("embroidery", trainable="style", image="embroidery", routed="embroidery")
# Stage 2: both again on the reference and one generated pair, then the contrastive step.
EMOLORA = Method(
    "emolora",
    phases=(Phase(1, (DESIGN_STEP, EMBROIDERY_STEP)),
            Phase(2, (DESIGN_STEP, EMBROIDERY_STEP, ContrastiveTerm()), generated=True)),
    labels=(("all", "design"), ("style", "embroidery")),
)


# --- one-image LoRA --------------------------------------------------------------------------

@dataclass
class LoRAConfig:
    """A LoRA on chosen blocks learnt from one image with one prompt (DreamBooth-style)."""

    rank: int = 64
    alpha: float = 64.0
    learning_rate: float = 5e-5
    weight_decay: float = 1e-4
    iterations: int = 1000
    seed: int = 0


# The plain diffusion loss on the reference with its prompt in every block; every adapter trains.
REFERENCE_STEP = DiffusionTerm("loss", trainable="all", image="embroidery", prompt="embroidery")
LORA = Method("lora", phases=(Phase(1, (REFERENCE_STEP,)),), labels=(("all", "reference"),), file_tag="lora")


@dataclass(frozen=True)
class LoRARecipe:
    """A published one-image LoRA recipe: its blocks (presets of ``blocks.py``; ``None`` for
    style means every attention block, for content none), its prompt (``{trigger}`` and
    ``{subject}`` are filled in) and its defaults."""

    name: str
    content: str | None
    style: str | None
    prompt: str
    defaults: LoRAConfig
    source: str

    def blocks(self, arch, custom: list[str] | None = None) -> tuple[list[str], list[str]]:
        """(content blocks, style blocks) on ``arch``; ``custom`` replaces the style blocks."""
        content = arch.preset(self.content) if self.content else []
        style = custom if custom is not None else (arch.preset(self.style) if self.style else arch.attention_blocks())
        return content, [b for b in style if b not in content]

    def text(self, trigger: str, subject: str) -> str:
        return self.prompt.format(trigger=trigger, subject=subject)

    def config(self, rank: int = 0, alpha: float = 0.0, learning_rate: float = 0.0, weight_decay: float = -1.0,
               iterations: int = 0, seed: int = 0) -> LoRAConfig:
        """The recipe's config with the given values; 0 (weight decay: -1) keeps the recipe's, and
        alpha 0 means alpha = rank (scale 1, as every recipe)."""
        rank = rank or self.defaults.rank
        return LoRAConfig(rank=rank, alpha=alpha or float(rank),
                          learning_rate=learning_rate or self.defaults.learning_rate,
                          weight_decay=self.defaults.weight_decay if weight_decay < 0 else weight_decay,
                          iterations=iterations or self.defaults.iterations, seed=seed)


LORA_RECIPES: dict[str, LoRARecipe] = {r.name: r for r in (
    # B-LoRA (METHODS.md section 5): W4 (content) and W5 (style) trained jointly on "A [v]",
    # r 64, scale 1, lr 5e-5, 1000 steps; weight decay the diffusers DreamBooth script's 1e-4.
    LoRARecipe("b_lora", content="blora_content", style="blora_style", prompt="A {trigger}",
               defaults=LoRAConfig(rank=64, alpha=64.0, learning_rate=5e-5, weight_decay=1e-4, iterations=1000),
               source="B-LoRA's official training script"),
    # DiffStyler's style LoRA (section 3): every attention layer, r 16, lr 2e-4, 200 steps.
    LoRARecipe("dreambooth_all_attention", content=None, style=None, prompt="a {subject} in {trigger} style",
               defaults=LoRAConfig(rank=16, alpha=16.0, learning_rate=2e-4, weight_decay=1e-2, iterations=200),
               source="DiffStyler's style-LoRA training"),
    # Your own blocks (e.g. from Find Style Blocks), EmoLoRA's rank and learning rate.
    LoRARecipe("custom", content=None, style=None, prompt="a {subject} in {trigger} style",
               defaults=LoRAConfig(rank=32, alpha=32.0, learning_rate=1e-4, weight_decay=1e-2, iterations=400),
               source="this pack (EmoLoRA's rank and learning rate)"),
)}


# --- Pair Customization ----------------------------------------------------------------------

@dataclass
class PairConfig:
    """Pair Customization (METHODS.md section 2, official code): a content and a style LoRA on
    every attention layer, frozen orthonormal downs, only the ups train."""

    rank: int = 64
    alpha: float = 64.0
    learning_rate: float = 1e-5
    weight_decay: float = 1e-4
    iterations: int = 750          # optimizer steps, each over `accumulate` draws
    style_start: int = 250         # the style step joins at this step
    accumulate: int = 4
    basis_seed: int = 123846       # of the orthonormal downs (adapters.PAIR_SEED)
    seed: int = 0


def pair_customization(config: PairConfig = PairConfig()) -> Method:
    """Content step every step: the design with its prompt through theta + theta_c, content ups
    learn. Style step from ``style_start``: the embroidery with "a <subject> in <trigger> style"
    through theta + theta_c + theta_s, the content LoRA active but frozen, style ups learn. Same
    noise and timestep in both, gradient accumulation over ``accumulate`` draws."""
    content = DiffusionTerm("content", trainable="content", image="design", active=("content",))
    style = DiffusionTerm("style", trainable="style", image="embroidery", prompt="embroidery",
                          start=config.style_start, active=("content", "style"))
    return Method("pair_customization", phases=(Phase(1, (content, style), accumulate=config.accumulate),),
                  labels=(("content", "content"), ("style", "style")), file_tag="pair")


PAIR_CUSTOMIZATION = pair_customization()


# --- plain-torch pipelines (the toy world, tests) --------------------------------------------

def _adapters(unet: torch.nn.Module, arch, blocks: list[str] | None, style_blocks: list[str], config) -> AdapterSet:
    return AdapterSet(linear_targets(unet, arch.attention_modules(blocks)), style_blocks, config.rank, config.alpha,
                      seed=config.seed)


@contextlib.contextmanager
def _on(unet: torch.nn.Module, adapters: AdapterSet, gradient_checkpointing: bool):
    with contextlib.ExitStack() as stack:
        stack.enter_context(installed(unet, adapters))
        if gradient_checkpointing:
            stack.enter_context(installed(unet, Checkpointing(unet)))
        yield


def train_emolora(denoiser: Denoiser, unet: torch.nn.Module, pair: PairLatents, style_blocks: list[str], arch,
                  config: EmoLoRAConfig = EmoLoRAConfig(),
                  generate: Callable[[AdapterSet], list[PairLatents]] | None = None,
                  on_step: StepCallback | None = None, compute_dtype: torch.dtype | None = None,
                  gradient_checkpointing: bool = False, metadata: dict[str, str] | None = None):
    """EmoLoRA from one pair on a plain torch UNet: stage 1, then (if ``generate`` is given)
    the complementary pairs it returns, sampled while the stage-1 LoRA is installed, and stage 2.

    Returns (the LoRA with its training state in metadata, the loss curves). The ComfyUI
    trainer nodes run the same Trainer and phases on ComfyUI's model.
    """
    adapters = _adapters(unet, arch, None, style_blocks, config)
    trainer = Trainer(denoiser, adapters, config, compute_dtype)
    history, stage = [], 1
    with _on(unet, adapters, gradient_checkpointing):
        history += run_phase(trainer, EMOLORA.phase(1), pair, config.stage1_iterations, on_step=on_step)
        if generate is not None and config.stage2_iterations > 0:
            with torch.no_grad():
                generated = generate(adapters)
            history += run_phase(trainer, EMOLORA.phase(2), pair, config.stage1_iterations + config.stage2_iterations,
                                 generated, on_step)
            stage = 2
    meta = {**(metadata or {}), keys.STYLE_BLOCKS: ",".join(style_blocks)}
    return export(trainer, arch.name, EMOLORA, stage, meta), loss_map(history)


def train_lora(denoiser: Denoiser, unet: torch.nn.Module, pair: PairLatents, blocks: list[str], arch,
               config: LoRAConfig = LoRAConfig(), on_step: StepCallback | None = None,
               metadata: dict[str, str] | None = None, style_blocks: list[str] | None = None):
    """A one-image LoRA on ``blocks`` of a plain torch UNet (the reference with its embroidery
    prompt, every block reading it); ``style_blocks`` (default: all of them) is what the file
    records as style. Returns (the LoRA, the loss curves)."""
    style = list(blocks) if style_blocks is None else list(style_blocks)
    adapters = _adapters(unet, arch, blocks, style, config)
    trainer = Trainer(denoiser, adapters, config)
    with _on(unet, adapters, False):
        history = run_phase(trainer, LORA.phase(1), pair, config.iterations, on_step=on_step)
    meta = {**(metadata or {}), keys.CONTENT_BLOCKS: ",".join(b for b in blocks if b not in style)}
    return export(trainer, arch.name, LORA, 1, meta), loss_map(history)


def train_pair(denoiser: Denoiser, unet: torch.nn.Module, pair: PairLatents, arch, config: PairConfig = PairConfig(),
               on_step: StepCallback | None = None, metadata: dict[str, str] | None = None):
    """Pair Customization on a plain torch UNet: (the style LoRA, the content LoRA, the loss curves)."""
    adapters = PairAdapterSet(linear_targets(unet, arch.attention_modules()), config.rank, config.alpha,
                              config.basis_seed)
    trainer = Trainer(denoiser, adapters, config)
    method = pair_customization(config)
    with _on(unet, adapters, False):
        history = run_phase(trainer, method.phase(1), pair, config.iterations, on_step=on_step)
    style = export(trainer, arch.name, method, 1, {**(metadata or {}), keys.PAIR_GROUP: "style"})
    content = adapters.to_style_lora(arch.name, {**style.metadata, keys.PAIR_GROUP: "content"}, group="content")
    return style, content, loss_map(history)
