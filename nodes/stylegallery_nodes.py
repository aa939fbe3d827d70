"""StyleGallery in the graph (METHODS.md section 4): training-free regional style from several
references. The recipe is embroidery_core.regions / .stylegallery; this module feeds it
ComfyUI's model (forward wrappers on a loaded clone, removed afterwards), VAE and CLIP vision."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import comfy.model_management as mm
import comfy.utils
from comfy_api.latest import io

from ..embroidery_core.images import region_preview
from ..embroidery_core.regions import BlockRecorder, RegionConfig, analyse_image, feature_block, region_masks, relabel
from ..embroidery_core.stylegallery import (AttentionRecorder, StylizeConfig, attention_layers, matched_pairs,
                                            standardise_channels, stylize)
from . import comfy_training as ct
from .common import CATEGORY, NodeInputError, PackNode, check_choice, model_family

REGIONS = "Embroidery Style Regions"
GALLERY = "Embroidery StyleGallery"
PRESETS = ["standard", "fast"]
MAX_STYLES = 8


def _prompt_inputs() -> list:
    """Both nodes' way in for the empty prompt: a conditioning, or the clip to encode ''."""
    return [io.Conditioning.Input("conditioning", optional=True,
                                  tooltip="The empty prompt (CLIP Text Encode of ''); or connect clip."),
            io.Clip.Input("clip", optional=True, tooltip="Used to encode the empty prompt if no conditioning.")]


def _prompt(model, conditioning, clip, image, device, node: str):
    """The empty prompt the official code runs every pass with: a connected conditioning, or
    the clip's encoding of ''."""
    height, width = image.shape[1], image.shape[2]
    if conditioning is not None:
        return ct.cond_from_conditioning(model, conditioning, height, width, device)
    if clip is None:
        raise NodeInputError(node, "connect a conditioning (CLIP Text Encode of an empty prompt) or the clip")
    return ct.encode_prompt(clip, model, "", height, width, device)


def _check_image(image, name: str, node: str):
    if image.ndim != 4 or image.shape[-1] < 3:
        raise NodeInputError(node, f"{name} must be an IMAGE [B, H, W, 3], got {tuple(image.shape)}")
    if image.shape[1] < 64 or image.shape[2] < 64 or image.shape[1] % 8 or image.shape[2] % 8:
        raise NodeInputError(node, f"{name} is {image.shape[2]} x {image.shape[1]} px; give at least 64 x 64, sides "
                                   "multiples of 8 (StyleGallery works at 512 x 512 on SD1.5)")


def _analyse(model, vae, clone, cond, image, depth, config: RegionConfig, bar):
    """Regions of one image on a loaded clone that carries the feature block's recorder."""
    denoiser = ct.ComfyDenoiser(clone)
    latent = ct.encode_image(vae, model, image[:1], denoiser.device)

    def run(x, sigma):
        bar.update(1)  # Cancel raises from here, between passes
        return denoiser(x, sigma, cond)

    recorder = clone.embroidery_recorder
    with torch.no_grad():
        found = analyse_image(run, denoiser.prediction, latent, denoiser.sampling.sigmas.float().cpu(), recorder,
                              depth, config)
    return found, latent


class _Session:
    """A loaded clone with the region recorder and the attention recorder installed."""

    def __init__(self, model, node: str, layers: int = 6):
        arch = model_family(model, node)
        self.recorder = BlockRecorder(feature_block(arch))
        names = attention_layers(arch, layers)
        modules = {n: comfy.utils.get_attr(model.model, f"diffusion_model.{n}") for n in names}
        self.attention = AttentionRecorder(names, {n: int(m.heads) for n, m in modules.items()})
        self.model = model

    def __enter__(self):
        self._context = ct.training_session(self.model, self.recorder, self.attention, trainable_graph=True)
        clone = self._context.__enter__()
        clone.embroidery_recorder, clone.embroidery_attention = self.recorder, self.attention
        return clone

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)


def _upsampled(labels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.interpolate(labels[None, None].float(), size=(height, width), mode="nearest")[0, 0].long()


class EmbroideryStyleRegions(PackNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EmbroideryStyleRegions",
            display_name=REGIONS,
            category=f"{CATEGORY}/stylegallery",
            description="StyleGallery's semantic regions of an image, without training or masks: a short DDIM "
                        "inversion's decoder features, clustered (k = 2..10 by silhouette), close regions merged, an "
                        "optional depth split, specks absorbed. Feed the masks to StyleGallery or any masked node.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5 (the paper's) or SDXL model; cloned, never modified."),
                io.Vae.Input("vae", tooltip="The model's VAE, to encode the image."),
                io.Image.Input("image", tooltip="The image to split into regions (the first of a batch)."),
                *_prompt_inputs(),
                io.Image.Input("depth", optional=True,
                               tooltip="A depth map of the image from any depth node (brighter = nearer or farther, "
                                       "either works): regions spanning much depth are split, as the official "
                                       "recipe does with Depth-Anything-V2."),
            ],
            outputs=[io.Mask.Output(display_name="masks", tooltip="One mask per region, at the image's size."),
                     io.Image.Output(display_name="preview", tooltip="The image with each region in its own colour."),
                     io.Int.Output(display_name="count", tooltip="How many regions were found.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, vae, image, conditioning=None, clip=None, depth=None) -> io.NodeOutput:
        _check_image(image, "image", REGIONS)
        if depth is not None:
            _check_image(depth, "depth", REGIONS)
        config = RegionConfig()
        bar = comfy.utils.ProgressBar(config.inversion_steps, node_id=cls.hidden.unique_id if cls.hidden else None)
        with _Session(model, REGIONS) as clone:
            cond = _prompt(model, conditioning, clip, image, ct.ComfyDenoiser(clone).device, REGIONS)
            found, _ = _analyse(model, vae, clone, cond, image, depth, config, bar)
        labels = _upsampled(found.labels, image.shape[1], image.shape[2])
        masks = region_masks(labels).float()
        return io.NodeOutput(masks, region_preview(image[:1].float().cpu(), labels)[None], int(masks.shape[0]))


def _semantic(clip_vision, image: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """DINOv2's patch tokens [D, p, p] of an image (CLS and any register tokens dropped), or
    ``fallback`` (the decoder features) without a CLIP vision model."""
    if clip_vision is None:
        return fallback
    with torch.inference_mode():
        tokens = clip_vision.encode_image(image[:1, ..., :3])["last_hidden_state"][0].float().cpu()
    side = int((tokens.shape[0] - 1) ** 0.5)
    return tokens[-side * side:].T.reshape(-1, side, side).clone()


def _content_labels(masks: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """User masks [K, H, W] -> labels at the image's size; pixels no mask covers are one more region."""
    if masks.ndim == 2:
        masks = masks[None]
    m = F.interpolate(masks[:, None].float(), size=(height, width), mode="nearest")[:, 0] > 0.5
    if not m.any(dim=(1, 2)).all():
        empty = int((~m.any(dim=(1, 2))).nonzero()[0]) + 1
        raise NodeInputError(GALLERY, f"content mask {empty} is empty; paint the region or drop that mask")
    labels = torch.full((height, width), len(m), dtype=torch.long)
    for i in range(len(m) - 1, -1, -1):  # the first mask wins where masks overlap
        labels[m[i]] = i
    return labels


class EmbroideryStyleGallery(PackNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EmbroideryStyleGallery",
            display_name=GALLERY,
            category=f"{CATEGORY}/stylegallery",
            description="StyleGallery (CVPR 2026), training-free: each region of the content image takes the stitches "
                        "of the best-matching region of any reference, by optimising the content's latent so its "
                        "self-attention reads like the reference region's. No LoRA; seconds to minutes.",
            inputs=[
                io.Model.Input("model", tooltip="SD1.5 (the paper's model) or SDXL (our extension); cloned, never "
                                                "modified. For the fast preset load the LCM LoRA on it."),
                io.Vae.Input("vae", tooltip="The model's VAE."),
                io.Image.Input("content", tooltip="The picture to restyle (first of a batch); 512 x 512 on SD1.5."),
                io.Image.Input("styles", tooltip=f"One to {MAX_STYLES} reference photos (a batch: Batch Images); "
                                                 "each is split into regions and every region can be matched."),
                io.Combo.Input("preset", options=PRESETS, default="standard",
                               tooltip="standard: 150 Adam steps (the paper's). fast: 28 timesteps x 3 (the official "
                                       "LCM preset's constants; meant for a model with the LCM LoRA)."),
                *_prompt_inputs(),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="A DINOv2 model (CLIP Vision Loader) for the semantic part of the match, "
                                            "as the paper; without it the decoder features stand in (the node says "
                                            "so in its preview's title)."),
                io.Mask.Input("content_masks", optional=True,
                              tooltip="Your own content regions (a MASK batch, e.g. from Style Regions or painted); "
                                      "without them the content is split automatically."),
            ],
            outputs=[io.Latent.Output(display_name="latent", tooltip="The stylised latent: VAE Decode it."),
                     io.Image.Output(display_name="matches",
                                     tooltip="Content regions in colour, and beside it each reference with the "
                                             "regions that feed them in the same colours.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, vae, content, styles, preset, conditioning=None, clip=None, clip_vision=None,
                content_masks=None) -> io.NodeOutput:
        check_choice(preset, PRESETS, "preset", GALLERY)
        _check_image(content, "content", GALLERY)
        _check_image(styles, "styles", GALLERY)
        if styles.shape[0] > MAX_STYLES:
            raise NodeInputError(GALLERY, f"{styles.shape[0]} style images; give at most {MAX_STYLES}")
        config = StylizeConfig.fast() if preset == "fast" else StylizeConfig()
        regions_config = RegionConfig()
        height, width = content.shape[1], content.shape[2]
        user = None if content_masks is None else _content_labels(content_masks, height, width)
        passes = regions_config.inversion_steps * (styles.shape[0] + (user is None))
        bar = comfy.utils.ProgressBar(passes + config.iterations, node_id=cls.hidden.unique_id if cls.hidden else None)
        with _Session(model, GALLERY, config.layers) as clone:
            denoiser = ct.ComfyDenoiser(clone)
            cond = _prompt(model, conditioning, clip, content, denoiser.device, GALLERY)
            found, content_latent = _analyse(model, vae, clone, cond, content, None, regions_config, bar)
            labels = found.labels if user is None else relabel(F.interpolate(  # a region too small vanishes
                user[None, None].float(), size=found.labels.shape, mode="nearest")[0, 0].long())
            style_cond = _prompt(model, conditioning, clip, styles[:1], denoiser.device, GALLERY)
            style_found = [_analyse(model, vae, clone, style_cond, styles[i:i + 1], None, regions_config, bar)
                           for i in range(styles.shape[0])]
            matches, pairs = matched_pairs(
                (labels, found.features, _semantic(clip_vision, content, found.features)),
                [(f.labels, f.features, _semantic(clip_vision, styles[i:i + 1], f.features))
                 for i, (f, _) in enumerate(style_found)])
            features = self_attention(clone, denoiser, cond, bar)
            latent = stylize(standardise_channels(found.inverted), features, content_latent,
                             [latent for _, latent in style_found], pairs, config)
        out = {"samples": model.model.process_latent_out(latent.cpu().float())}
        preview = match_preview(content, styles, labels, style_found, matches, clip_vision is not None)
        return io.NodeOutput(out, preview)


def self_attention(clone, denoiser, cond, bar):
    """``features(latent, t)`` for the core's loop: the UNet on the latent shown unnoised at
    timestep t (as the official code), the attention recorder's layers returned with their graph."""
    recorder = clone.embroidery_attention
    sigmas = denoiser.sampling.sigmas.float()

    def features(latent, t):
        mm.throw_exception_if_processing_interrupted()  # Cancel within one iteration
        sigma = sigmas[int(t)].to(latent.device)
        denoiser(latent * (1 + sigma ** 2) ** 0.5, sigma.reshape(1).expand(latent.shape[0]), cond)
        if latent.requires_grad:
            bar.update(1)
        return recorder.collect()

    return features


def match_preview(content, styles, labels, style_found, matches, semantic: bool) -> torch.Tensor:
    """Content regions coloured, then each reference with the regions that feed them coloured
    alike; a grey bar on top when the semantic term used decoder features (no CLIP vision)."""
    from ..embroidery_core.images import matched_regions_sheet

    height, width = content.shape[1], content.shape[2]
    content_labels = _upsampled(labels, height, width)
    style_labels = [_upsampled(f.labels, styles.shape[1], styles.shape[2]) for f, _ in style_found]
    return matched_regions_sheet(content[:1].float().cpu(), content_labels, styles.float().cpu(), style_labels,
                                 [(s, j) for s, j, _ in matches], semantic)[None]


STYLEGALLERY_NODES: list[type[io.ComfyNode]] = [EmbroideryStyleRegions, EmbroideryStyleGallery]
