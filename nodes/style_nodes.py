"""Applying a trained style: colour fix, style guidance, masked (regional) styles and the B-LoRA mix.

The math lives in embroidery_core.guidance / .masks / .images; this module converts ComfyUI objects
in and out and attaches patches to clones only.
"""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..embroidery_core.guidance import (StyleGate, check_wrapper_shapes, check_window, copy_conds,
                                        gated_weight_wrappers, in_window, mix_block_loras,
                                        style_delta_in_denoised_space)
from ..embroidery_core.images import colour_fix
from ..embroidery_core.lora_file import StyleLoRA, require_fit, to_kohya_state_dict
from ..embroidery_core.masks import partition_masks
from .common import (BLOCK_PRESETS, CATEGORY, NodeInputError, PackNode, StyleLoRAType, apply_lora_patches,
                     connected_lora_blocks, load_model_lora, lora_blocks, lora_fingerprint, lora_path, model_family,
                     resolve_blocks, weight_shapes)

NONE = "(none)"
MAX_REGIONS = 3
DEFAULT_STYLE_WEIGHT = 4.0  # Pair Customization's w_s (3 if the style overfits)
BLOCKS_TOOLTIP = ("Which blocks of the LoRA carry the style. emolora_style: EmoLoRA's four stitch blocks; "
                  "blora_style: B-LoRA's style block (W5); all_attention: every block (Pair Customization, "
                  "DiffStyler); custom: the list in custom_blocks.")
CUSTOM_BLOCKS_TOOLTIP = ("Used when blocks = custom: block names separated by commas, in any spelling, "
                         "e.g. 'output_blocks.1.1, up_blocks.0.attentions.2'.")


def _lora_names() -> list[str]:
    return folder_paths.get_filename_list("loras")


def _file_or_connected() -> list[str]:
    """A LoRA file combo that may also be left at (none) when a trainer's LoRA is connected."""
    return [NONE] + _lora_names()


def _chosen_lora(model, name: str, connected, preset: str, custom: str, node: str, what: str) -> StyleLoRA:
    """The chosen blocks of the connected LoRA, or else of the file ``name``."""
    if connected is not None:
        return connected_lora_blocks(model, connected, preset, custom, node)
    if name == NONE:
        raise NodeInputError(node, f"{what} is {NONE} and no LoRA is connected to its socket; pick a file, or connect "
                                   "a trainer's LoRA")
    return _style_lora(model, name, preset, custom, node)


def _style_lora(model, lora_name: str, blocks: str, custom_blocks: str, node: str) -> StyleLoRA:
    """The chosen blocks of a LoRA file, for this model's family; an error if it has none there."""
    return lora_blocks(model, lora_name, blocks, custom_blocks, node)[1]


# ---------------------------------------------------------------------------- colour fix


class EmbroideryColourFix(PackNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EmbroideryColourFix",
            display_name="Embroidery Colour Fix",
            category=f"{CATEGORY}/image",
            description="EmoLoRA's colour fix for flat stitches: keeps the generated picture's lightness "
                        "(stitches, shading, thread relief) and takes the colours from the design (LAB a/b).",
            inputs=[
                io.Image.Input("image", tooltip="The generated embroidery (the decoded sampler output)."),
                io.Image.Input("design", tooltip="The design whose colours should be kept. Resized to the image; "
                                                 "a single design is used for the whole batch."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1 = the design's colours, 0 = the image unchanged. Use 0 for beads and "
                                       "sequins, whose colours come from the light rather than the design."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Fix the colours only where the mask is white (e.g. the embroidered subject)."),
            ],
            outputs=[io.Image.Output(tooltip="The image with the design's colours.")],
        )

    @classmethod
    def execute(cls, image, design, strength, mask=None) -> io.NodeOutput:
        return io.NodeOutput(colour_fix(image, design, float(strength), mask))


# ---------------------------------------------------------------------------- style guidance


class StyleGuidancePass:
    """A ``sampler_post_cfg_function``: one extra pass of the positive prompt with the style LoRA
    switched on, added as ``weight * (style - cond)`` to the CFG result (Pair Customization)."""

    def __init__(self, gate: StyleGate, weight: float, start_percent: float, end_percent: float):
        self.gate, self.weight = gate, weight
        self.start_percent, self.end_percent = start_percent, end_percent

    def __call__(self, args: dict):
        import comfy.samplers

        denoised, model, sigma = args["denoised"], args["model"], args["sigma"]
        if not in_window(sigma, self.start_percent, self.end_percent, model.model_sampling.percent_to_sigma):
            return denoised
        conds = copy_conds(args["cond"])
        with self.gate.active():
            (style,) = comfy.samplers.calc_cond_batch(model, [conds], args["input"], sigma, args["model_options"])
        return denoised + style_delta_in_denoised_space(args["cond_denoised"], style, self.weight)


def attach_style_guidance(model, lora: StyleLoRA, weight: float, lora_strength: float,
                          start_percent: float, end_percent: float):
    """A clone of ``model`` whose style LoRA sits in weight wrappers that are off except inside the
    guidance pass. Several calls stack: each style has its own gate and its own guidance term.
    While off, a wrapper still makes ComfyUI copy that weight on each forward (its cast path): a
    small cost on the style blocks in every pass, in exchange for switching per pass."""
    gate = StyleGate()
    wrappers = gated_weight_wrappers(lora, lora_strength, gate)
    shapes = {k: tuple(v.shape) for k, v in model.model.diffusion_model.state_dict().items()}
    check_wrapper_shapes(wrappers, shapes)
    patched = model.clone()
    for key, wrapper in wrappers.items():
        patched.add_weight_wrapper(f"diffusion_model.{key}", wrapper)
    patched.set_model_sampler_post_cfg_function(StyleGuidancePass(gate, weight, start_percent, end_percent))
    return patched


class EmbroideryStyleGuidance(PackNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EmbroideryStyleGuidance",
            display_name="Embroidery Style Guidance",
            category=f"{CATEGORY}/sampling",
            description="Pair Customization's style guidance for any sampler: each step runs the positive prompt "
                        "once more with the style LoRA and adds weight x (styled - plain) to the CFG result, so the "
                        "base model keeps the layout and the LoRA adds only the style. For several styles, chain "
                        "this node once per style (each adds its own term). Costs one extra model pass per step.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with (usually the checkpoint without the style "
                                                "LoRA). It is cloned; the input stays untouched."),
                io.Combo.Input("lora_name", options=_file_or_connected(),
                               tooltip=f"The style LoRA (.safetensors); {NONE} when a LoRA is connected to 'lora'."),
                io.Combo.Input("blocks", options=BLOCK_PRESETS, default="emolora_style", tooltip=BLOCKS_TOOLTIP),
                io.String.Input("custom_blocks", default="", tooltip=CUSTOM_BLOCKS_TOOLTIP),
                io.Float.Input("weight", default=DEFAULT_STYLE_WEIGHT, min=0.0, max=20.0, step=0.1,
                               tooltip="Style guidance scale w_s: 0 = off (the model is returned unchanged), "
                                       "4 = the paper's default, 3 if the style overfits the picture."),
                io.Float.Input("lora_strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength of the LoRA inside the styled pass (1 = as trained)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Guide from this point of the schedule on (0 = first step), as in "
                                       "ControlNet. The paper's 'only while t <= 800' fallback is 0.2."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Stop guiding at this point of the schedule (1 = last step)."),
                StyleLoRAType.Input("lora", optional=True,
                                    tooltip="A LoRA straight from a trainer node (e.g. Pair Customization's "
                                            "style_lora): when connected it is used instead of lora_name."),
            ],
            outputs=[io.Model.Output(tooltip="The model with style guidance; connect it to any sampler.")],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name, **kwargs):
        return lora_fingerprint(lora_name) if lora_name != NONE else NONE

    @classmethod
    def execute(cls, model, lora_name, blocks, custom_blocks, weight, lora_strength,
                start_percent, end_percent, lora=None) -> io.NodeOutput:
        node = "Embroidery Style Guidance"
        check_window(start_percent, end_percent)
        if weight == 0.0 or start_percent == end_percent:
            return io.NodeOutput(model)  # no extra pass at all: sampling is bit-identical to the plain model
        lora = _chosen_lora(model, lora_name, lora, blocks, custom_blocks, node, "lora_name")
        return io.NodeOutput(attach_style_guidance(model, lora, weight, lora_strength, start_percent, end_percent))


# ---------------------------------------------------------------------------- masked styles


def _region_inputs(i: int) -> list:
    first = i == 1
    where = "Region 1" if first else f"Optional region {i}"
    lora = (io.Combo.Input(f"lora_{i}", options=_lora_names(), tooltip=f"{where}: the style LoRA used inside mask_{i}.")
            if first else
            io.Combo.Input(f"lora_{i}", options=[NONE] + _lora_names(), default=NONE, optional=True,
                           tooltip=f"{where}: the style LoRA used inside mask_{i}; {NONE} = region not used."))
    return [
        lora,
        io.Float.Input(f"strength_{i}", default=1.0, min=-10.0, max=10.0, step=0.01,
                       tooltip=f"LoRA strength inside mask_{i} (0 = the base model there too).", optional=not first),
        io.Mask.Input(f"mask_{i}", optional=not first,
                      tooltip=f"Where the style of lora_{i} applies (white). Same size as the other masks."),
    ]


def lora_hook(model, lora: StyleLoRA, strength: float, node: str):
    """A ComfyUI hook group that applies ``lora`` while the conds carrying it are evaluated."""
    import comfy.hooks
    import comfy.lora

    state = to_kohya_state_dict(lora)
    patches = comfy.lora.load_lora(state, comfy.lora.model_lora_keys_unet(model.model, {}), log_missing=False)
    if len(patches) != len(lora.modules):
        raise NodeInputError(node, f"only {len(patches)} of {len(lora.modules)} LoRA modules match this model's "
                                   "weights; is the LoRA for another model family?")
    return comfy.hooks.create_hook_lora(state, strength_model=strength, strength_clip=0.0)


def masked_conditioning(conditioning, regions, base_mask):
    """The conditioning once per region (its mask and hook) plus once for the base (remainder mask)."""
    import comfy.hooks

    parts = [] if base_mask is None else [(None, base_mask)]
    out = []
    for hooks, mask in parts + list(regions):
        (masked,) = comfy.hooks.set_conds_props([conditioning], 1.0, "default", mask=mask, hooks=hooks)
        out += masked
    return out


def _active_regions(regions: dict, node: str) -> list[tuple[int, str, float, object]]:
    """``[(index, lora_name, strength, mask)]`` of the regions in use; half-filled ones are errors."""
    active = []
    for i in range(1, MAX_REGIONS + 1):
        lora_name, mask = regions.get(f"lora_{i}", NONE), regions.get(f"mask_{i}")
        if lora_name in (None, NONE) and mask is None:
            continue
        if lora_name in (None, NONE):
            raise NodeInputError(node, f"mask_{i} is connected but lora_{i} is {NONE}; pick a LoRA or "
                                       f"disconnect the mask")
        lora_path(lora_name, node)  # a name from an old workflow: say so now, even at strength 0
        if mask is None:
            raise NodeInputError(node, f"lora_{i} is set but mask_{i} is not connected; connect a mask or set "
                                       f"lora_{i} to {NONE}")
        active.append((i, lora_name, float(regions.get(f"strength_{i}", 1.0)), mask))
    if not active:
        raise NodeInputError(node, "no region is set; pick lora_1 and connect mask_1")
    return active


class EmbroideryMaskedStyle(PackNode):
    @classmethod
    def define_schema(cls):
        regions = [x for i in range(1, MAX_REGIONS + 1) for x in _region_inputs(i)]
        return io.Schema(
            node_id="EmbroideryMaskedStyle",
            display_name="Embroidery Masked Style",
            category=f"{CATEGORY}/conditioning",
            description="DiffStyler-style regions: up to three style LoRAs, each only inside its mask; the rest of "
                        "the picture comes from the base model. Overlaps are shared; uncovered parts go to the base "
                        "model automatically. Feed both outputs to the sampler (one extra pass per region).",
            inputs=[
                io.Model.Input("model", tooltip="The model you sample with. Read only: it picks the family's blocks "
                                                "and checks each LoRA fits."),
                io.Conditioning.Input("positive", tooltip="The positive prompt."),
                io.Conditioning.Input("negative", tooltip="The negative prompt. It gets the same regions, so CFG "
                                                          "inside a region works as with the LoRA loaded."),
                io.Combo.Input("blocks", options=BLOCK_PRESETS, default="emolora_style", tooltip=BLOCKS_TOOLTIP),
                io.String.Input("custom_blocks", default="", tooltip=CUSTOM_BLOCKS_TOOLTIP),
                *regions,
            ],
            outputs=[io.Conditioning.Output(display_name="positive", tooltip="Positive prompt with the regions."),
                     io.Conditioning.Output(display_name="negative", tooltip="Negative prompt with the regions.")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return tuple(lora_fingerprint(kwargs.get(f"lora_{i}")) for i in range(1, MAX_REGIONS + 1)
                     if kwargs.get(f"lora_{i}") not in (None, NONE))

    @classmethod
    def execute(cls, model, positive, negative, blocks, custom_blocks, **regions) -> io.NodeOutput:
        node = "Embroidery Masked Style"
        active = _active_regions(regions, node)
        for name, conditioning in (("positive", positive), ("negative", negative)):
            if any("mask" in c[1] for c in conditioning):
                raise NodeInputError(node, f"the {name} conditioning already has a mask; connect the prompt "
                                           "before any Conditioning (Set Mask) node")
        region_masks, base_mask = partition_masks([r[3] for r in active], [f"mask_{r[0]}" for r in active])
        # every region's file is checked against the model first, even one at strength 0
        loras = [_style_lora(model, lora_name, blocks, custom_blocks, node) for _, lora_name, _, _ in active]
        hooked = [(lora_hook(model, lora, strength, node) if strength != 0.0 else None, mask)
                  for (_, _, strength, _), lora, mask in zip(active, loras, region_masks)]
        return io.NodeOutput(masked_conditioning(positive, hooked, base_mask),
                             masked_conditioning(negative, hooked, base_mask))


# ---------------------------------------------------------------------------- B-LoRA mix


class EmbroideryBLoRAMix(PackNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EmbroideryBLoRAMix",
            display_name="B-LoRA Mix (Content + Style)",
            category=f"{CATEGORY}/loaders",
            description="B-LoRA: the content block of one LoRA with the style block of another (e.g. your subject "
                        "in the embroidery's stitches), applied together to one model.",
            inputs=[
                io.Model.Input("model", tooltip="The model to apply both to. It is cloned; the input stays untouched."),
                io.Combo.Input("content_lora", options=_file_or_connected(),
                               tooltip=f"The LoRA whose content (subject, layout) you want; {NONE} when one is "
                                       "connected to 'content'."),
                io.Combo.Input("content_blocks", options=BLOCK_PRESETS, default="blora_content",
                               tooltip="Blocks taken from content_lora (B-LoRA: blora_content, W4)."),
                io.Float.Input("content_strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength of the content blocks (0 = leave them out)."),
                io.Combo.Input("style_lora", options=_file_or_connected(),
                               tooltip=f"The LoRA whose style (stitches, texture) you want; {NONE} when one is "
                                       "connected to 'style'."),
                io.Combo.Input("style_blocks", options=BLOCK_PRESETS, default="blora_style",
                               tooltip="Blocks taken from style_lora (B-LoRA: blora_style, W5). Must not overlap "
                                       "the content blocks."),
                io.Float.Input("style_strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength of the style blocks (0 = leave them out)."),
                io.Boolean.Input("alpha_squared", default=False,
                                 tooltip="B-LoRA convention: their scale s multiplies both LoRA matrices, i.e. s*s. "
                                         "Turn on to reproduce B-LoRA's published strengths."),
                io.String.Input("content_custom_blocks", default="", optional=True,
                                tooltip="Used when content_blocks = custom. " + CUSTOM_BLOCKS_TOOLTIP),
                io.String.Input("style_custom_blocks", default="", optional=True,
                                tooltip="Used when style_blocks = custom. " + CUSTOM_BLOCKS_TOOLTIP),
                StyleLoRAType.Input("content", optional=True,
                                    tooltip="A LoRA straight from a trainer (e.g. Train One-Image LoRA, b_lora), used "
                                            "instead of content_lora when connected."),
                StyleLoRAType.Input("style", optional=True,
                                    tooltip="A LoRA straight from a trainer, used instead of style_lora when connected."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the content and style blocks applied.")],
        )

    @classmethod
    def fingerprint_inputs(cls, content_lora, style_lora, **kwargs):
        return tuple(lora_fingerprint(name) if name != NONE else NONE for name in (content_lora, style_lora))

    @classmethod
    def execute(cls, model, content_lora, content_blocks, content_strength, style_lora, style_blocks,
                style_strength, alpha_squared, content_custom_blocks="", style_custom_blocks="", content=None,
                style=None) -> io.NodeOutput:
        node = "B-LoRA Mix (Content + Style)"
        arch = model_family(model, node)
        blocks = (resolve_blocks(content_blocks, content_custom_blocks or "", arch, node),
                  resolve_blocks(style_blocks, style_custom_blocks or "", arch, node))
        parts = [(_whole_lora(model, content_lora, content, node, "content_lora"), blocks[0], content_strength),
                 (_whole_lora(model, style_lora, style, node, "style_lora"), blocks[1], style_strength)]
        mixed = mix_block_loras(parts, alpha_squared, names=("content", "style"))
        if not mixed.modules:
            return io.NodeOutput(model)  # both strengths 0
        return io.NodeOutput(apply_lora_patches(model, mixed, 1.0, node))


def _whole_lora(model, name: str, connected, node: str, what: str) -> StyleLoRA:
    """The connected LoRA or the file ``name``, checked against ``model``, all its blocks."""
    if connected is not None:
        arch = model_family(model, node)
        return require_fit(connected, weight_shapes(model), arch.name, what=f"the LoRA connected for {what}")
    if name == NONE:
        raise NodeInputError(node, f"{what} is {NONE} and no LoRA is connected to its socket; pick a file, or connect "
                                   "a trainer's LoRA")
    return load_model_lora(name, model, node)


STYLE_NODES: list[type[io.ComfyNode]] = [
    EmbroideryColourFix,
    EmbroideryStyleGuidance,
    EmbroideryMaskedStyle,
    EmbroideryBLoRAMix,
]
