"""The toy world's VAE: a fixed linear code of 4 x 4 pixel patches, fitted once by PCA.

    python -m toyworld.vae --out toyworld/weights/toy_vae.safetensors

A 64 x 64 image is cut into 4 x 4 patches (``pixel_unshuffle``: 48 numbers each, pixels in
[-1, 1]); a patch's code is its projection on the ``LATENT_CHANNELS`` leading principal
components of patches drawn like the base model's training data (designs and the training
techniques' embroideries, never a held-out or new-kind one), each component divided by its own
spread, so every latent channel has unit variance, as SD's scaled latents have. Decoding is the
transpose: code x spread onto the components, plus the mean patch, folded back into pixels.

Why not the plain fold of the second world: there every latent channel is a pixel, so whatever
the UNet leaves of the noise decodes to per-pixel speckle (this world's first base, trained on
the fold, covered its outputs in it at 3000 and 4000 steps, and the classifier read nearly every
prompt as one of two techniques, docs/FIDELITY.md). Under a PCA code the same leftover decodes to
a mix of stitch-patch patterns, and the UNet has 16 numbers a position to paint instead of 48; the classifier
still reads reconstructions of every class (the measurement is in FIDELITY.md). That is what
SD's VAE does too: a stitch of a few pixels is a per-position code, and its decoder only draws
images that look like images.

Deterministic: the patches come from ``--seed`` and float64 eigen-decomposition; every
component's sign is fixed (its largest entry positive), so on one machine the command rebuilds
the same tensors. Another CPU may round the last bits differently (2e-9 at most between the
shipped file and a rebuild on the build machine of 2026-12-06), and that changes the digest.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from dataclasses import dataclass

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F

from embroidery_core.files import atomic_path
from embroidery_core.provenance import arithmetic

PATCH = 4  # pixels a latent position covers per side
PATCH_VALUES = 3 * PATCH * PATCH
LATENT_CHANNELS = 16
VAE_WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "toy_vae.safetensors")
FORMAT = "embroidery-toy-vae/1"
SCRIPT_VERSION = "1"
log = logging.getLogger("toyworld.vae")


@dataclass(frozen=True)
class ToyVAE:
    """``mean`` [48], ``components`` [48, C] orthonormal columns, ``spread`` [C] (the components'
    standard deviations over the fitting patches)."""

    mean: torch.Tensor
    components: torch.Tensor
    spread: torch.Tensor

    @property
    def channels(self) -> int:
        return self.components.shape[1]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """IMAGE [B, H, W, 3] in 0..1 -> latent [B, C, H/4, W/4]."""
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % PATCH or images.shape[2] % PATCH:
            raise ValueError(f"expected an IMAGE [B, H, W, 3] with sides a multiple of {PATCH}, "
                             f"got {tuple(images.shape)}")
        centred = _patches(images.float()) - self.mean.view(1, -1, 1, 1)
        return torch.einsum("bphw,pc->bchw", centred, self.components) / self.spread.view(1, -1, 1, 1)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent [B, C, h, w] -> IMAGE [B, 4h, 4w, 3] clamped to 0..1."""
        if latent.ndim != 4 or latent.shape[1] != self.channels:
            raise ValueError(f"expected a toy latent [B, {self.channels}, h, w], got {tuple(latent.shape)}")
        scaled = latent.float() * self.spread.view(1, -1, 1, 1)
        patches = torch.einsum("bchw,pc->bphw", scaled, self.components) + self.mean.view(1, -1, 1, 1)
        return ((F.pixel_shuffle(patches, PATCH) + 1) / 2).clamp(0, 1).movedim(1, -1)


def _patches(images: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, 3] in 0..1 -> its 4 x 4 patches in -1..1 as channels, [B, 48, H/4, W/4]."""
    return F.pixel_unshuffle(images.movedim(-1, 1) * 2 - 1, PATCH)


def fit_vae(images: torch.Tensor, channels: int = LATENT_CHANNELS) -> ToyVAE:
    """PCA of the 4 x 4 patches of ``images`` [N, H, W, 3] (0..1), float64, signs fixed."""
    if not 1 <= channels <= PATCH_VALUES:
        raise ValueError(f"channels must be in 1..{PATCH_VALUES}, got {channels}")
    patches = _patches(images.double()).movedim(1, -1).reshape(-1, PATCH_VALUES)
    mean = patches.mean(0)
    centred = patches - mean
    covariance = centred.T @ centred / (len(centred) - 1)
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    order = torch.argsort(values, descending=True)[:channels]
    values, vectors = values[order], vectors[:, order]
    signs = torch.sign(vectors.gather(0, vectors.abs().argmax(0, keepdim=True)))
    vectors = vectors * signs
    return ToyVAE(mean.float(), vectors.float().contiguous(), values.clamp_min(1e-12).sqrt().float())


def explained(images: torch.Tensor, vae: ToyVAE) -> float:
    """Share of the patches' variance (about the mean) that ``vae``'s components keep."""
    full = fit_vae(images, PATCH_VALUES)
    return float((vae.spread ** 2).sum() / (full.spread ** 2).sum())


# --- files -----------------------------------------------------------------------------------

def save_vae(path: str, vae: ToyVAE, metadata: dict[str, str]) -> str:
    tensors = {"mean": vae.mean, "components": vae.components, "spread": vae.spread}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                                    metadata={"format": FORMAT, **{k: str(v) for k, v in metadata.items()}})
    return path


def load_vae(path: str | None = None) -> ToyVAE:
    path = path or VAE_WEIGHTS
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no toy VAE at {path}; build it with `python -m toyworld.vae --out {path}`")
    with safetensors.safe_open(path, framework="pt") as f:
        fmt = (f.metadata() or {}).get("format")
    if fmt != FORMAT:
        raise ValueError(f"{path} is not a toy VAE (format {fmt!r}, expected {FORMAT!r})")
    state = safetensors.torch.load_file(path)
    return ToyVAE(state["mean"], state["components"], state["spread"])


def vae_digest(vae: ToyVAE) -> str:
    """sha256 of the code's tensors, not of the file: safetensors writes its metadata in another
    order on every run, so a VAE rebuilt on the same machine has other bytes but the same digest."""
    digest = hashlib.sha256()
    for tensor in (vae.mean, vae.components, vae.spread):
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


_SHIPPED: ToyVAE | None = None


def shipped_vae() -> ToyVAE:
    """The VAE in toyworld/weights, loaded once."""
    global _SHIPPED
    if _SHIPPED is None:
        _SHIPPED = load_vae(VAE_WEIGHTS)
    return _SHIPPED


# --- building --------------------------------------------------------------------------------

def fitting_images(count: int, seed: int) -> torch.Tensor:
    """``count`` images drawn as the base model's training data is (train_base.training_example)."""
    from .train_base import BaseTrainConfig, training_example  # the base trainer imports this module
    rng = np.random.default_rng(seed)
    defaults = BaseTrainConfig()
    return torch.from_numpy(np.stack([training_example(rng, defaults.design_fraction)[0] for _ in range(count)]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toyworld.vae", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--images", type=int, default=2048, help="images whose patches are fitted")
    parser.add_argument("--channels", type=int, default=LATENT_CHANNELS)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    images = fitting_images(args.images, args.seed)
    vae = fit_vae(images, args.channels)
    kept = explained(images, vae)
    log.info("%d components keep %.2f %% of the patch variance of %d images", args.channels, 100 * kept, args.images)
    save_vae(args.out, vae, {"script_version": SCRIPT_VERSION, "images": args.images, "seed": args.seed,
                             "channels": args.channels, "explained": f"{kept:.4f}", "built_on": arithmetic()})
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
