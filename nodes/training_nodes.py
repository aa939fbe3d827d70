"""EmoLoRA inside the graph: analogy pair, style-block discovery, stage 1 and stage 2."""
from __future__ import annotations

import torch

from comfy_api.latest import io, ui

from ..embroidery_core import block_metric, keys
from ..embroidery_core.adapters import AdapterSet, linear_targets
from ..embroidery_core.blocks import preset_names
from ..embroidery_core.images import bar_chart, flatten_design, side_by_side
from ..embroidery_core.lora_file import require_fit
from ..embroidery_core.methods import EMOLORA, EmoLoRAConfig
from ..embroidery_core.pair import DEFAULT_RESOLUTION, LATENT_MULTIPLE, AnalogyPair, build_pair, embroidery_prompt
from ..embroidery_core.trainer import PairLatents, check_resume_range, resume_point, run_identity
from . import comfy_training as ct
from .common import (CATEGORY, AnalogyPairType, NodeInputError, PackNode, StyleLoRAType, apply_lora_patches,
                     check_choice, model_family, resolve_blocks, weight_shapes)
from .trainer_base import TrainerNode, TrainPlan, trainer_inputs, trainer_outputs, updated_history

SELECTIONS = ["paper preset", "measured top-k"]
DEFAULTS = EmoLoRAConfig()
DEFAULT_STAGE2_SUBJECTS = "red apple\nblue bird\nyellow flower"


def model_inputs() -> list:
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


def encode_pair(model, clip, vae, pair, device) -> PairLatents:
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
                *model_inputs(),
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
        latents = encode_pair(model, clip, vae, pair, model.load_device)
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

def _trainable_family(model, node: str):
    """model_family, with the model's noise parameterisation checked before any work is done."""
    arch = model_family(model, node)
    ct.prediction_type(model)
    return arch


def _emolora_inputs(stage: int) -> list:
    iterations = DEFAULTS.stage1_iterations if stage == 1 else DEFAULTS.stage2_iterations
    return trainer_inputs(iterations, f"Stage-{stage}", DEFAULTS.learning_rate, DEFAULTS.weight_decay, DEFAULTS.seed)


class EmbroideryTrainStage1(TrainerNode):
    METHOD = EMOLORA

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EmbroideryTrainStage1",
            display_name="Train Embroidery LoRA (Stage 1)",
            category=f"{CATEGORY}/training",
            description="EmoLoRA stage 1: each iteration a design step (whole LoRA) and an embroidery step (style "
                        "blocks only, which read the embroidery prompt), same noise and timestep.",
            inputs=[*model_inputs(),
                    io.String.Input("style_blocks", default="emolora_style",
                                    tooltip="A preset name or a block list (e.g. from Find Style Blocks)."),
                    io.Int.Input("rank", default=DEFAULTS.rank, min=1, max=256, tooltip="LoRA rank (paper: 32)."),
                    io.Float.Input("alpha", default=DEFAULTS.alpha, min=0.01, max=1024.0, step=0.01,
                                   tooltip="LoRA alpha; scale = alpha / rank (paper: 32)."),
                    *_emolora_inputs(1)],
            outputs=trainer_outputs(),
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, pair, style_blocks, rank, alpha, **kw) -> io.NodeOutput:
        arch, options = cls.check(model, kw)
        blocks = _style_blocks(style_blocks, arch, cls.node_name())
        config = EmoLoRAConfig(rank=rank, alpha=alpha, learning_rate=options.learning_rate,
                               weight_decay=options.weight_decay, stage1_iterations=options.iterations,
                               seed=options.seed)
        resume, start, state = cls.resume(options, model, 1)
        if resume is not None:
            check_resume_range(options.resume_from, start, config.stage1_iterations, "iterations")
        with torch.inference_mode(False):
            targets = linear_targets(model.model.diffusion_model, arch.attention_modules())
            adapters = AdapterSet(targets, blocks, rank, alpha, seed=config.seed)
            if resume is not None:
                adapters.load_style_lora(resume)
            plan = TrainPlan(EMOLORA, 1, config, pair, encode_pair(model, clip, vae, pair, model.load_device),
                             adapters, start, config.stage1_iterations, metadata=updated_history(resume),
                             optimizer_state=state)
            lora, patched, losses = cls.train(model, options, plan)
        return io.NodeOutput(lora, patched, losses)


class EmbroideryTrainStage2(TrainerNode):
    METHOD = EMOLORA

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EmbroideryTrainStage2",
            display_name="Train Embroidery LoRA (Stage 2)",
            category=f"{CATEGORY}/training",
            description="EmoLoRA stage 2: samples complementary pairs with the stage-1 LoRA, then trains on the "
                        "reference plus one generated pair per iteration with the contrastive loss.",
            inputs=[*model_inputs(),
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
                    *_emolora_inputs(2)],
            outputs=trainer_outputs() + [io.Image.Output(display_name="generated",
                                                         tooltip="Generated embroideries above their designs.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, pair, lora, subjects, generated_weight, contrastive_weight, tau,
                sample_steps, cfg, **kw) -> io.NodeOutput:
        arch, options = cls.check(model, kw)
        node = cls.node_name()
        lines = [s.strip() for s in subjects.splitlines() if s.strip()]
        if not lines:
            raise NodeInputError(node, "subjects is empty; write one subject per line, e.g. 'red apple'")
        stage, stage1_step = resume_point(lora, EMOLORA)
        if lora.arch != arch.name:
            raise NodeInputError(node, f"the connected stage-1 LoRA was trained on {lora.arch}, the model is "
                                       f"{arch.name}; connect the model the stage-1 LoRA was trained on")
        require_fit(lora, weight_shapes(model), arch.name, "the connected stage-1 LoRA")
        if stage != 1:
            raise NodeInputError(node, f"the connected LoRA is from stage {stage}; connect the stage-1 LoRA "
                                       "(to continue stage 2, use resume_from)")
        config = EmoLoRAConfig(rank=lora.rank, learning_rate=options.learning_rate, weight_decay=options.weight_decay,
                               stage2_iterations=options.iterations, generated_weight=generated_weight,
                               contrastive_weight=contrastive_weight, tau=tau, seed=options.seed)
        resume, start, state = cls.resume(options, model, 2)
        stage2_start = int(resume.metadata.get(keys.STAGE2_START, stage1_step)) if resume else stage1_step
        start = start or stage1_step
        until = stage2_start + config.stage2_iterations
        if resume is not None:
            check_resume_range(options.resume_from, start, until, f"iterations above {start - stage2_start}")
        images, designs = _generate(model, clip, vae, pair, lora, lines, sample_steps, cfg, config.seed)
        with torch.inference_mode(False):
            adapters = AdapterSet.from_style_lora(model.model.diffusion_model, lora, seed=config.seed)
            if resume is not None:
                adapters.load_style_lora(resume)
            generated = [encode_pair(model, clip, vae, AnalogyPair(img, des, s, pair.trigger), model.load_device)
                         for s, img, des in zip(lines, images, designs)]
            meta = {**updated_history(resume or lora), keys.STAGE2_START: str(stage2_start),
                    keys.STAGE2_SUBJECTS: "|".join(lines), keys.STAGE1_RUN_ID: _source_id(lora)}
            # stage 2 continues stage 1's AdamW (moments and step counts) as the official code does;
            # a resumed stage 2 its own checkpoint's
            state = state if resume is not None else lora.optimizer_state
            plan = TrainPlan(EMOLORA, 2, config, pair, encode_pair(model, clip, vae, pair, model.load_device),
                             adapters, start, until, generated, meta, optimizer_state=state)
            trained, patched, losses = cls.train(model, options, plan)
        preview = torch.cat([side_by_side(images, height=images[0].shape[1]),
                             side_by_side(designs, height=designs[0].shape[1])], dim=1)
        return io.NodeOutput(trained, patched, losses, preview)


def _source_id(lora) -> str:
    """The identity of the stage-1 LoRA a stage-2 run starts from (part of that run's identity)."""
    return lora.metadata.get(keys.RUN_ID) or run_identity([m.up for m in lora.modules.values()][:8], lora.metadata)


def _generate(model, clip, vae, pair, lora, subjects, steps, cfg, seed):
    """Sample one embroidery per subject with the whole stage-1 LoRA, and flatten each to a design."""
    full = apply_lora_patches(model, lora, 1.0, "Train Embroidery LoRA (Stage 2)")
    height, width = pair.embroidery.shape[1:3]
    images = [ct.sample_image(full, clip, vae, embroidery_prompt(s, pair.trigger), height, width, steps, cfg, seed + i)
              for i, s in enumerate(subjects)]
    return images, [flatten_design(img) for img in images]
