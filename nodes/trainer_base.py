"""What every trainer node shares: its common inputs, their checks before any work, resume,
and one ``train`` that runs a phase of a core method with progress, checkpoints and outputs.

A trainer node is a subclass of :class:`TrainerNode` naming its method; its ``execute`` reads
its own inputs into a method config and adapters, builds a :class:`TrainPlan` and calls
``train``. Everything else (fingerprinting, the progress bar, Cancel, checkpoints keyed by the
run's identity, the LoRA and MODEL outputs, the loss map) is here.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import folder_paths
from comfy_api.latest import io

from ..embroidery_core import keys
from ..embroidery_core.adapters import AdapterSet
from ..embroidery_core.files import filename_part
from ..embroidery_core.lora_file import load_optimizer_state, save_lora, save_optimizer_state
from ..embroidery_core.pair import AnalogyPair
from ..embroidery_core.presets import DEFAULT_MEMORY_PRESET, MEMORY_PRESETS, get_memory_preset
from ..embroidery_core.trainer import (Checkpointer, Config, Method, PairLatents, Trainer, config_metadata, export,
                                       loss_map, resume_point, run_identity, run_phase)
from ..embroidery_core.trainer import load_optimizer_state as load_optimizer_state_into
from . import comfy_training as ct
from .common import (NodeInputError, PackNode, StyleLoRAType, apply_lora_patches, check_choice, load_model_lora,
                     lora_fingerprint, lora_path, model_family)

NO_RESUME = "(none)"
PRECISIONS = ["auto", "bf16", "fp16", "fp32"]
CHECKPOINT_FOLDER = "embroidery_checkpoints"
log = logging.getLogger("embroidery.trainer")


@dataclass(frozen=True)
class TrainOptions:
    """The inputs every trainer node has (``trainer_inputs``), checked."""

    iterations: int
    learning_rate: float
    weight_decay: float
    seed: int
    precision: str
    memory_preset: str
    checkpoint_every: int
    resume_from: str
    preview_every: int

    @classmethod
    def read(cls, kw: dict, node: str) -> "TrainOptions":
        """From the node's keyword inputs; a stale combo value from an old workflow fails here,
        before any image is encoded or sampled."""
        check_choice(kw["precision"], PRECISIONS, "precision", node)
        check_choice(kw["memory_preset"], list(MEMORY_PRESETS), "memory_preset", node)
        return cls(**{name: kw[name] for name in cls.__dataclass_fields__})


@dataclass
class TrainPlan:
    """One phase of a method to run: on what, with which adapters, from which step to which."""

    method: Method
    stage: int
    config: Config
    pair: AnalogyPair            # prompts, trigger and images: metadata and the checkpoint's name
    latents: PairLatents
    adapters: AdapterSet
    start: int
    until: int
    generated: list[PairLatents] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)  # the node's own keys, added to the file's
    optimizer_state: dict | None = None  # AdamW's state to continue (trainer.optimizer_state); None = fresh


def trainer_inputs(iterations: int, what: str, learning_rate: float, weight_decay: float, seed: int,
                   recipe: str = "") -> list:
    """The inputs every trainer node ends with, in this order (workflows store them by position).
    With ``recipe`` (a sentence naming the recipes' values), iterations and learning rate 0 and
    weight decay -1 mean "the recipe's"."""
    low = 0 if recipe else 1
    return [
        io.Int.Input("iterations", default=iterations, min=low, max=10000,
                     tooltip=f"{what} iterations" + (f"; 0 = the recipe's ({recipe})." if recipe
                                                     else f" (official schedule: {iterations}).")),
        io.Float.Input("learning_rate", default=learning_rate, min=0.0 if recipe else 1e-7, max=1e-2, step=1e-6,
                       tooltip="AdamW learning rate, constant" + ("; 0 = the recipe's." if recipe else ".")),
        io.Float.Input("weight_decay", default=weight_decay, min=-1.0 if recipe else 0.0, max=1.0, step=1e-3,
                       tooltip="AdamW weight decay" + ("; -1 = the recipe's." if recipe else ".")),
        io.Int.Input("seed", default=seed, min=0, max=0xFFFFFFFF, tooltip="Seed of noise, timesteps and init."),
        io.Combo.Input("precision", options=PRECISIONS, default="auto",
                       tooltip="Compute dtype (LoRA weights stay fp32). auto: bf16 where supported, fp32 on CPU."),
        io.Combo.Input("memory_preset", options=list(MEMORY_PRESETS), default=DEFAULT_MEMORY_PRESET,
                       tooltip="; ".join(f"{name}: {preset.description}" for name, preset in MEMORY_PRESETS.items())
                               + " Peak memory per preset: docs/PERFORMANCE.md."),
        io.Int.Input("checkpoint_every", default=100, min=0, max=10000,
                     tooltip="Save a resumable checkpoint every N steps (0 = off), to loras/embroidery_checkpoints/"
                             "<trigger>_stage<N>_<run id>.safetensors: each run (images + settings) has its own "
                             "file, so another style with the same trigger word never overwrites it."),
        io.Combo.Input("resume_from", options=[NO_RESUME] + folder_paths.get_filename_list("loras"),
                       tooltip="Continue from a checkpoint or saved LoRA of this trainer; its step count and "
                               "stage come from the file's metadata."),
        io.Int.Input("preview_every", default=25, min=1, max=1000, tooltip="Loss text and preview every N steps."),
    ]


def trainer_outputs() -> list:
    return [StyleLoRAType.Output(display_name="lora", tooltip="The whole trained LoRA (save it to resume or share)."),
            io.Model.Output(display_name="model", tooltip="The input model with the LoRA's style blocks applied."),
            io.LossMap.Output(display_name="loss", tooltip="Per-step losses of this run for LossGraphNode "
                                                           "(ComfyUI's plot needs two or more steps).")]


def checkpoint_name(pair, stage: int, run_id: str, tag: str = "stage") -> str:
    """``loras/embroidery_checkpoints/<trigger>_<tag><N>_<run id>.safetensors`` (EmoLoRA's tag is
    ``stage``), a name every OS accepts whatever the trigger word (``<emb>`` becomes ``_emb_``)."""
    return f"{CHECKPOINT_FOLDER}/{filename_part(pair.trigger)}_{tag}{stage}_{run_id}.safetensors"


def _checkpoint_saver(pair, stage: int, run_id: str, tag: str):
    """Saves a checkpoint: its optimizer state first, then the LoRA (each atomically), so the
    LoRA file a user resumes from never points at an older optimizer state than its own."""
    folder = folder_paths.get_folder_paths("loras")[0]
    path = os.path.join(folder, *checkpoint_name(pair, stage, run_id, tag).split("/"))

    def save(lora):
        if lora.optimizer_state:
            save_optimizer_state(lora.optimizer_state, path, _state_tag(lora.metadata))
        save_lora(lora, path)

    return save


def _state_tag(metadata: dict[str, str]) -> dict[str, str]:
    return {keys.STEP: metadata.get(keys.STEP, ""), keys.RUN_ID: metadata.get(keys.RUN_ID, "")}


def saved_optimizer_state(name: str, lora, node: str) -> dict | None:
    """The optimizer state saved beside the LoRA file ``name``, if it belongs to that file's step
    and run; None otherwise (the run then continues with a fresh AdamW, and the log says why)."""
    found = load_optimizer_state(lora_path(name, node))
    if found is None:
        log.info("%s: no optimizer state beside %s; AdamW starts fresh", node, name)
        return None
    state, tag = found
    if tag != _state_tag(lora.metadata):
        log.warning("%s: the optimizer state beside %s is of another step or run (%s, the file: %s); "
                    "AdamW starts fresh", node, name, tag, _state_tag(lora.metadata))
        return None
    return state


def pair_metadata(pair, style_blocks: list[str]) -> dict[str, str]:
    """What a file records about the pair it was trained on."""
    return {keys.TRIGGER: pair.trigger, keys.SUBJECT: pair.subject, keys.DESIGN_PROMPT: pair.design_prompt,
            keys.EMBROIDERY_PROMPT: pair.embroidery_prompt, keys.STYLE_BLOCKS: ",".join(style_blocks),
            keys.RESOLUTION: str(pair.embroidery.shape[2])}


def updated_history(lora) -> dict[str, str]:
    """What an earlier run recorded about its updates, carried into the new file."""
    if lora is None:
        return {}
    return {k: v for k, v in lora.metadata.items() if k.startswith(keys.UPDATED_BLOCKS)}


class TrainerNode(PackNode):
    """Base of the trainer nodes: a subclass sets ``METHOD`` and writes ``define_schema`` and
    ``execute``."""

    METHOD: Method

    @classmethod
    def fingerprint_inputs(cls, resume_from=NO_RESUME, **kwargs):
        return lora_fingerprint(resume_from) if resume_from != NO_RESUME else NO_RESUME

    @classmethod
    def node_name(cls) -> str:
        return cls.define_schema().display_name

    @classmethod
    def check(cls, model, kw: dict):
        """(the model's block layout, the checked options): the model family, its noise
        parameterisation and every shared option, before any work is done."""
        node = cls.node_name()
        arch = model_family(model, node)
        ct.prediction_type(model)
        return arch, TrainOptions.read(kw, node)

    @classmethod
    def resume(cls, options: TrainOptions, model, stage: int):
        """(the file to resume or None, its step, the optimizer state saved beside it or None),
        checked against the model (family, shapes, NaN), the method and the stage."""
        if options.resume_from == NO_RESUME:
            return None, 0, None
        node = cls.node_name()
        lora = load_model_lora(options.resume_from, model, node)
        file_stage, step = resume_point(lora, cls.METHOD)
        if file_stage != stage:
            raise NodeInputError(node, f"{options.resume_from} was written by stage {file_stage}; "
                                       f"resume it in Train Stage {file_stage}")
        return lora, step, saved_optimizer_state(options.resume_from, lora, node)

    @classmethod
    def train(cls, model, options: TrainOptions, plan: TrainPlan):
        """Run ``plan`` on a clone of ``model``: (the LoRA, the model with its style blocks
        applied, the loss map)."""
        node = cls.node_name()
        arch = model_family(model, node)
        preset = get_memory_preset(options.memory_preset)
        blocks = plan.adapters.style_blocks
        meta = {**config_metadata(plan.config), **pair_metadata(plan.pair, blocks), **plan.metadata,
                keys.ARCH: arch.name, keys.STAGE: str(plan.stage), keys.PRECISION: options.precision}
        meta[keys.RUN_ID] = run_identity([plan.pair.embroidery, plan.pair.design], meta)
        meta[keys.MEMORY_PRESET] = options.memory_preset
        phase = plan.method.phase(plan.stage)
        with ct.training_session(model, *preset.providers(plan.adapters, model.model.diffusion_model)) as clone:
            denoiser = ct.ComfyDenoiser(clone)
            plan.adapters.to(denoiser.device)
            trainer = Trainer(denoiser, plan.adapters, plan.config, ct.compute_dtype(options.precision, denoiser.device),
                              step=plan.start, optimizer_factory=preset.optimizer_factory)
            if plan.optimizer_state:
                load_optimizer_state_into(trainer, plan.optimizer_state)
            node_id = cls.hidden.unique_id if cls.hidden is not None else None
            progress = ct.Progress(node_id, plan.start, plan.until, options.preview_every, clone, trainer)
            saver = Checkpointer(trainer, arch.name, plan.method, plan.stage,
                                 _checkpoint_saver(plan.pair, plan.stage, meta[keys.RUN_ID], plan.method.file_tag),
                                 options.checkpoint_every,
                                 meta)
            history = run_phase(trainer, phase, plan.latents, plan.until, plan.generated, ct.chain(progress, saver))
        lora = export(trainer, arch.name, plan.method, plan.stage, meta)
        patched = apply_lora_patches(model, lora.filter_blocks(blocks), 1.0, node)
        return lora, patched, loss_map(history)
