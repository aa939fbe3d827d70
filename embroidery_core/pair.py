"""The image-analogy pair: a reference embroidery and the flat design it was stitched from."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .images import flatten_design, resize_to_multiple

LATENT_MULTIPLE = 64  # 8 (VAE) x 8 (three UNet downsamplings): every latent size the UNet accepts
DEFAULT_RESOLUTION = 1024


@dataclass
class AnalogyPair:
    """Both images at training resolution ([1,H,W,3], 0..1), their prompts and an optional mask
    ([1,H,W], 1 = the embroidered subject) that weights nothing yet but travels with the pair."""

    embroidery: torch.Tensor
    design: torch.Tensor
    subject: str
    trigger: str
    mask: torch.Tensor | None = None
    design_generated: bool = False

    @property
    def design_prompt(self) -> str:
        return design_prompt(self.subject)

    @property
    def embroidery_prompt(self) -> str:
        return embroidery_prompt(self.subject, self.trigger)


def design_prompt(subject: str) -> str:
    """The paper's prompt for the flat design: "a <subject>"."""
    return f"a {subject}"


def embroidery_prompt(subject: str, trigger: str) -> str:
    """The paper's prompt for the embroidery: "a <subject> in <trigger> style"."""
    return f"a {subject} in {trigger} style"


def check_words(subject: str, trigger: str) -> tuple[str, str]:
    subject, trigger = " ".join(subject.split()), trigger.strip()
    if not subject:
        raise ValueError("subject is empty; describe what the embroidery shows, e.g. 'cat' or 'red rose'")
    if not re.fullmatch(r"[\w<>\[\]-]+", trigger):
        raise ValueError(f"trigger word {trigger!r} must be one word (letters, digits, _ - < > [ ]), e.g. 'sks' or 'emb'")
    return subject, trigger


def build_pair(reference: torch.Tensor, design: torch.Tensor | None = None, mask: torch.Tensor | None = None,
               subject: str = "", trigger: str = "", resolution: int = DEFAULT_RESOLUTION,
               colours: int = 8) -> AnalogyPair:
    """Resize the reference (longer side = resolution, sides a multiple of 64) and its design to the
    same size; without a design, flatten the reference into one (model-free)."""
    subject, trigger = check_words(subject, trigger)
    if reference.ndim != 4 or reference.shape[-1] < 3:
        raise ValueError(f"the reference must be an IMAGE [B,H,W,3], got shape {tuple(reference.shape)}")
    if resolution < LATENT_MULTIPLE or resolution % LATENT_MULTIPLE:
        raise ValueError(f"resolution must be a multiple of {LATENT_MULTIPLE}, got {resolution}")
    embroidery = resize_to_multiple(reference[:1, ..., :3].float(), resolution, LATENT_MULTIPLE)
    height, width = embroidery.shape[1:3]
    generated = design is None
    if generated:
        design = flatten_design(embroidery, colours=colours)
    else:
        design = _fit(design[:1, ..., :3].float(), height, width)
    if mask is not None:
        mask = mask.reshape(-1, *mask.shape[-2:])[:1].float()
        mask = torch.nn.functional.interpolate(mask[:, None], size=(height, width), mode="bilinear",
                                               align_corners=False)[:, 0].clamp(0, 1)
    return AnalogyPair(embroidery, design, subject, trigger, mask, generated)


def _fit(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize a user design onto the reference's grid (the pair must align pixel for pixel)."""
    chw = image.movedim(-1, 1)
    out = torch.nn.functional.interpolate(chw, size=(height, width), mode="bicubic", align_corners=False,
                                          antialias=True)
    return out.movedim(1, -1).clamp(0, 1)


def training_pair(pair: AnalogyPair, resolution: int = 0, flip: bool = False) -> AnalogyPair:
    """The pair at another training resolution (longer side, a multiple of LATENT_MULTIPLE; 0 =
    as it is), both images mirrored when ``flip`` (Pair Customization's official code flips every
    training image)."""
    if resolution and (resolution < LATENT_MULTIPLE or resolution % LATENT_MULTIPLE):
        raise ValueError(f"resolution must be a multiple of {LATENT_MULTIPLE} (or 0), got {resolution}")
    images = [pair.embroidery, pair.design]
    if resolution:
        images = [resize_to_multiple(img, resolution, LATENT_MULTIPLE) for img in images]
    if flip:
        images = [img.flip(2) for img in images]
    return AnalogyPair(images[0], images[1], pair.subject, pair.trigger)
