"""EmoLoRA inside the graph: analogy pair, style-block discovery, stage 1 and stage 2."""
from __future__ import annotations

import os

import torch

import folder_paths
from comfy_api.latest import io, ui

from ..embroidery_core import block_metric
from ..embroidery_core.adapters import AdapterSet, linear_targets
from ..embroidery_core.blocks import preset_names
from ..embroidery_core.images import bar_chart, flatten_design, side_by_side
from ..embroidery_core.files import filename_part
from ..embroidery_core.lora_file import require_fit, save_lora
from ..embroidery_core.pair import DEFAULT_RESOLUTION, LATENT_MULTIPLE, AnalogyPair, build_pair, embroidery_prompt
from ..embroidery_core.presets import DEFAULT_MEMORY_PRESET, MEMORY_PRESETS, get_memory_preset
from ..embroidery_core.trainer import (RUN_ID_KEY, Checkpointer, EmoLoRAConfig, PairLatents, Trainer,
                                       check_resume_range, export, loss_map, resume_point, run_identity, run_stage1,
                                       run_stage2)
from . import comfy_training as ct
from .common import (CATEGORY, AnalogyPairType, NodeInputError, PackNode, StyleLoRAType, apply_lora_patches,
                     check_choice, load_model_lora, lora_fingerprint, model_family, resolve_blocks, weight_shapes)

NO_RESUME = "(none)"
PRECISIONS = ["auto", "bf16", "fp16", "fp32"]
SELECTIONS = ["paper preset", "measured top-k"]
DEFAULTS = EmoLoRAConfig()
DEFAULT_STAGE2_SUBJECTS = "red apple\nblue bird\nyellow flower"


def _model_inputs() -> list:
    """model, clip, vae and pair: the same four sockets on every training node."""
    return [io.Model.Input("model", tooltip="The SD1.5/SDXL checkpoint to train on; it is cloned, never modified."),
            io.Clip.Input("clip", tooltip="The checkpoint's text encoder, for the design and embroidery prompts."),
            io.Vae.Input("vae", tooltip="The checkpoint's VAE; both images are encoded once."),
            AnalogyPairType.Input("pair", tooltip="The pair from Embroidery Analogy Pair.")]


class EmbroideryAnalogyPair(PackNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EmbroideryAnalogyPair",
            display_name="Embroidery Analogy Pair",
            category=f"{CATEGORY}/training",
            description="Pairs ONE embroidery photo with its flat design (yours, or made here by flattening the "
                        "photo) and writes the two training prompts.",
            inputs=[
                io.Image.Input("reference", tooltip="One photo of an embroidery (the first image of a batch is used)."),
                io.String.Input("subject", default="flower",
                                tooltip="What the embroidery shows, in a few words: design prompt 'a <subject>'."),
                io.String.Input("trigger", default="emb",
                                tooltip="One new word for the stitch style: embroidery prompt "
                                        "'a <subject> in <trigger> style'. Use the same word at inference."),
                io.Int.Input("resolution", default=DEFAULT_RESOLUTION, min=LATENT_MULTIPLE, max=2048, step=LATENT_MULTIPLE,
                             tooltip="Longer side of both training images (SDXL: 1024, SD1.5: 512)."),
                io.Int.Input("colours", default=8, min=2, max=32,
                             tooltip="Colours of the built-in flattened design (ignored when a design is connected)."),
                io.Image.Input("design", optional=True,
                               tooltip="The flat design the embroidery was made from. Leave empty to flatten the "
                                       "photo, or feed the output of the generative-design template."),
                io.Mask.Input("mask", optional=True, tooltip="Optional mask of the embroidered subject."),
            ],
            outputs=[AnalogyPairType.Output(display_name="pair"),
                     io.Image.Output(display_name="preview", tooltip="Embroidery and design side by side."),
                     io.Image.Output(display_name="design", tooltip="The design used for training.")],
        )

    @classmethod
    def execute(cls, reference, subject, trigger, resolution, colours, design=None, mask=None) -> io.NodeOutput:
        pair = build_pair(reference, design, mask, subject, trigger, resolution, colours)
        preview = side_by_side([pair.embroidery, pair.design])
        return io.NodeOutput(pair, preview, pair.design, ui=ui.PreviewImage(preview, cls=cls))


def _encode_pair(model, clip, vae, pair, device) -> PairLatents:
    height, width = pair.embroidery.shape[1:3]
    return PairLatents(
        ct.encode_image(vae, model, pair.design, device), ct.encode_image(vae, model, pair.embroidery, device),
        ct.encode_prompt(clip, model, pair.design_prompt, height, width, device),
        ct.encode_prompt(clip, model, pair.embroidery_prompt, height, width, device))


def _style_blocks(text: str, arch, node: str) -> list[str]:
    text = text.strip()
    preset = text if text in preset_names() else "custom"
    return resolve_blocks(preset, text, arch, node)


class EmbroideryFindStyleBlocks(PackNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EmbroideryFindStyleBlocks",
            display_name="Find Style Blocks",
            category=f"{CATEGORY}/training",
            description="EmoLoRA's block-selection metric: ranks attention blocks by how differently they see the "
                        "embroidery and its design (low self-attention similarity = stitch-sensitive).",
            inputs=[
                *_model_inputs(),
                io.Combo.Input("selection", options=SELECTIONS, default=SELECTIONS[0],
                               tooltip="paper preset: return EmoLoRA's four blocks (SDXL; analogues on SD1.5) and "
                                       "show the measurement; measured top-k: return the k lowest-similarity blocks."),
                io.Int.Input("top_k", default=4, min=1, max=16, tooltip="How many blocks 'measured top-k' returns."),
                io.Int.Input("timesteps", default=block_metric.DEFAULT_TIMESTEPS, min=1, max=50,
                             tooltip="Noise levels averaged over (the paper uses 10)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, tooltip="Seed of the shared noise."),
            ],
            outputs=[io.String.Output(display_name="style_blocks", tooltip="Block list for the trainers."),
                     io.String.Output(display_name="ranking"), io.Image.Output(display_name="chart")],
        )

    @classmethod
    def execute(cls, model, clip, vae, pair, selection, top_k, timesteps, seed) -> io.NodeOutput:
        node = "Find Style Blocks"
        check_choice(selection, SELECTIONS, "selection", node)
        arch = _trainable_family(model, node)
        recorder = block_metric.FeatureRecorder(arch.attention_modules())
        latents = _encode_pair(model, clip, vae, pair, model.load_device)
        with ct.training_session(model, recorder, trainable_graph=False) as clone, torch.no_grad():
            denoiser = ct.ComfyDenoiser(clone)
            noise = torch.randn(latents.design.shape, generator=torch.Generator().manual_seed(seed)).to(latents.design)
            run = ct.interruptible(lambda x_t, sigma: denoiser(x_t, sigma, latents.design_cond))
            sigmas = block_metric.evenly_spaced(denoiser.sampling.sigmas.float().cpu(), timesteps)
            similarity = block_metric.measure(run, recorder, latents.design, latents.embroidery, sigmas, noise,
                                              denoiser.prediction)
        ranking = block_metric.rank_blocks(similarity)
        chosen = arch.preset("emolora_style") if selection == "paper preset" else [b for b, _ in ranking[:top_k]]
        text = block_metric.format_ranking(ranking, chosen)
        chart = bar_chart([b for b, _ in ranking], [1 - v for _, v in ranking],
                          title="1 - self-attention similarity (higher = more stitch-sensitive)", highlight=set(chosen))
        return io.NodeOutput(", ".join(chosen), text, chart, ui=ui.PreviewText(text))


# ---------------------------------------------------------------------------- trainers

def _trainer_inputs(iterations: int, stage: int) -> list:
    return [
        io.Int.Input("iterations", default=iterations, min=1, max=10000,
                     tooltip=f"Stage-{stage} iterations (official schedule: {iterations})."),
        io.Float.Input("learning_rate", default=DEFAULTS.learning_rate, min=1e-7, max=1e-2, step=1e-6,
                       tooltip="AdamW learning rate, constant."),
        io.Float.Input("weight_decay", default=DEFAULTS.weight_decay, min=0.0, max=1.0, step=1e-3,
                       tooltip="AdamW weight decay."),
        io.Int.Input("seed", default=DEFAULTS.seed, min=0, max=0xFFFFFFFF, tooltip="Seed of noise, timesteps and init."),
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
                       tooltip="Continue from a checkpoint or saved LoRA of this stage; its step count and stage "
                               "come from the file's metadata."),
        io.Int.Input("preview_every", default=25, min=1, max=1000, tooltip="Loss text and preview every N steps."),
    ]


def _trainer_outputs() -> list:
    return [StyleLoRAType.Output(display_name="lora", tooltip="The whole trained LoRA (save it to resume or share)."),
            io.Model.Output(display_name="model", tooltip="The input model with the LoRA's style blocks applied."),
            io.LossMap.Output(display_name="loss", tooltip="Per-step losses of this run for LossGraphNode "
                                                           "(ComfyUI's plot needs two or more steps).")]


CHECKPOINT_FOLDER = "embroidery_checkpoints"


def checkpoint_name(pair, stage: int, run_id: str) -> str:
    """``loras/embroidery_checkpoints/<trigger>_stage<N>_<run id>.safetensors``, a name every OS
    accepts whatever the trigger word (``<emb>`` becomes ``_emb_``)."""
    return f"{CHECKPOINT_FOLDER}/{filename_part(pair.trigger)}_stage{stage}_{run_id}.safetensors"


def _checkpoint_saver(pair, stage: int, run_id: str):
    folder = folder_paths.get_folder_paths("loras")[0]
    path = os.path.join(folder, *checkpoint_name(pair, stage, run_id).split("/"))
    return lambda lora: save_lora(lora, path)


def _metadata(pair, blocks) -> dict[str, str]:
    return {"embroidery.trigger": pair.trigger, "embroidery.subject": pair.subject,
            "embroidery.design_prompt": pair.design_prompt, "embroidery.embroidery_prompt": pair.embroidery_prompt,
            "embroidery.style_blocks": ",".join(blocks), "embroidery.resolution": str(pair.embroidery.shape[2])}


def _history(lora) -> dict[str, str]:
    """What an earlier run recorded about its updates, carried into the new file."""
    if lora is None:
        return {}
    return {k: v for k, v in lora.metadata.items() if k.startswith("embroidery.updated_blocks.")}


def _resume(name: str, model, stage: int, node: str):
    """The file to resume and its step, checked against the model (family, shapes, NaN) and the stage."""
    if name == NO_RESUME:
        return None, 0
    lora = load_model_lora(name, model, node)
    file_stage, step = resume_point(lora)
    if file_stage != stage:
        raise NodeInputError(node, f"{name} was written by stage {file_stage}; resume it in Train Stage {file_stage}")
    return lora, step


def _trainable_family(model, node: str, kw: dict | None = None):
    """model_family, with the model's noise parameterisation and a trainer's options (``kw``)
    checked before any work is done."""
    arch = model_family(model, node)
    ct.prediction_type(model)
    if kw is not None:
        check_choice(kw["precision"], PRECISIONS, "precision", node)
        check_choice(kw["memory_preset"], list(MEMORY_PRESETS), "memory_preset", node)
    return arch


def _train(cls, node, model, adapters, config, pair, latents_fn, stage, start, until, run, kw, extra_meta=None):
    """Shared body of both trainers: session, progress, checkpoints, outputs."""
    arch = model_family(model, node)
    preset = get_memory_preset(kw["memory_preset"])
    blocks = adapters.style_blocks
    meta = {**config.metadata(), **_metadata(pair, blocks), **(extra_meta or {}), "embroidery.arch": arch.name,
            "embroidery.stage": str(stage), "embroidery.precision": kw["precision"]}
    meta[RUN_ID_KEY] = run_identity([pair.embroidery, pair.design], meta)
    meta["embroidery.memory_preset"] = kw["memory_preset"]
    providers = preset.providers(adapters, model.model.diffusion_model)
    latents = latents_fn(model.load_device)
    with ct.training_session(model, *providers) as clone:
        denoiser = ct.ComfyDenoiser(clone)
        adapters.to(denoiser.device)
        trainer = Trainer(denoiser, adapters, config, ct.compute_dtype(kw["precision"], denoiser.device), step=start,
                          optimizer_factory=preset.optimizer_factory)
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        progress = ct.Progress(node_id, start, until, kw["preview_every"], clone, trainer)
        saver = Checkpointer(trainer, arch.name, stage, _checkpoint_saver(pair, stage, meta[RUN_ID_KEY]),
                             kw["checkpoint_every"], meta)
        history = run(trainer, latents, until, ct.chain(progress, saver))
    lora = export(trainer, arch.name, stage, meta)
    patched = apply_lora_patches(model, lora.filter_blocks(blocks), 1.0, node)
    return lora, patched, loss_map(history)


class EmbroideryTrainStage1(PackNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EmbroideryTrainStage1",
            display_name="Train Embroidery LoRA (Stage 1)",
            category=f"{CATEGORY}/training",
            description="EmoLoRA stage 1: each iteration a design step (whole LoRA) and an embroidery step (style "
                        "blocks only, which read the embroidery prompt), same noise and timestep.",
            inputs=[*_model_inputs(),
                    io.String.Input("style_blocks", default="emolora_style",
                                    tooltip="A preset name or a block list (e.g. from Find Style Blocks)."),
                    io.Int.Input("rank", default=DEFAULTS.rank, min=1, max=256, tooltip="LoRA rank (paper: 32)."),
                    io.Float.Input("alpha", default=DEFAULTS.alpha, min=0.01, max=1024.0, step=0.01,
                                   tooltip="LoRA alpha; scale = alpha / rank (paper: 32)."),
                    *_trainer_inputs(DEFAULTS.stage1_iterations, 1)],
            outputs=_trainer_outputs(),
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, resume_from=NO_RESUME, **kwargs):
        return lora_fingerprint(resume_from) if resume_from != NO_RESUME else NO_RESUME

    @classmethod
    def execute(cls, model, clip, vae, pair, style_blocks, rank, alpha, **kw) -> io.NodeOutput:
        node = "Train Embroidery LoRA (Stage 1)"
        arch = _trainable_family(model, node, kw)
        blocks = _style_blocks(style_blocks, arch, node)
        config = EmoLoRAConfig(rank=rank, alpha=alpha, learning_rate=kw["learning_rate"],
                               weight_decay=kw["weight_decay"], stage1_iterations=kw["iterations"], seed=kw["seed"])
        resume, start = _resume(kw["resume_from"], model, 1, node)
        if resume is not None:
            check_resume_range(kw["resume_from"], start, config.stage1_iterations, "iterations")
        with torch.inference_mode(False):
            targets = linear_targets(model.model.diffusion_model, arch.attention_modules())
            adapters = AdapterSet(targets, blocks, rank, alpha, seed=config.seed)
            if resume is not None:
                adapters.load_style_lora(resume)
            run = lambda trainer, latents, until, cb: run_stage1(trainer, latents, until, cb)
            latents_fn = lambda device: _encode_pair(model, clip, vae, pair, device)
            lora, patched, losses = _train(cls, node, model, adapters, config, pair, latents_fn, 1, start,
                                           config.stage1_iterations, run, kw, _history(resume))
        return io.NodeOutput(lora, patched, losses)


class EmbroideryTrainStage2(PackNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EmbroideryTrainStage2",
            display_name="Train Embroidery LoRA (Stage 2)",
            category=f"{CATEGORY}/training",
            description="EmoLoRA stage 2: samples complementary pairs with the stage-1 LoRA, then trains on the "
                        "reference plus one generated pair per iteration with the contrastive loss.",
            inputs=[*_model_inputs(),
                    StyleLoRAType.Input("lora", tooltip="The stage-1 LoRA."),
                    io.String.Input("subjects", default=DEFAULT_STAGE2_SUBJECTS, multiline=True,
                                    tooltip="One subject per line; each gives one generated pair "
                                            "('a <subject> in <trigger> style'). Official code: 3, paper: 10."),
                    io.Float.Input("generated_weight", default=DEFAULTS.generated_weight, min=0.0, max=1.0, step=0.01,
                                   tooltip="Loss weight of a generated pair next to the reference (0.1)."),
                    io.Float.Input("contrastive_weight", default=DEFAULTS.contrastive_weight, min=0.0, max=1.0,
                                   step=1e-5, tooltip="Weight of the contrastive loss (1e-4)."),
                    io.Float.Input("tau", default=DEFAULTS.tau, min=0.01, max=10.0, step=0.01,
                                   tooltip="Contrastive temperature (1)."),
                    io.Int.Input("sample_steps", default=30, min=1, max=150,
                                 tooltip="Sampling steps for each generated image (Euler ancestral)."),
                    io.Float.Input("cfg", default=7.0, min=0.0, max=30.0, step=0.1, tooltip="CFG of the generated images."),
                    *_trainer_inputs(DEFAULTS.stage2_iterations, 2)],
            outputs=_trainer_outputs() + [io.Image.Output(display_name="generated",
                                                          tooltip="Generated embroideries above their designs.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, resume_from=NO_RESUME, **kwargs):
        return lora_fingerprint(resume_from) if resume_from != NO_RESUME else NO_RESUME

    @classmethod
    def execute(cls, model, clip, vae, pair, lora, subjects, generated_weight, contrastive_weight, tau,
                sample_steps, cfg, **kw) -> io.NodeOutput:
        node = "Train Embroidery LoRA (Stage 2)"
        arch = _trainable_family(model, node, kw)
        lines = [s.strip() for s in subjects.splitlines() if s.strip()]
        if not lines:
            raise NodeInputError(node, "subjects is empty; write one subject per line, e.g. 'red apple'")
        stage, stage1_step = resume_point(lora)
        if lora.arch != arch.name:
            raise NodeInputError(node, f"the connected stage-1 LoRA was trained on {lora.arch}, the model is "
                                       f"{arch.name}; connect the model the stage-1 LoRA was trained on")
        require_fit(lora, weight_shapes(model), arch.name, "the connected stage-1 LoRA")
        if stage != 1:
            raise NodeInputError(node, f"the connected LoRA is from stage {stage}; connect the stage-1 LoRA "
                                       "(to continue stage 2, use resume_from)")
        config = EmoLoRAConfig(rank=lora.rank, learning_rate=kw["learning_rate"], weight_decay=kw["weight_decay"],
                               stage2_iterations=kw["iterations"], generated_weight=generated_weight,
                               contrastive_weight=contrastive_weight, tau=tau, seed=kw["seed"])
        resume, start = _resume(kw["resume_from"], model, 2, node)
        stage2_start = int(resume.metadata.get("embroidery.stage2_start", stage1_step)) if resume else stage1_step
        start = start or stage1_step
        until = stage2_start + config.stage2_iterations
        if resume is not None:
            check_resume_range(kw["resume_from"], start, until, f"iterations above {start - stage2_start}")
        images, designs = _generate(model, clip, vae, pair, lora, lines, sample_steps, cfg, config.seed)
        with torch.inference_mode(False):
            adapters = AdapterSet.from_style_lora(model.model.diffusion_model, lora, seed=config.seed)
            if resume is not None:
                adapters.load_style_lora(resume)

            generated_pairs = [AnalogyPair(img, des, s, pair.trigger) for s, img, des in zip(lines, images, designs)]

            def latents_fn(device):
                return (_encode_pair(model, clip, vae, pair, device),
                        [_encode_pair(model, clip, vae, g, device) for g in generated_pairs])

            run = lambda trainer, latents, until_, cb: run_stage2(trainer, latents[0], latents[1], until_, cb)
            trained, patched, losses = _train(cls, node, model, adapters, config, pair, latents_fn, 2, start, until,
                                              run, kw, {**_history(resume or lora),
                                                        "embroidery.stage2_start": str(stage2_start),
                                                        "embroidery.stage2_subjects": "|".join(lines),
                                                        "embroidery.stage1_run_id": _source_id(lora)})
        preview = torch.cat([side_by_side(images, height=images[0].shape[1]),
                             side_by_side(designs, height=designs[0].shape[1])], dim=1)
        return io.NodeOutput(trained, patched, losses, preview)


def _source_id(lora) -> str:
    """The identity of the stage-1 LoRA a stage-2 run starts from (part of that run's identity)."""
    return lora.metadata.get(RUN_ID_KEY) or run_identity([m.up for m in lora.modules.values()][:8], lora.metadata)


def _generate(model, clip, vae, pair, lora, subjects, steps, cfg, seed):
    """Sample one embroidery per subject with the whole stage-1 LoRA, and flatten each to a design."""
    full = apply_lora_patches(model, lora, 1.0, "Train Embroidery LoRA (Stage 2)")
    height, width = pair.embroidery.shape[1:3]
    images = [ct.sample_image(full, clip, vae, embroidery_prompt(s, pair.trigger), height, width, steps, cfg, seed + i)
              for i, s in enumerate(subjects)]
    return images, [flatten_design(img) for img in images]
