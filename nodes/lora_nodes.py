"""Loading, saving and inspecting block-restricted LoRAs."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io, ui

from ..embroidery_core.files import safe_relative_name
from ..embroidery_core.images import bar_chart
from ..embroidery_core.lora_file import save_lora
from ..embroidery_core.report import block_report
from .common import (BLOCK_PRESETS, CATEGORY, NodeInputError, PackNode, StyleLoRAType, apply_lora_patches,
                     load_lora_file, lora_blocks, lora_fingerprint, parse_block_strengths)


class EmbroideryStyleBlocksLoader(PackNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EmbroideryStyleBlocksLoader",
            display_name="Load Style Blocks of a LoRA",
            category=f"{CATEGORY}/loaders",
            description="Applies only the chosen UNet blocks of a LoRA (kohya, diffusers/PEFT, B-LoRA or "
                        "ComfyUI-trained file) to a model, e.g. the style blocks of an EmoLoRA or B-LoRA.",
            inputs=[
                io.Model.Input("model", tooltip="The model to apply the LoRA to. It is cloned; the input stays untouched."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A .safetensors LoRA from your loras folder."),
                io.Combo.Input("blocks", options=BLOCK_PRESETS, default="emolora_style",
                               tooltip="Which blocks to load. emolora_style: EmoLoRA's four stitch blocks; "
                                       "blora_style / blora_content: B-LoRA's style (W5) or content (W4) block; "
                                       "instantstyle_layout: the layout block; all_attention: every block; "
                                       "custom: the list below. SD1.5 uses the analogous blocks (see README)."),
                io.String.Input("custom_blocks", default="", multiline=False,
                                tooltip="Used when blocks = custom: block names separated by commas, in any spelling, "
                                        "e.g. 'output_blocks.1.1, up_blocks.0.attentions.2'."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength of the loaded blocks (1 = as trained)."),
                io.String.Input("block_strengths", default="", optional=True,
                                tooltip="Optional per-block strengths that override 'strength', "
                                        "e.g. 'output_blocks.1.1=0.8, input_blocks.5.1=1.2'."),
                io.Boolean.Input("alpha_squared", default=False, optional=True,
                                 tooltip="B-LoRA convention: their scale s multiplies both LoRA matrices, i.e. s*s. "
                                         "Turn on to reproduce B-LoRA's published strengths."),
            ],
            outputs=[io.Model.Output(tooltip="The model with only the chosen blocks of the LoRA applied.")],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name, **kwargs):
        return lora_fingerprint(lora_name)

    @classmethod
    def execute(cls, model, lora_name, blocks, custom_blocks, strength,
                block_strengths="", alpha_squared=False) -> io.NodeOutput:
        node = "Load Style Blocks of a LoRA"
        chosen, selected = lora_blocks(model, lora_name, blocks, custom_blocks, node)
        overrides = parse_block_strengths(block_strengths or "", node, loaded=chosen)
        selected = selected.scaled({**{b: strength for b in chosen}, **overrides}, default=strength,
                                   alpha_squared=alpha_squared)
        return io.NodeOutput(apply_lora_patches(model, selected, 1.0, node))


def _next_free_path(folder: str, prefix: str) -> str:
    """``<prefix>_00001.safetensors`` with the first unused counter (never overwrites)."""
    base = os.path.join(folder, prefix)
    os.makedirs(os.path.dirname(base), exist_ok=True)
    counter = 1
    while os.path.exists(f"{base}_{counter:05}.safetensors"):
        counter += 1
    return f"{base}_{counter:05}.safetensors"


class EmbroiderySaveStyleLoRA(PackNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EmbroiderySaveStyleLoRA",
            display_name="Save Style LoRA",
            category=f"{CATEGORY}/loaders",
            description="Writes a trained LoRA into your first loras folder (kohya layout, settings in metadata), "
                        "so LoraLoader and the style-blocks loader list it at once.",
            inputs=[
                StyleLoRAType.Input("lora", tooltip="The trained LoRA from an Embroidery trainer."),
                io.String.Input("filename_prefix", default="embroidery/emolora",
                                tooltip="File name inside the loras folder; may contain subfolders, not '..', "
                                        "drive letters or < > : \" | ? *. "
                                        "A counter is appended, existing files are never overwritten."),
                io.Boolean.Input("style_blocks_only", default=False,
                                 tooltip="Save only the style blocks (smaller file, what inference uses). "
                                         "Off keeps the whole LoRA so training can resume from it."),
            ],
            outputs=[io.String.Output(display_name="lora_name",
                                      tooltip="The saved file's name as the LoRA loaders list it.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora, filename_prefix, style_blocks_only) -> io.NodeOutput:
        node = "Save Style LoRA"
        try:
            prefix = safe_relative_name(filename_prefix)
        except ValueError as e:
            raise NodeInputError(node, f"filename_prefix: {e}; it must be a relative name inside the loras folder "
                                       "that every OS accepts, like 'embroidery/my_style'") from None
        if style_blocks_only:
            blocks = lora.style_blocks
            if not blocks:
                raise NodeInputError(node, "this LoRA does not record its style blocks; turn style_blocks_only off")
            lora = lora.filter_blocks(blocks)
        folder = folder_paths.get_folder_paths("loras")[0]
        path = _next_free_path(folder, prefix)
        save_lora(lora, path)
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            raise NodeInputError(node, f"nothing was written to {path}; check free disk space and permissions")
        folder_paths.filename_list_cache.pop("loras", None)  # list the new file without a restart
        name = os.path.relpath(path, folder).replace(os.sep, "/")
        return io.NodeOutput(name, ui=ui.PreviewText(f"saved {name}"))


class EmbroideryLoRABlockInspector(PackNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EmbroideryLoRABlockInspector",
            display_name="Inspect LoRA Blocks",
            category=f"{CATEGORY}/loaders",
            description="Shows which UNet blocks a LoRA touches and how strongly (norm of each block's update).",
            inputs=[
                io.Combo.Input("lora_name", options=["(from input)"] + folder_paths.get_filename_list("loras"),
                               tooltip="A LoRA file to inspect, or '(from input)' to inspect the connected LoRA."),
                io.Combo.Input("family", options=["auto", "sdxl", "sd15"], default="auto",
                               tooltip="Model family of the file; auto reads the metadata or guesses from shapes."),
                StyleLoRAType.Input("lora", optional=True, tooltip="An in-memory LoRA from a trainer."),
            ],
            outputs=[io.String.Output(display_name="report", tooltip="One line per block: names, modules, rank, norm."),
                     io.Image.Output(display_name="chart", tooltip="Bar chart of the per-block norms.")],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name, **kwargs):
        return lora_fingerprint(lora_name)

    @classmethod
    def execute(cls, lora_name, family, lora=None) -> io.NodeOutput:
        node = "Inspect LoRA Blocks"
        if family not in ("auto", "sdxl", "sd15"):
            raise NodeInputError(node, f"unknown family {family!r}; choose auto, sdxl or sd15")
        if lora is None:
            if lora_name == "(from input)":
                raise NodeInputError(node, "connect a LoRA to the 'lora' input or pick a file in lora_name")
            lora = load_lora_file(lora_name, None if family == "auto" else family, node)
        style = lora.style_blocks
        labels, values, text = block_report(lora, highlight=style)
        title = f"{lora_name if lora_name != '(from input)' else 'trained LoRA'}: update norm per block"
        chart = bar_chart(labels, values, title=title, highlight=set(style))
        return io.NodeOutput(text, chart, ui=ui.PreviewText(text))
