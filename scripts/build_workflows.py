#!/usr/bin/env python3
"""Write the UI-format templates in workflows/ from the specs below, and their thumbnails.

Widget order is taken from a real server's /object_info, stored per ComfyUI version in
tests/data/object_info_<version>.json so CI can validate without ComfyUI. The templates are
built for the oldest supported version (tests/workflow_format.MIN_VERSION):

    COMFYUI_PATH=/path/to/ComfyUI-0.3.64 python scripts/build_workflows.py     # refresh its snapshot + write
    COMFYUI_PATH=/path/to/ComfyUI-0.8.0 python scripts/build_workflows.py      # record that version's snapshot
    python scripts/build_workflows.py --offline                                # from the stored snapshot
    python scripts/build_workflows.py --offline --check                        # exit 1 if files differ

Each template's thumbnail, ``workflows/<name>.jpg`` (what both frontends show on the template
card), is made from docs/workflows/<name>.png, the screenshot of the template's real run in the
frontend that the UI integration test writes with EMBROIDERY_SCREENSHOTS=docs/workflows; so a
fresh screenshot means a fresh thumbnail on the next build, and --check fails on a stale one.

Model file names are the common public ones (README, "Workflows"); tests map them to tiny models.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.workflow_format import (MIN_VERSION, Node, Note, build, load_snapshot, snapshot_path,  # noqa: E402
                                   validate)

SDXL_CKPT = "sd_xl_base_1.0.safetensors"
SDXL_CANNY = "controlnet-canny-sdxl-1.0.safetensors"
SDXL_TILE = "controlnet-tile-sdxl-1.0.safetensors"
REFERENCE = "example.png"
NEGATIVE = "lowres, bad anatomy, cropped, worst quality, low quality"


def _checkpoint(i, pos, name=SDXL_CKPT):
    return Node(i, "CheckpointLoaderSimple", pos, {"ckpt_name": name})


def _sampler_chain(first, model, clip, vae, prompt, size, pos, prefix):
    """CLIPTextEncode x2 -> EmptyLatentImage -> KSampler (paper: 30 steps, CFG 7, Euler a) -> decode -> save."""
    x, y = pos
    return [
        Node(first, "CLIPTextEncode", (x, y), {"text": prompt}, {"clip": clip}, title="Prompt"),
        Node(first + 1, "CLIPTextEncode", (x, y + 220), {"text": NEGATIVE}, {"clip": clip}, title="Negative"),
        Node(first + 2, "EmptyLatentImage", (x, y + 440), {"width": size, "height": size, "batch_size": 1}),
        Node(first + 3, "KSampler", (x + 380, y),
             {"seed": 42, "steps": 30, "cfg": 7.0, "sampler_name": "euler_ancestral", "scheduler": "normal",
              "denoise": 1.0},
             {"model": model, "positive": (first, 0), "negative": (first + 1, 0), "latent_image": (first + 2, 0)}),
        Node(first + 4, "VAEDecode", (x + 760, y), {}, {"samples": (first + 3, 0), "vae": vae}),
        Node(first + 5, "SaveImage", (x + 1000, y), {"filename_prefix": prefix}, {"images": (first + 4, 0)}),
    ]


TRAIN_NOTE = """EmoLoRA: one embroidery photo -> a style LoRA

1. Load an SDXL checkpoint (SD1.5 works too: set resolution 512).
2. Load ONE photo of an embroidery in 'Your embroidery photo'.
3. Analogy Pair: describe what it shows (subject) and pick a trigger word.
   No design? The node flattens the photo. Better designs: run the template
   embroidery_design_from_photo and connect its output to 'design'.
4. Find Style Blocks shows which blocks see the stitches; 'paper preset'
   returns EmoLoRA's four blocks.
5. Stage 1 (400 it) and Stage 2 (200 it) train; Save writes loras/embroidery/.
6. The sampler at the right uses the trained style blocks: prompt
   '<subject> in <trigger> style'.
Checkpoints go to loras/embroidery_checkpoints every 100 steps, one file per
run (<trigger>_stage1_<run id>); pick one in 'resume_from' to continue after
a crash or Cancel."""


def train_one_shot():
    trainer = {"learning_rate": 1e-4, "weight_decay": 1e-2, "seed": 42, "precision": "auto",
               "memory_preset": "balanced", "checkpoint_every": 100, "preview_every": 25}
    models = {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "pair": (3, 0)}
    nodes = [
        _checkpoint(1, (0, 0)),
        Node(2, "LoadImage", (0, 260), {"image": REFERENCE}, title="Your embroidery photo"),
        Node(3, "EmbroideryAnalogyPair", (380, 260),
             {"subject": "flower", "trigger": "emb", "resolution": 1024, "colours": 8}, {"reference": (2, 0)}),
        Node(4, "EmbroideryFindStyleBlocks", (760, 0), {"selection": "paper preset", "top_k": 4, "timesteps": 10},
             models),
        Node(5, "EmbroideryTrainStage1", (1140, 0), {"rank": 32, "alpha": 32.0, "iterations": 400, **trainer},
             {**models, "style_blocks": (4, 0)}),
        Node(6, "EmbroideryTrainStage2", (1520, 0),
             {"subjects": "red apple\nblue bird\nyellow flower", "iterations": 200, "sample_steps": 30, "cfg": 7.0,
              **trainer}, {**models, "lora": (5, 0)}),
        Node(7, "EmbroiderySaveStyleLoRA", (1900, 0), {"filename_prefix": "embroidery/emolora",
                                                       "style_blocks_only": False}, {"lora": (6, 0)}),
        Node(8, "LossGraphNode", (1900, 200), {"filename_prefix": "embroidery_loss"}, {"loss": (6, 2)}),
        Node(9, "PreviewImage", (380, 700), {}, {"images": (3, 1)}, title="Pair preview"),
        Node(10, "PreviewImage", (760, 560), {}, {"images": (4, 2)}, title="Block ranking"),
        Node(11, "PreviewImage", (1520, 700), {}, {"images": (6, 3)}, title="Generated pairs"),
    ]
    nodes += _sampler_chain(12, (6, 1), (1, 1), (1, 2), "a cat in emb style", 1024, (2300, 0),
                            "embroidery/emolora_sample")
    return build(nodes, [Note(TRAIN_NOTE, (0, 620), (360, 420))], INFO)


DESIGN_NOTE = """The paper's generative route from an embroidery photo to its flat design

The photo is resized to ~1 megapixel, then img2img towards a flat vector look:
- canny edges at ControlNet strength 0.2 keep the outlines,
- a blurred copy (radius 7 = kernel 15) at tile strength 0.8 keeps the colours,
- 'embroidery' and stitch words are in the negative prompt.
(The paper used SD3-medium with InstantX ControlNets; any SDXL canny and
tile ControlNet works here.)
The design feeds 'design' of Embroidery Analogy Pair, whose preview shows the pair.
Save the pair node's output or connect this graph in front of the training template."""


def design_from_photo():
    nodes = [
        _checkpoint(1, (0, 0)),
        Node(2, "LoadImage", (0, 260), {"image": REFERENCE}, title="Your embroidery photo"),
        Node(3, "ImageScaleToTotalPixels", (380, 260), {"upscale_method": "lanczos", "megapixels": 1.0},
             {"image": (2, 0)}),
        Node(4, "Canny", (760, 260), {"low_threshold": 0.4, "high_threshold": 0.8}, {"image": (3, 0)}),
        Node(5, "ImageBlur", (760, 460), {"blur_radius": 7, "sigma": 3.0}, {"image": (3, 0)}),
        Node(6, "ControlNetLoader", (380, 560), {"control_net_name": SDXL_CANNY}),
        Node(7, "ControlNetLoader", (380, 700), {"control_net_name": SDXL_TILE}),
        Node(8, "CLIPTextEncode", (380, 0),
             {"text": "flat vector design, clean lines, uniform colour blocks, simple shapes, plain background"},
             {"clip": (1, 1)}, title="Design prompt"),
        Node(9, "CLIPTextEncode", (760, 0),
             {"text": "embroidery, stitches, thread, fabric texture, photo, shading, 3d, " + NEGATIVE},
             {"clip": (1, 1)}, title="Negative (embroidery)"),
        Node(10, "ControlNetApplyAdvanced", (1140, 0), {"strength": 0.2, "start_percent": 0.0, "end_percent": 1.0},
             {"positive": (8, 0), "negative": (9, 0), "control_net": (6, 0), "image": (4, 0)}, title="Canny 0.2"),
        Node(11, "ControlNetApplyAdvanced", (1140, 300), {"strength": 0.8, "start_percent": 0.0, "end_percent": 1.0},
             {"positive": (10, 0), "negative": (10, 1), "control_net": (7, 0), "image": (5, 0)}, title="Tile 0.8"),
        Node(12, "VAEEncode", (1140, 600), {}, {"pixels": (3, 0), "vae": (1, 2)}),
        Node(13, "KSampler", (1520, 0), {"seed": 7, "steps": 28, "cfg": 4.0, "sampler_name": "euler",
                                         "scheduler": "normal", "denoise": 0.9},
             {"model": (1, 0), "positive": (11, 0), "negative": (11, 1), "latent_image": (12, 0)}),
        Node(14, "VAEDecode", (1900, 0), {}, {"samples": (13, 0), "vae": (1, 2)}),
        Node(15, "SaveImage", (2140, 0), {"filename_prefix": "embroidery/design"}, {"images": (14, 0)}),
        Node(16, "EmbroideryAnalogyPair", (1900, 300),
             {"subject": "flower", "trigger": "emb", "resolution": 1024, "colours": 8},
             {"reference": (2, 0), "design": (14, 0)}),
        Node(17, "PreviewImage", (2280, 300), {}, {"images": (16, 1)}, title="Pair preview"),
    ]
    return build(nodes, [Note(DESIGN_NOTE, (0, 620), (360, 360))], INFO)


STYLE_LORA = "embroidery/emolora_00001.safetensors"
STYLE_LORA_B = "embroidery/emolora_00002.safetensors"
CONTENT_LORA = "blora_content.safetensors"
SDXL_SCRIBBLE = "controlnet-scribble-sdxl-1.0.safetensors"


def _style_model(i, pos, lora=STYLE_LORA, blocks="emolora_style"):
    return Node(i, "EmbroideryStyleBlocksLoader", pos,
                {"lora_name": lora, "blocks": blocks, "custom_blocks": "", "strength": 1.0}, {"model": (1, 0)})


def _prompts(first, pos, text, clip=(1, 1)):
    x, y = pos
    return [Node(first, "CLIPTextEncode", (x, y), {"text": text}, {"clip": clip}, title="Prompt"),
            Node(first + 1, "CLIPTextEncode", (x, y + 220), {"text": NEGATIVE}, {"clip": clip}, title="Negative")]


def _decode_save(first, pos, samples, prefix, vae=(1, 2)):
    x, y = pos
    return [Node(first, "VAEDecode", (x, y), {}, {"samples": samples, "vae": vae}),
            Node(first + 1, "SaveImage", (x + 240, y), {"filename_prefix": prefix}, {"images": (first, 0)})]


def _ksampler(i, pos, model, positive, negative, latent, denoise=1.0, steps=30, cfg=7.0):
    return Node(i, "KSampler", pos, {"seed": 42, "steps": steps, "cfg": cfg, "sampler_name": "euler_ancestral",
                                     "scheduler": "normal", "denoise": denoise},
                {"model": model, "positive": positive, "negative": negative, "latent_image": latent})


FROM_DESIGN_NOTE = """Design -> embroidery (the paper's inference)

Load your trained style LoRA (only its style blocks are applied) and a flat design.
The design is resized to ~1 megapixel, then img2img at strength 0.95 with two
ControlNets: canny (thresholds 100/200, strength 0.5) and tile (blur kernel 15,
strength 0.5). Euler ancestral, 30 steps, CFG 7. The colour fix keeps the
output's lightness and takes the design's colours (a/b in LAB).

Flat stitches (satin, fill): as set here.
Beads and sequins: canny strength 0, tile 0.4, denoise 0.85, colour fix strength 0.
Prompt: 'in <trigger> style' (or '<subject> in <trigger> style')."""


def embroidery_from_design():
    nodes = [
        _checkpoint(1, (0, 0)), _style_model(2, (0, 240)),
        Node(3, "LoadImage", (0, 480), {"image": REFERENCE}, title="Your design"),
        Node(4, "ImageScaleToTotalPixels", (380, 480), {"upscale_method": "lanczos", "megapixels": 1.0},
             {"image": (3, 0)}),
        Node(5, "Canny", (760, 480), {"low_threshold": 0.39, "high_threshold": 0.78}, {"image": (4, 0)}),
        Node(6, "ImageBlur", (760, 680), {"blur_radius": 7, "sigma": 3.0}, {"image": (4, 0)}),
        Node(7, "ControlNetLoader", (380, 760), {"control_net_name": SDXL_CANNY}),
        Node(8, "ControlNetLoader", (380, 900), {"control_net_name": SDXL_TILE}),
        *_prompts(9, (380, 0), "a design in emb style"),
        Node(11, "ControlNetApplyAdvanced", (760, 0), {"strength": 0.5, "start_percent": 0.0, "end_percent": 1.0},
             {"positive": (9, 0), "negative": (10, 0), "control_net": (7, 0), "image": (5, 0)}, title="Canny 0.5"),
        Node(12, "ControlNetApplyAdvanced", (1140, 0), {"strength": 0.5, "start_percent": 0.0, "end_percent": 1.0},
             {"positive": (11, 0), "negative": (11, 1), "control_net": (8, 0), "image": (6, 0)}, title="Tile 0.5"),
        Node(13, "VAEEncode", (1140, 300), {}, {"pixels": (4, 0), "vae": (1, 2)}),
        _ksampler(14, (1520, 0), (2, 0), (12, 0), (12, 1), (13, 0), denoise=0.95),
        Node(15, "VAEDecode", (1900, 0), {}, {"samples": (14, 0), "vae": (1, 2)}),
        Node(16, "EmbroideryColourFix", (1900, 200), {"strength": 1.0}, {"image": (15, 0), "design": (4, 0)}),
        Node(17, "SaveImage", (2280, 0), {"filename_prefix": "embroidery/from_design"}, {"images": (16, 0)}),
    ]
    return build(nodes, [Note(FROM_DESIGN_NOTE, (0, 1040), (420, 330))], INFO)


FROM_TEXT_NOTE = """Text -> embroidery

Loads only the style blocks of your trained LoRA and samples from a prompt:
'<subject> in <trigger> style' (the trigger word you trained with).
1024 x 1024, Euler ancestral, 30 steps, CFG 7, as in the paper's text mode."""


def embroidery_from_text():
    nodes = [_checkpoint(1, (0, 0)), _style_model(2, (0, 240)),
             *_prompts(3, (380, 0), "a cat in emb style"),
             Node(5, "EmptyLatentImage", (380, 440), {"width": 1024, "height": 1024, "batch_size": 1}),
             _ksampler(6, (760, 0), (2, 0), (3, 0), (4, 0), (5, 0)),
             *_decode_save(7, (1140, 0), (6, 0), "embroidery/from_text")]
    return build(nodes, [Note(FROM_TEXT_NOTE, (0, 480), (360, 200))], INFO)


SKETCH_NOTE = """Sketch colourisation through ControlNet

Train the style on an analogy pair whose reference is a coloured picture and whose
design is its line sketch (e.g. Canny of the picture); then load that style here.
Your sketch (dark lines on white) is inverted for the scribble ControlNet, which
keeps its lines; the style blocks add the colouring. Prompt:
'a <subject> in <trigger> style'."""


def sketch_colorization():
    nodes = [_checkpoint(1, (0, 0)), _style_model(2, (0, 240)),
             Node(3, "LoadImage", (0, 480), {"image": REFERENCE}, title="Your sketch"),
             Node(4, "ImageInvert", (380, 480), {}, {"image": (3, 0)}),
             Node(5, "ControlNetLoader", (380, 620), {"control_net_name": SDXL_SCRIBBLE}),
             *_prompts(6, (380, 0), "a colourful bird in emb style"),
             Node(8, "ControlNetApplyAdvanced", (760, 0), {"strength": 0.8, "start_percent": 0.0, "end_percent": 1.0},
                  {"positive": (6, 0), "negative": (7, 0), "control_net": (5, 0), "image": (4, 0)}),
             Node(9, "EmptyLatentImage", (760, 300), {"width": 1024, "height": 1024, "batch_size": 1}),
             _ksampler(10, (1140, 0), (2, 0), (8, 0), (8, 1), (9, 0)),
             *_decode_save(11, (1520, 0), (10, 0), "embroidery/sketch_colour")]
    return build(nodes, [Note(SKETCH_NOTE, (0, 760), (380, 240))], INFO)


APPEARANCE_NOTE = """Appearance transfer: a photo of an object in the learned look

The photo keeps its shape through a canny ControlNet (strength 0.6) and img2img
at denoise 0.75; the style blocks carry the appearance (stitches, material).
Prompt: 'a <subject> in <trigger> style'. Raise denoise for a stronger look,
lower it to keep more of the photo."""


def appearance_transfer():
    nodes = [_checkpoint(1, (0, 0)), _style_model(2, (0, 240)),
             Node(3, "LoadImage", (0, 480), {"image": REFERENCE}, title="Your photo"),
             Node(4, "ImageScaleToTotalPixels", (380, 480), {"upscale_method": "lanczos", "megapixels": 1.0},
                  {"image": (3, 0)}),
             Node(5, "Canny", (760, 480), {"low_threshold": 0.39, "high_threshold": 0.78}, {"image": (4, 0)}),
             Node(6, "ControlNetLoader", (380, 700), {"control_net_name": SDXL_CANNY}),
             *_prompts(7, (380, 0), "a teapot in emb style"),
             Node(9, "ControlNetApplyAdvanced", (760, 0), {"strength": 0.6, "start_percent": 0.0, "end_percent": 1.0},
                  {"positive": (7, 0), "negative": (8, 0), "control_net": (6, 0), "image": (5, 0)}),
             Node(10, "VAEEncode", (760, 300), {}, {"pixels": (4, 0), "vae": (1, 2)}),
             _ksampler(11, (1140, 0), (2, 0), (9, 0), (9, 1), (10, 0), denoise=0.75),
             *_decode_save(12, (1520, 0), (11, 0), "embroidery/appearance")]
    return build(nodes, [Note(APPEARANCE_NOTE, (0, 800), (380, 220))], INFO)


ART_NOTE = """Artistic style transfer, B-LoRA style

Content from one LoRA, style from another: B-LoRA trains both blocks of one image
jointly; here the content blocks (W4, output_blocks.0.1) come from the content
LoRA and the style block (W5, output_blocks.1.1) from the style LoRA - an EmoLoRA
style works too. Prompt: 'a <content word> in <style word> style'.
alpha_squared reproduces B-LoRA's published strengths (its scale acts squared)."""


def artistic_style_transfer():
    nodes = [_checkpoint(1, (0, 0)),
             Node(2, "EmbroideryBLoRAMix", (0, 240),
                  {"content_lora": CONTENT_LORA, "content_blocks": "blora_content", "content_strength": 1.0,
                   "style_lora": STYLE_LORA, "style_blocks": "blora_style", "style_strength": 1.0,
                   "alpha_squared": False}, {"model": (1, 0)}),
             *_prompts(3, (380, 0), "a dog in emb style"),
             Node(5, "EmptyLatentImage", (380, 440), {"width": 1024, "height": 1024, "batch_size": 1}),
             _ksampler(6, (760, 0), (2, 0), (3, 0), (4, 0), (5, 0)),
             *_decode_save(7, (1140, 0), (6, 0), "embroidery/art_style")]
    return build(nodes, [Note(ART_NOTE, (0, 620), (380, 230))], INFO)


MASKED_NOTE = """Two styles in one picture (DiffStyler-style masks)

Style A is applied inside mask 1 (here: the left half), style B inside mask 2
(the right half); anything no mask covers gets the plain model. Replace the
solid masks with painted ones: right-click a Load Image node > Open in
MaskEditor, and connect its MASK output. Masks are resized to the image."""


def masked_multi_style():
    nodes = [_checkpoint(1, (0, 0)),
             *_prompts(2, (0, 240), "a garden of flowers in emb style"),
             Node(4, "SolidMask", (0, 700), {"value": 0.0, "width": 1024, "height": 1024}, title="Empty canvas"),
             Node(5, "SolidMask", (0, 860), {"value": 1.0, "width": 512, "height": 1024}, title="Left half"),
             Node(6, "MaskComposite", (380, 700), {"x": 0, "y": 0, "operation": "add"},
                  {"destination": (4, 0), "source": (5, 0)}, title="Mask 1"),
             Node(7, "InvertMask", (380, 900), {}, {"mask": (6, 0)}, title="Mask 2"),
             Node(8, "EmbroideryMaskedStyle", (760, 240),
                  {"blocks": "emolora_style", "custom_blocks": "", "lora_1": STYLE_LORA, "strength_1": 1.0,
                   "lora_2": STYLE_LORA_B, "strength_2": 1.0},
                  {"model": (1, 0), "positive": (2, 0), "negative": (3, 0), "mask_1": (6, 0), "mask_2": (7, 0)}),
             Node(9, "EmptyLatentImage", (760, 700), {"width": 1024, "height": 1024, "batch_size": 1}),
             _ksampler(10, (1140, 0), (1, 0), (8, 0), (8, 1), (9, 0)),
             *_decode_save(11, (1520, 0), (10, 0), "embroidery/masked_styles")]
    return build(nodes, [Note(MASKED_NOTE, (380, 0), (360, 220))], INFO)


GUIDANCE_NOTE = """Style guidance (Pair Customization)

Each step: eps = eps(neg) + cfg (eps(pos) - eps(neg)) + w (eps_style(pos) - eps(pos)).
The style LoRA is switched on only for the extra pass, so the picture follows
the base model and the style is steered in with weight w (paper: 4, 3 if it
overfits). start_percent 0.2 applies it only below t = 800, the paper's fallback.
For several styles, chain this node: each adds one term. Works with any sampler
and with ControlNet conditioning."""


def style_guidance():
    nodes = [_checkpoint(1, (0, 0)),
             Node(2, "EmbroideryStyleGuidance", (0, 240),
                  {"lora_name": STYLE_LORA, "blocks": "emolora_style", "custom_blocks": "", "weight": 4.0,
                   "lora_strength": 1.0, "start_percent": 0.2, "end_percent": 1.0}, {"model": (1, 0)}),
             *_prompts(3, (380, 0), "a cat in emb style"),
             Node(5, "EmptyLatentImage", (380, 440), {"width": 1024, "height": 1024, "batch_size": 1}),
             _ksampler(6, (760, 0), (2, 0), (3, 0), (4, 0), (5, 0), cfg=5.0),
             *_decode_save(7, (1140, 0), (6, 0), "embroidery/style_guidance")]
    return build(nodes, [Note(GUIDANCE_NOTE, (0, 620), (380, 250))], INFO)


PAIR_NOTE = """Pair Customization: the analogy pair -> a style LoRA for style guidance

The pair is the training pair: design = content image, embroidery = stylised
image. Train Pair Customization learns a content and a style LoRA (rank 64 each,
orthogonal frozen down matrices, 750 steps at 512 px with the style step from
step 250: the official recipe). Style Guidance then steers the style in with
weight 4 while the base model keeps the layout (3 if the style overfits).
Both LoRAs are saved to loras/embroidery/ to reuse them."""


def pair_customization():
    trainer = {"iterations": 750, "learning_rate": 1e-5, "weight_decay": 1e-4, "seed": 0, "precision": "auto",
               "memory_preset": "balanced", "checkpoint_every": 100, "preview_every": 25}
    models = {"model": (1, 0), "clip": (1, 1), "vae": (1, 2), "pair": (3, 0)}
    nodes = [
        _checkpoint(1, (0, 0)),
        Node(2, "LoadImage", (0, 260), {"image": REFERENCE}, title="Your embroidery photo"),
        Node(3, "EmbroideryAnalogyPair", (380, 260),
             {"subject": "flower", "trigger": "emb", "resolution": 1024, "colours": 8}, {"reference": (2, 0)}),
        Node(4, "EmbroideryTrainPairCustomization", (760, 0),
             {"rank": 64, "resolution": 512, "flip": True, "style_start": 250, "accumulate": 4, **trainer}, models),
        Node(5, "EmbroiderySaveStyleLoRA", (1140, 0), {"filename_prefix": "embroidery/pair_style",
                                                       "style_blocks_only": False}, {"lora": (4, 0)}),
        Node(6, "EmbroiderySaveStyleLoRA", (1140, 200), {"filename_prefix": "embroidery/pair_content",
                                                         "style_blocks_only": False}, {"lora": (4, 1)}),
        Node(7, "LossGraphNode", (1140, 400), {"filename_prefix": "embroidery_pair_loss"}, {"loss": (4, 2)}),
        Node(8, "EmbroideryStyleGuidance", (1140, 640),
             {"lora_name": "(none)", "blocks": "all_attention", "custom_blocks": "", "weight": 4.0,
              "lora_strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}, {"model": (1, 0), "lora": (4, 0)}),
        Node(9, "PreviewImage", (380, 700), {}, {"images": (3, 1)}, title="Pair preview"),
        *_prompts(10, (1520, 0), "a cat in emb style"),
        Node(12, "EmptyLatentImage", (1520, 440), {"width": 1024, "height": 1024, "batch_size": 1}),
        _ksampler(13, (1900, 0), (8, 0), (10, 0), (11, 0), (12, 0), cfg=5.0),
        *_decode_save(14, (2280, 0), (13, 0), "embroidery/pair_sample"),
    ]
    return build(nodes, [Note(PAIR_NOTE, (0, 620), (360, 300))], INFO)


BLORA_NOTE = """B-LoRA: content of one image, style of another

Each photo trains a B-LoRA (Train One-Image LoRA, recipe b_lora: its content
block W4 and style block W5 jointly, rank 64, 1000 steps, the official recipe).
B-LoRA Mix then takes the content block of the first and the style block of the
second: the first photo's subject in the second one's stitches. Prompt:
'A <content trigger> in <style trigger> style'. Both LoRAs are saved too."""


def blora_mix():
    trainer = {"iterations": 1000, "learning_rate": 5e-5, "weight_decay": -1.0, "seed": 0, "precision": "auto",
               "memory_preset": "balanced", "checkpoint_every": 200, "preview_every": 25}
    lora = {"recipe": "b_lora", "custom_blocks": "", "prompt": "", "rank": 64, "alpha": 0.0, **trainer}
    models = {"model": (1, 0), "clip": (1, 1), "vae": (1, 2)}
    nodes = [
        _checkpoint(1, (0, 0)),
        Node(2, "LoadImage", (0, 260), {"image": REFERENCE}, title="Content photo"),
        Node(3, "LoadImage", (0, 640), {"image": REFERENCE}, title="Style photo (an embroidery)"),
        Node(4, "EmbroideryAnalogyPair", (380, 260),
             {"subject": "flower", "trigger": "cnt", "resolution": 1024, "colours": 8}, {"reference": (2, 0)},
             title="Content pair"),
        Node(5, "EmbroideryAnalogyPair", (380, 640),
             {"subject": "flower", "trigger": "emb", "resolution": 1024, "colours": 8}, {"reference": (3, 0)},
             title="Style pair"),
        Node(6, "EmbroideryTrainLoRA", (760, 0), lora, {**models, "pair": (4, 0)}, title="B-LoRA of the content"),
        Node(7, "EmbroideryTrainLoRA", (760, 640), lora, {**models, "pair": (5, 0)}, title="B-LoRA of the style"),
        Node(8, "EmbroiderySaveStyleLoRA", (1140, 0), {"filename_prefix": "embroidery/blora_content",
                                                       "style_blocks_only": False}, {"lora": (6, 0)}),
        Node(9, "EmbroiderySaveStyleLoRA", (1140, 200), {"filename_prefix": "embroidery/blora_style",
                                                         "style_blocks_only": False}, {"lora": (7, 0)}),
        Node(10, "EmbroideryBLoRAMix", (1140, 420),
             {"content_lora": "(none)", "content_blocks": "blora_content", "content_strength": 1.0,
              "style_lora": "(none)", "style_blocks": "blora_style", "style_strength": 1.0, "alpha_squared": False},
             {"model": (1, 0), "content": (6, 0), "style": (7, 0)}),
        *_prompts(11, (1520, 0), "A cnt in emb style"),
        Node(13, "EmptyLatentImage", (1520, 440), {"width": 1024, "height": 1024, "batch_size": 1}),
        _ksampler(14, (1900, 0), (10, 0), (11, 0), (12, 0), (13, 0)),
        *_decode_save(15, (2280, 0), (14, 0), "embroidery/blora_mix"),
    ]
    return build(nodes, [Note(BLORA_NOTE, (0, 1000), (360, 260))], INFO)


SD15_CKPT = "v1-5-pruned-emaonly.safetensors"
DIFFSTYLER_NEGATIVE = "ugly, blurry, black, low res, unrealistic"  # the official code's
DIFFSTYLER_NOTE = """DiffStyler: restyle a photo, its structure kept

1. Load the photo; it is scaled to 512 x 512 (DiffStyler's SD1.5/2.1 size).
2. DDIM Inversion (empty prompt, 50 steps) gives the latent at every level.
   Decode its 'reconstruction' (Inversion check) to see what it keeps.
3. Each style is the checkpoint through a LoRA loader (e.g. a LoRA from
   Train One-Image LoRA, recipe dreambooth_all_attention) with its prompt.
4. DiffStyler: every branch replays the photo's inversion and takes its
   features and self-attention; each style replaces the base in its mask.
5. SamplerCustomAdvanced needs Disable Noise, euler, the inversion's sigmas
   and its noisy latent. Paint your own masks: right-click a Load Image >
   Open in MaskEditor, and connect its MASK."""


def _diffstyler_source():
    """Checkpoint, photo at 512, VAE Encode, the empty prompt, the inversion and its preview."""
    return [
        _checkpoint(1, (0, 0), SD15_CKPT),
        Node(2, "LoadImage", (0, 240), {"image": REFERENCE}, title="Your photo"),
        Node(3, "ImageScale", (0, 600), {"upscale_method": "lanczos", "width": 512, "height": 512, "crop": "center"},
             {"image": (2, 0)}),
        Node(4, "VAEEncode", (380, 600), {}, {"pixels": (3, 0), "vae": (1, 2)}),
        Node(5, "CLIPTextEncode", (380, 240), {"text": ""}, {"clip": (1, 1)}, title="Empty prompt"),
        Node(6, "EmbroideryInvert", (760, 240), {"steps": 50}, {"model": (1, 0), "latent": (4, 0), "conditioning": (5, 0)}),
        Node(7, "VAEDecode", (760, 600), {}, {"samples": (6, 2), "vae": (1, 2)}),
        Node(8, "PreviewImage", (1000, 600), {}, {"images": (7, 0)}, title="Inversion check"),
        Node(9, "CLIPTextEncode", (380, 0), {"text": DIFFSTYLER_NEGATIVE}, {"clip": (1, 1)}, title="Negative"),
    ]


def _diffstyler_sampler(first, pos, guider):
    x, y = pos
    return [Node(first, "DisableNoise", (x, y), {}),
            Node(first + 1, "KSamplerSelect", (x, y + 120), {"sampler_name": "euler"}),
            Node(first + 2, "SamplerCustomAdvanced", (x + 300, y), {},
                 {"noise": (first, 0), "guider": guider, "sampler": (first + 1, 0), "sigmas": (6, 3),
                  "latent_image": (6, 1)}),
            *_decode_save(first + 3, (x + 640, y), (first + 2, 0), "embroidery/diffstyler")]


def _style_lora(i, pos, lora, title):
    return Node(i, "LoraLoaderModelOnly", pos, {"lora_name": lora, "strength_model": 1.0}, {"model": (1, 0)},
                title=title)


DIFFSTYLER_OPTIONS = {"cfg": 10.5, "feature_fraction": 0.6, "attention_fraction": 0.5}


def diffstyler_two_styles():
    nodes = [
        *_diffstyler_source(),
        _style_lora(10, (0, 900), STYLE_LORA, "Style A"),
        _style_lora(11, (0, 1060), STYLE_LORA_B, "Style B"),
        Node(12, "CLIPTextEncode", (380, 900), {"text": "a photo in emb style"}, {"clip": (1, 1)}, title="Style A prompt"),
        Node(13, "CLIPTextEncode", (380, 1120), {"text": "a photo in emb style"}, {"clip": (1, 1)},
             title="Style B prompt"),
        Node(14, "SolidMask", (760, 900), {"value": 0.0, "width": 512, "height": 512}, title="Empty canvas"),
        Node(15, "SolidMask", (760, 1060), {"value": 1.0, "width": 256, "height": 512}, title="Left half"),
        Node(16, "MaskComposite", (1000, 900), {"x": 0, "y": 0, "operation": "add"},
             {"destination": (14, 0), "source": (15, 0)}, title="Mask A"),
        Node(17, "InvertMask", (1000, 1100), {}, {"mask": (16, 0)}, title="Mask B"),
        Node(18, "EmbroideryDiffStyler", (1380, 240), DIFFSTYLER_OPTIONS,
             {"model": (1, 0), "positive": (5, 0), "negative": (9, 0), "source": (5, 0), "inversion": (6, 0),
              "style_model_1": (10, 0), "style_positive_1": (12, 0), "mask_1": (16, 0),
              "style_model_2": (11, 0), "style_positive_2": (13, 0), "mask_2": (17, 0)}),
        *_diffstyler_sampler(19, (1760, 240), (18, 0)),
    ]
    return build(nodes, [Note(DIFFSTYLER_NOTE, (1380, 700), (420, 330))], INFO)


def diffstyler_single_style():
    nodes = [
        *_diffstyler_source(),
        _style_lora(10, (0, 900), STYLE_LORA, "Style"),
        Node(12, "CLIPTextEncode", (380, 900), {"text": "a photo in emb style"}, {"clip": (1, 1)}, title="Style prompt"),
        Node(18, "EmbroideryDiffStyler", (1380, 240), DIFFSTYLER_OPTIONS,
             {"model": (1, 0), "positive": (5, 0), "negative": (9, 0), "source": (5, 0), "inversion": (6, 0),
              "style_model_1": (10, 0), "style_positive_1": (12, 0)}),
        *_diffstyler_sampler(19, (1760, 240), (18, 0)),
    ]
    return build(nodes, [Note(DIFFSTYLER_NOTE.replace("each style replaces the base in its mask",
                                                      "with no mask the style covers the picture"),
                              (1380, 700), (420, 330))], INFO)


STYLEGALLERY_NOTE = """StyleGallery: regional stitches from several photos, no training

1. Load the design or photo to restyle and up to eight embroidery photos
   (here three, batched; all are scaled to 512 x 512, StyleGallery's size).
2. Style Regions splits the content into regions (its preview shows them);
   StyleGallery does the same for every reference and gives each content
   region the stitches of the best-matching reference region.
3. Optional: a DINOv2 model in a CLIP Vision Loader, connected to
   clip_vision, for the paper's semantic matching.
4. preset fast = 28 x 3 steps (load the LCM LoRA for it); standard = 150.
The 'matches' picture shows which reference region feeds which region."""


def _stylegallery_inputs():
    """Checkpoint, the empty prompt, the content at 512 and three references batched at 512."""
    def scaled(i, pos, image):
        return Node(i, "ImageScale", pos, {"upscale_method": "lanczos", "width": 512, "height": 512, "crop": "center"},
                    {"image": image})

    return [
        _checkpoint(1, (0, 0), SD15_CKPT),
        Node(2, "CLIPTextEncode", (0, 240), {"text": ""}, {"clip": (1, 1)}, title="Empty prompt"),
        Node(3, "LoadImage", (0, 480), {"image": REFERENCE}, title="Content (design or photo)"),
        scaled(4, (380, 560), (3, 0)),
        Node(5, "LoadImage", (0, 860), {"image": REFERENCE}, title="Reference 1"),
        Node(6, "LoadImage", (0, 1240), {"image": REFERENCE}, title="Reference 2"),
        Node(7, "LoadImage", (0, 1620), {"image": REFERENCE}, title="Reference 3"),
        scaled(8, (380, 860), (5, 0)),
        Node(9, "ImageBatch", (760, 860), {}, {"image1": (8, 0), "image2": (6, 0)}),
        Node(10, "ImageBatch", (760, 1060), {}, {"image1": (9, 0), "image2": (7, 0)}, title="References"),
    ]


def _stylegallery_output(first, pos, gallery):
    x, y = pos
    return [Node(first, "PreviewImage", (x, y + 300), {}, {"images": (gallery, 1)}, title="Matches"),
            *_decode_save(first + 1, (x, y), (gallery, 0), "embroidery/stylegallery")]


def stylegallery_three_references():
    nodes = [
        *_stylegallery_inputs(),
        Node(11, "EmbroideryStyleRegions", (760, 240), {}, {"model": (1, 0), "vae": (1, 2), "image": (4, 0),
                                                            "conditioning": (2, 0)}),
        Node(12, "PreviewImage", (1140, 600), {}, {"images": (11, 1)}, title="Content regions"),
        Node(13, "EmbroideryStyleGallery", (1140, 240), {"preset": "standard"},
             {"model": (1, 0), "vae": (1, 2), "content": (4, 0), "styles": (10, 0), "conditioning": (2, 0),
              "content_masks": (11, 0)}),
        *_stylegallery_output(14, (1520, 240), 13),
    ]
    return build(nodes, [Note(STYLEGALLERY_NOTE, (380, 0), (360, 330))], INFO)


STYLEGALLERY_MASK_NOTE = """StyleGallery with your own regions

The mask says which part of the content is one region (here the left half;
the rest becomes a second region). Paint yours: right-click the content's
Load Image > Open in MaskEditor, and connect its MASK to content_masks.
Each region takes the stitches of the best-matching region of any reference."""


def stylegallery_user_masks():
    nodes = [
        *_stylegallery_inputs(),
        Node(11, "SolidMask", (760, 240), {"value": 0.0, "width": 512, "height": 512}, title="Empty canvas"),
        Node(12, "SolidMask", (760, 400), {"value": 1.0, "width": 256, "height": 512}, title="Left half"),
        Node(15, "MaskComposite", (760, 560), {"x": 0, "y": 0, "operation": "add"},
             {"destination": (11, 0), "source": (12, 0)}, title="Your region"),
        Node(13, "EmbroideryStyleGallery", (1140, 240), {"preset": "standard"},
             {"model": (1, 0), "vae": (1, 2), "content": (4, 0), "styles": (10, 0), "conditioning": (2, 0),
              "content_masks": (15, 0)}),
        *_stylegallery_output(16, (1520, 240), 13),
    ]
    return build(nodes, [Note(STYLEGALLERY_MASK_NOTE, (380, 0), (360, 250))], INFO)


WORKFLOWS = {
    "embroidery_train_one_shot": train_one_shot,
    "stylegallery_three_references": stylegallery_three_references,
    "stylegallery_user_masks": stylegallery_user_masks,
    "diffstyler_two_styles": diffstyler_two_styles,
    "diffstyler_single_style": diffstyler_single_style,
    "pair_customization_style_guidance": pair_customization,
    "blora_train_and_mix": blora_mix,
    "embroidery_design_from_photo": design_from_photo,
    "embroidery_from_design": embroidery_from_design,
    "embroidery_from_text": embroidery_from_text,
    "sketch_colorization_controlnet": sketch_colorization,
    "appearance_transfer": appearance_transfer,
    "artistic_style_transfer": artistic_style_transfer,
    "masked_multi_style": masked_multi_style,
    "style_guidance": style_guidance,
}
INFO: dict = {}


def live_object_info() -> tuple[str, dict]:
    """(ComfyUI version, /object_info) of a fresh server on $COMFYUI_PATH with the pack."""
    from tests.integration.server import comfy_server

    with comfy_server(custom_nodes=[("embroidery-style-lora", ROOT)]) as srv:
        return srv.request("/system_stats")["system"]["comfyui_version"], srv.object_info()


def used_types(workflows: dict) -> set[str]:
    return {n["type"] for wf in workflows.values() for n in wf["nodes"]} - {"Note"}


# ---------------------------------------------------------------------------- thumbnails

SCREENSHOTS = os.path.join(ROOT, "docs", "workflows")
THUMBNAIL_SIZE = (640, 360)
THUMBNAIL_TOLERANCE = 3.0  # mean |difference| per channel (0..255) that JPEG encoders may differ by


def thumbnail_of(screenshot: str):
    """The template card's picture: the run's screenshot, fitted into 640x360."""
    from PIL import Image

    picture = Image.open(screenshot).convert("RGB")
    picture.thumbnail(THUMBNAIL_SIZE)
    return picture


def thumbnail_problem(name: str, check: bool) -> str | None:
    """Write (or with ``check``, compare) workflows/<name>.jpg from its screenshot."""
    import numpy as np
    from PIL import Image

    screenshot = os.path.join(SCREENSHOTS, f"{name}.png")
    target = os.path.join(ROOT, "workflows", f"{name}.jpg")
    if not os.path.isfile(screenshot):
        return (f"no screenshot {os.path.relpath(screenshot, ROOT)}; run the UI integration test with "
                "EMBROIDERY_SCREENSHOTS=docs/workflows")
    want = thumbnail_of(screenshot)
    if not check:
        want.save(target, "JPEG", quality=85, optimize=True)
        return None
    if not os.path.isfile(target):
        return f"no thumbnail {os.path.relpath(target, ROOT)}; run scripts/build_workflows.py --offline"
    got = Image.open(target).convert("RGB")
    if got.size != want.size:
        return f"thumbnail is {got.size}, its screenshot gives {want.size}; run scripts/build_workflows.py"
    diff = np.abs(np.asarray(got, dtype=np.float32) - np.asarray(want, dtype=np.float32)).mean()
    if diff > THUMBNAIL_TOLERANCE:
        return f"thumbnail is stale (differs from its screenshot by {diff:.1f}); run scripts/build_workflows.py"
    return None


# ---------------------------------------------------------------------------- main


def write_snapshot(version: str, full: dict, workflows: dict) -> None:
    snapshot = {t: full[t] for t in sorted(used_types(workflows))}
    with open(snapshot_path(version), "w") as f:
        json.dump(snapshot, f, indent=1, sort_keys=True)
        f.write("\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--offline", action="store_true", help="use the stored object_info snapshot")
    parser.add_argument("--check", action="store_true", help="only compare with the files in workflows/")
    args = parser.parse_args()
    version, full = (MIN_VERSION, load_snapshot()) if args.offline else live_object_info()
    if version != MIN_VERSION:  # a newer server: record its snapshot, check the templates load there
        INFO.update(load_snapshot())
        workflows = {name: make() for name, make in WORKFLOWS.items()}
        write_snapshot(version, full, workflows)
        problems = [f"{name} on {version}: {p}" for name, wf in workflows.items() for p in validate(wf, full, True)]
        print("\n".join(problems) or f"recorded {os.path.relpath(snapshot_path(version), ROOT)}; the templates "
                                     f"(built for {MIN_VERSION}) are valid on {version}", file=sys.stderr)
        return 1 if problems else 0
    INFO.update(full)
    workflows = {name: make() for name, make in WORKFLOWS.items()}
    failed = False
    for name, wf in workflows.items():
        problems = validate(wf, INFO)
        thumb = thumbnail_problem(name, args.check)
        if problems or thumb:
            print(f"{name}: " + "; ".join(problems + [thumb] if thumb else problems), file=sys.stderr)
            failed = True
        path = os.path.join(ROOT, "workflows", f"{name}.json")
        text = json.dumps(wf, indent=1) + "\n"
        if args.check:
            with open(path) as f:
                if f.read() != text:
                    print(f"{path} differs from its spec; run scripts/build_workflows.py", file=sys.stderr)
                    failed = True
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
    if not args.offline and not args.check:
        write_snapshot(version, full, workflows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
