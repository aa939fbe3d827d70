"""The seed methods' trainers in the graph: the one-image LoRA recipes (B-LoRA, DiffStyler's
style LoRA, your own blocks) and Pair Customization. Each is one TrainerNode subclass over a core
method."""
from __future__ import annotations

import torch

from comfy_api.latest import io

from ..embroidery_core import keys
from ..embroidery_core.adapters import AdapterSet, PairAdapterSet, linear_targets
from ..embroidery_core.methods import LORA, LORA_RECIPES, PAIR_CUSTOMIZATION, PairConfig, pair_customization
from ..embroidery_core.pair import LATENT_MULTIPLE, training_pair
from ..embroidery_core.trainer import PairLatents, check_resume_range
from . import comfy_training as ct
from .common import CATEGORY, NodeInputError, StyleLoRAType, check_choice, resolve_blocks
from .trainer_base import TrainerNode, TrainPlan, trainer_inputs, trainer_outputs, updated_history
from .training_nodes import encode_pair, model_inputs

RECIPES = list(LORA_RECIPES)


def _recipe_values() -> str:
    return "; ".join(f"{r.name}: {r.defaults.iterations} steps, lr {r.defaults.learning_rate:g}, "
                     f"weight decay {r.defaults.weight_decay:g}" for r in LORA_RECIPES.values())


def _prompt(template: str, recipe, pair, node: str) -> str:
    """The training prompt: the node's template or the recipe's, with {trigger} and {subject}."""
    template = template.strip() or recipe.prompt
    try:
        return template.format(trigger=pair.trigger, subject=pair.subject)
    except (KeyError, IndexError, ValueError) as e:
        raise NodeInputError(node, f"cannot fill in the prompt {template!r} ({e!r}); write it with {{trigger}} and "
                                   "{subject} only, e.g. 'A {trigger}'") from None


class EmbroideryTrainLoRA(TrainerNode):
    METHOD = LORA

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EmbroideryTrainLoRA",
            display_name="Train One-Image LoRA (B-LoRA, DreamBooth)",
            category=f"{CATEGORY}/training",
            description="A LoRA learnt from the pair's embroidery with one prompt, by a published recipe: B-LoRA "
                        "(content + style blocks jointly, for B-LoRA Mix and the style-blocks loader), DiffStyler's "
                        "style LoRA on every attention layer, or your own block list.",
            inputs=[*model_inputs(),
                    io.Combo.Input("recipe", options=RECIPES, default="b_lora",
                                   tooltip="b_lora: B-LoRA's content (W4) + style (W5) blocks trained jointly on "
                                           "'A <trigger>', rank 64. dreambooth_all_attention: every attention layer, "
                                           "rank 16 (DiffStyler's style LoRA). custom: the blocks in custom_blocks."),
                    io.String.Input("custom_blocks", default="",
                                    tooltip="Used when recipe = custom: a block list, e.g. Find Style Blocks' "
                                            "style_blocks output or 'output_blocks.1.1, input_blocks.8.1'."),
                    io.String.Input("prompt", default="",
                                    tooltip="The training prompt; {trigger} and {subject} are filled in from the "
                                            "pair. Empty = the recipe's ('A {trigger}' for b_lora, "
                                            "'a {subject} in {trigger} style' otherwise)."),
                    io.Int.Input("rank", default=0, min=0, max=256,
                                 tooltip="LoRA rank; 0 = the recipe's (b_lora 64, dreambooth_all_attention 16, "
                                         "custom 32)."),
                    io.Float.Input("alpha", default=0.0, min=0.0, max=1024.0, step=0.01,
                                   tooltip="LoRA alpha; scale = alpha / rank. 0 = the rank (scale 1, as the recipes)."),
                    *trainer_inputs(0, "Training", 0.0, -1.0, 0, recipe=_recipe_values())],
            outputs=trainer_outputs(),
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, pair, recipe, custom_blocks, prompt, rank, alpha, **kw) -> io.NodeOutput:
        arch, options = cls.check(model, kw)
        node = cls.node_name()
        check_choice(recipe, RECIPES, "recipe", node)
        chosen = LORA_RECIPES[recipe]
        custom = None
        if recipe == "custom":
            if not custom_blocks.strip():
                raise NodeInputError(node, "recipe custom trains the blocks in custom_blocks, which is empty; connect "
                                           "Find Style Blocks' style_blocks or write 'output_blocks.1.1, ...'")
            custom = resolve_blocks("custom", custom_blocks, arch, node)
        content, style = chosen.blocks(arch, custom)
        text = _prompt(prompt, chosen, pair, node)
        config = chosen.config(rank, alpha, options.learning_rate, options.weight_decay, options.iterations,
                               options.seed)
        resume, start, state = cls.resume(options, model, 1)
        if resume is not None:
            check_resume_range(options.resume_from, start, config.iterations, "iterations")
        with torch.inference_mode(False):
            targets = linear_targets(model.model.diffusion_model, arch.attention_modules(content + style))
            adapters = AdapterSet(targets, style, config.rank, config.alpha, seed=config.seed)
            if resume is not None:
                adapters.load_style_lora(resume)
            device = model.load_device
            height, width = pair.embroidery.shape[1:3]
            image = ct.encode_image(vae, model, pair.embroidery, device)
            cond = ct.encode_prompt(clip, model, text, height, width, device)
            meta = {**updated_history(resume), keys.RECIPE: recipe, keys.TRAIN_PROMPT: text,
                    keys.CONTENT_BLOCKS: ",".join(content)}
            plan = TrainPlan(LORA, 1, config, pair, PairLatents(image, image, cond, cond), adapters, start,
                             config.iterations, metadata=meta, optimizer_state=state)
            lora, patched, losses = cls.train(model, options, plan)
        return io.NodeOutput(lora, patched, losses)


PAIR_DEFAULTS = PairConfig()


class EmbroideryTrainPairCustomization(TrainerNode):
    METHOD = PAIR_CUSTOMIZATION

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EmbroideryTrainPairCustomization",
            display_name="Train Pair Customization (Content + Style LoRAs)",
            category=f"{CATEGORY}/training",
            description="Pair Customization from the analogy pair (design = content image, embroidery = stylised "
                        "image): a content and a style LoRA on every attention layer with frozen orthonormal down "
                        "matrices; apply the style LoRA with Embroidery Style Guidance.",
            inputs=[*model_inputs(),
                    io.Int.Input("rank", default=PAIR_DEFAULTS.rank, min=1, max=256,
                                 tooltip="Rank of each LoRA (official: 64, alpha = rank). At most half of the "
                                         "narrowest attention input (SD1.5/SDXL: 160)."),
                    io.Int.Input("resolution", default=512, min=0, max=2048, step=LATENT_MULTIPLE,
                                 tooltip="Longer side the pair is trained at (official: 512, inference at 1024). "
                                         "0 = the pair's own size."),
                    io.Boolean.Input("flip", default=True,
                                     tooltip="Mirror both images, as the official code does to every training image."),
                    io.Int.Input("style_start", default=PAIR_DEFAULTS.style_start, min=0, max=10000,
                                 tooltip="The style step joins at this step (official: 250 of 750); before it "
                                         "only the content LoRA learns."),
                    io.Int.Input("accumulate", default=PAIR_DEFAULTS.accumulate, min=1, max=64,
                                 tooltip="Gradient accumulation: noise draws averaged per optimizer step "
                                         "(official: 4). Each draw is one more UNet pass per step."),
                    *trainer_inputs(PAIR_DEFAULTS.iterations, "Training", PAIR_DEFAULTS.learning_rate,
                                    PAIR_DEFAULTS.weight_decay, PAIR_DEFAULTS.seed)],
            outputs=[StyleLoRAType.Output(display_name="style_lora",
                                          tooltip="The style LoRA: connect it to Embroidery Style Guidance (or save it)."),
                     StyleLoRAType.Output(display_name="content_lora",
                                          tooltip="The content LoRA (the pair's subject); save it to reuse."),
                     io.LossMap.Output(display_name="loss", tooltip="Per-step content and style losses.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, pair, rank, resolution, flip, style_start, accumulate, **kw) -> io.NodeOutput:
        arch, options = cls.check(model, kw)
        node = cls.node_name()
        trained_pair = training_pair(pair, resolution, flip)  # checks the resolution before any work
        config = PairConfig(rank=rank, alpha=float(rank), learning_rate=options.learning_rate,
                            weight_decay=options.weight_decay, iterations=options.iterations, style_start=style_start,
                            accumulate=accumulate, seed=options.seed)
        resume, start, state = cls.resume(options, model, 1)
        if resume is not None:
            check_resume_range(options.resume_from, start, config.iterations, "iterations")
            if not state:
                raise NodeInputError(node, f"{options.resume_from} has no training state beside it "
                                           f"({options.resume_from}.optimizer, which holds the content LoRA); resume "
                                           "from a checkpoint of this node in loras/embroidery_checkpoints")
        with torch.inference_mode(False):
            targets = linear_targets(model.model.diffusion_model, arch.attention_modules())
            adapters = PairAdapterSet(targets, config.rank, config.alpha, config.basis_seed)
            if resume is not None:
                adapters.load_style_lora(resume)
                adapters.load_extra_state(state)
            meta = {**updated_history(resume), keys.PAIR_GROUP: "style",
                    keys.config_key("flip"): str(flip), keys.config_key("train_resolution"): str(resolution)}
            plan = TrainPlan(pair_customization(config), 1, config, trained_pair,
                             encode_pair(model, clip, vae, trained_pair, model.load_device), adapters, start,
                             config.iterations, metadata=meta, optimizer_state=state)
            style, _, losses = cls.train(model, options, plan)
            content = adapters.to_style_lora(arch.name, {**style.metadata, keys.PAIR_GROUP: "content"}, group="content")
        return io.NodeOutput(style, content, losses)


METHOD_NODES: list[type[io.ComfyNode]] = [EmbroideryTrainLoRA, EmbroideryTrainPairCustomization]
