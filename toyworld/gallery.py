"""StyleGallery on the toy base model: the core's region finder, matching and latent optimisation
run on the plain torch UNet, as the ComfyUI nodes run them on ComfyUI's (the toy has no DINOv2,
so the semantic term is the decoder features' mean, the nodes' fallback without CLIP vision).

    labels = regions(unet, encoder, image)
    out = stylegallery(unet, encoder, content_image, [style_image])

One toy-scale choice, like the LoRA's rank and rate: the region features come from the end of
the toy UNet's last decoder level (REGION_LEVEL), not the official second-to-last. SD1.5's
official map is computed 32 tokens across the image (up_blocks.2, then upsampled); the toy's
levels are 16, 8 and 4 tokens across, so its second-to-last is 8 across, too coarse for a
design's bands and rings (measured in docs/FIDELITY.md: best IoU per colour 0.32-0.81 there,
0.82-0.95 at the last level), and its last level (16 across) is the nearest to SD1.5's 32. The
ComfyUI nodes keep the official level on SD1.5 and SDXL.
"""
from __future__ import annotations

import torch

from embroidery_core.adapters import installed
from embroidery_core.regions import BlockRecorder, RegionConfig, analyse_image, feature_block
from embroidery_core.stylegallery import (AttentionRecorder, StylizeConfig, attention_layers, matched_pairs,
                                          standardise_channels, stylize)
from .model import UNCOND, from_latent, to_latent, toy_denoiser

REGION_LEVEL = -1  # the decoder's last level (see the module docstring)


@torch.no_grad()
def analyse(unet, encoder, image: torch.Tensor, config: RegionConfig = RegionConfig()):
    """(labels [h, w], mixed decoder features [C, h, w], inverted latent [1, C, h, w]) of an IMAGE
    [1, H, W, 3]: the official 15-step inversion with the empty prompt, the output of the
    REGION_LEVEL's end at every step mixed by the time weights, then the region finder."""
    denoiser = toy_denoiser(unet)
    empty = encoder.encode(UNCOND)
    arch = unet.cfg.arch()
    recorder = BlockRecorder(feature_block(arch, REGION_LEVEL % arch.levels))
    with installed(unet, recorder):
        found = analyse_image(lambda x, s: denoiser(x, s, empty), denoiser.prediction, to_latent(image),
                              denoiser.sigmas, recorder, config=config)
    return found.labels, found.features, found.inverted


def regions(unet, encoder, image: torch.Tensor, config: RegionConfig = RegionConfig()) -> torch.Tensor:
    return analyse(unet, encoder, image, config)[0]


def _feature_fn(unet, encoder, recorder: AttentionRecorder):
    denoiser = toy_denoiser(unet)
    empty = encoder.encode(UNCOND)

    def features(latent, t):
        sigma = denoiser.sigmas[int(t)]
        # the latent as the official code shows it: unnoised, labelled with timestep t
        denoiser(latent * (1 + sigma ** 2) ** 0.5, sigma.reshape(1).expand(latent.shape[0]), empty)
        return recorder.collect()

    return features


def stylegallery(unet, encoder, content: torch.Tensor, styles: list[torch.Tensor],
                 config: StylizeConfig = StylizeConfig(), region_config: RegionConfig = RegionConfig()):
    """The content IMAGE [1, H, W, 3] in the style of the reference IMAGEs, region by region.
    Returns (IMAGE, matches [(content region, style image, style region, score)])."""
    content_labels, content_features, inverted = analyse(unet, encoder, content, region_config)
    analysed = [analyse(unet, encoder, s, region_config) for s in styles]
    matches, pairs = matched_pairs((content_labels, content_features, content_features),
                                   [(labels, features, features) for labels, features, _ in analysed])
    layers = attention_layers(unet.cfg.arch(), config.layers)
    modules = dict(unet.named_modules())
    recorder = AttentionRecorder(layers, {layer: modules[layer].heads for layer in layers})
    unet.requires_grad_(False)
    with installed(unet, recorder):
        latent = stylize(standardise_channels(inverted), _feature_fn(unet, encoder, recorder), to_latent(content),
                         [to_latent(s) for s in styles], pairs, config)
    return from_latent(latent), [(c, s, j, score) for c, (s, j, score) in enumerate(matches)]
