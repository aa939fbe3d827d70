"""The toy world's base model: a pixel-space TinyUNet and a tiny text encoder over VOCAB.

The "VAE" is :mod:`toyworld.vae`: a fixed linear code of 4 x 4 pixel patches (PCA, fitted once,
shipped in weights/toy_vae.safetensors), so a 64 x 64 RGB image is a [16, 16, 16] latent. As in
SD's 1/8-scale latent, a fine stitch (4 px, generator.SPACINGS) is one latent position's code in
the channels and a coarse one spans 2 x 2 positions. (The first toy base folded 2 x 2 pixels
into channels: a stitch then spread over several positions and the small UNet never learned to
paint most techniques; a plain 4 x 4 fold, which the second world used, decodes whatever noise
the UNet leaves to per-pixel speckle, docs/FIDELITY.md.) ``to_latent`` / ``from_latent`` play the VAE's encode / decode.

The UNet is :class:`~embroidery_core.tiny_unet.TinyUNet` with SD's module names, so EmoLoRA's
adapters, prompt router and block presets apply to it unchanged (``TOY_UNET.arch()`` gives
SDXL-named blocks). The text encoder maps ``tokenize``'s ids to a [B, T, D] context; the
trigger word's slot is never trained, like a rare token in CLIP.

Reading order: constants, latents, the text encoder, building / saving / loading.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict

import safetensors
import safetensors.torch
import torch
from torch import nn

from embroidery_core.diffusion import PREDICTIONS, Cond, TorchDenoiser
from embroidery_core.files import atomic_path
from embroidery_core.tiny_unet import TinyUNet, TinyUNetConfig
from .generator import PROMPT_LENGTH, VOCAB, tokenize
from .vae import LATENT_CHANNELS, VAE_WEIGHTS, load_vae, shipped_vae, vae_digest

IMAGE_SIZE = 64  # toy images are 64 x 64 RGB
TEXT_DIM = 32
# Attention at every level (16, 8 and 4 tokens a side: 4, 8 and 16 px per token), so the layers
# a LoRA adapts are the ones that draw a stitch (4 or 8 px), not only coarser ones. 64 channels:
# wider than the latent (a 32-channel first try on the second world's 48-channel fold left the
# samples full of noise after 1000 steps).
TOY_UNET = TinyUNetConfig(in_channels=LATENT_CHANNELS, model_channels=64, channel_mult=(1, 1, 1),
                          down_attention=(1, 1, 1), up_attention=(1, 1, 1), context_dim=TEXT_DIM, heads=4)
WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "toy_base.safetensors")
UNET_PREFIX, TEXT_PREFIX = "unet.", "text_encoder."
FORMAT = "embroidery-toy-base/1"
PREDICTION = "v"  # the shipped model's parameterisation (see train_base.py for why)
UNCOND = ""  # the empty prompt: all padding, classifier-free guidance's unconditional branch


# --- latents ---------------------------------------------------------------------------------

def to_latent(images: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, 3] in 0..1 -> toy latent [B, 16, H/4, W/4] (the shipped VAE's code)."""
    return shipped_vae().encode(images)


def from_latent(latent: torch.Tensor) -> torch.Tensor:
    """Toy latent [B, 16, h, w] -> IMAGE [B, 4h, 4w, 3] clamped to 0..1 (the shipped VAE's decode)."""
    return shipped_vae().decode(latent)


# --- text ------------------------------------------------------------------------------------

class ToyTextEncoder(nn.Module):
    """Token + position embeddings, layer-normed: ids [B, T] -> context [B, T, D].

    No attention between tokens: the UNet's cross-attention does all the reading, which keeps
    a prompt's words independent (the trigger's embedding cannot leak into the others).
    """

    def __init__(self, dim: int = TEXT_DIM, length: int = PROMPT_LENGTH):
        super().__init__()
        self.length = length
        self.token_embedding = nn.Embedding(len(VOCAB), dim)
        self.position_embedding = nn.Parameter(torch.zeros(length, dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.token_embedding(ids) + self.position_embedding[: ids.shape[1]])

    def ids(self, prompts: str | list[str]) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return torch.tensor([tokenize(p, self.length) for p in prompts], dtype=torch.long)

    def encode(self, prompts: str | list[str]) -> Cond:
        """Prompt(s) -> the Cond the denoiser and the trainer take; "" is the empty prompt
        (all padding), the unconditional branch of classifier-free guidance."""
        device = self.position_embedding.device
        return Cond(self(self.ids(prompts).to(device)))


# --- building, saving, loading ---------------------------------------------------------------

def build_toy_model(config: TinyUNetConfig = TOY_UNET) -> tuple[TinyUNet, ToyTextEncoder]:
    """A freshly initialised (unet, encoder) pair of the shipped architecture."""
    return TinyUNet(config), ToyTextEncoder(config.context_dim)


def config_from_json(text: str) -> TinyUNetConfig:
    fields = json.loads(text)
    return TinyUNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def toy_state_dict(unet: TinyUNet, encoder: ToyTextEncoder) -> dict[str, torch.Tensor]:
    state = {UNET_PREFIX + k: v for k, v in unet.state_dict().items()}
    state.update({TEXT_PREFIX + k: v for k, v in encoder.state_dict().items()})
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def save_toy_model(path: str, unet: TinyUNet, encoder: ToyTextEncoder, metadata: dict[str, str]) -> str:
    """Both networks in one safetensors file; the UNet config travels as JSON in the metadata."""
    meta = {"format": FORMAT, "config": json.dumps(asdict(unet.cfg)), "vae_sha256": vae_digest(shipped_vae()),
            **{k: str(v) for k, v in metadata.items()}}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(toy_state_dict(unet, encoder), tmp, metadata=meta)
    return path


def read_metadata(path: str = WEIGHTS) -> dict[str, str]:
    with safetensors.safe_open(path, framework="pt") as f:
        return dict(f.metadata() or {})


def load_toy_model(path: str | None = None, device: str | torch.device = "cpu") -> tuple[TinyUNet, ToyTextEncoder]:
    """(unet, encoder) from the shipped weights (or ``path``), in eval mode, gradients off."""
    path = path or WEIGHTS
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no toy base model at {path}; train one with "
                                "`python -m toyworld.train_base --out <file>`")
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a toy base model (format {meta.get('format')!r}, expected {FORMAT!r})")
    if meta.get("vae_sha256") != vae_digest(load_vae(VAE_WEIGHTS)):
        raise ValueError(f"{path} was trained on another toy VAE than {VAE_WEIGHTS} (its latents would decode "
                         "to noise); restore the VAE file this project ships (a VAE rebuilt on another machine "
                         "can differ in its last bits) or retrain the base on this VAE")
    unet, encoder = build_toy_model(config_from_json(meta["config"]))
    state = safetensors.torch.load_file(path)
    unet.load_state_dict({k[len(UNET_PREFIX):]: v for k, v in state.items() if k.startswith(UNET_PREFIX)})
    encoder.load_state_dict({k[len(TEXT_PREFIX):]: v for k, v in state.items() if k.startswith(TEXT_PREFIX)})
    for module in (unet, encoder):
        module.to(device).eval().requires_grad_(False)
    prediction = meta.get("prediction", "eps")
    if prediction not in PREDICTIONS:
        raise ValueError(f"{path} has unknown prediction {prediction!r}")
    unet.prediction = prediction  # read by toy_denoiser
    return unet, encoder


def toy_denoiser(unet: TinyUNet) -> TorchDenoiser:
    """The Denoiser the trainers and the sampler use for a toy UNet, in its own parameterisation
    (eps or v on SD's discrete schedule)."""
    return TorchDenoiser(unet, getattr(unet, "prediction", PREDICTION))
