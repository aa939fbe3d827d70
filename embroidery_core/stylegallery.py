"""StyleGallery's matching and regional stylisation in plain torch (METHODS.md section 4).

Each content region takes the best-matching region of any style image by

    score = 0.25 cos(stat) + 1.0 cos(semantic) + 0.125 IoU(minimum enclosing circles),

then the content latent is optimised directly (Adam on the latent, no sampler step) so that, in
the last self-attention layers, each content region's attention output matches what its queries
would read from the matched style region's keys and values (the regional style loss), while its
queries stay near the content's (the content loss).

Reading order: geometry (enclosing circles), descriptors and matching, the losses, the loop.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .regions import region_masks


@dataclass(frozen=True)
class MatchWeights:
    stat: float = 0.25
    semantic: float = 1.0
    circle: float = 0.125


def ddim_leading(steps: int, total: int = 1000, offset: int = 1) -> tuple[int, ...]:
    """The timesteps of diffusers' DDIM with "leading" spacing and SD1.5's offset, descending:
    150 steps give 895, 889, ..., 1 (the official standard list)."""
    stride = total // steps
    return tuple(stride * i + offset for i in reversed(range(steps)))


# the official fast preset's 28 timesteps (LCM scheduler over 50 original steps, diffusers)
LCM_TIMESTEPS = (999, 979, 939, 899, 859, 839, 799, 759, 719, 679, 659, 619, 579, 539, 499, 479, 439, 399, 359, 339,
                 299, 259, 219, 179, 159, 119, 79, 39)


@dataclass(frozen=True)
class StylizeConfig:
    """The official stylisation's constants: one Adam step on the latent per timestep of a
    descending list (``repeats`` per timestep), loss = style + ``content_weight`` x content over
    the decoder's last ``layers`` self-attention layers. ``fast()`` is the official LCM preset
    (28 timesteps x 3, meant for a model with the LCM LoRA loaded)."""

    timesteps: tuple[int, ...] = ddim_leading(150)
    repeats: int = 1
    learning_rate: float = 0.05
    content_weight: float = 0.26
    query_scale: float = 1.5
    layers: int = 6

    @classmethod
    def fast(cls) -> "StylizeConfig":
        return cls(timesteps=LCM_TIMESTEPS, repeats=3, learning_rate=0.25, content_weight=0.33)

    @property
    def iterations(self) -> int:
        return len(self.timesteps) * self.repeats


# ---------------------------------------------------------------------------- geometry


def mask_circle(mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    """A region's circle as the official code draws it (it calls it the minimum enclosing
    circle): centred on the mask's centroid, reaching its farthest pixel; in coordinates
    normalised to 0..1 (x, y), so masks of images of different sizes compare (the official masks
    are all 64 x 64, where this is the same IoU)."""
    h, w = mask.shape
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if len(xs) == 0:
        raise ValueError("an empty mask has no circle")
    points = torch.stack([(xs.double() + 0.5) / w, (ys.double() + 0.5) / h], dim=1)
    centre = points.mean(dim=0)
    return centre.float(), float((points - centre).norm(dim=1).max())


def circle_iou(a: tuple[torch.Tensor, float], b: tuple[torch.Tensor, float]) -> float:
    """Intersection over union of two discs (exact lens area)."""
    (ca, ra), (cb, rb) = a, b
    d = float(torch.linalg.norm(ca.double() - cb.double()))
    if ra <= 0 or rb <= 0:
        return 0.0
    if d >= ra + rb:
        inter = 0.0
    elif d <= abs(ra - rb):
        inter = math.pi * min(ra, rb) ** 2
    else:
        alpha = math.acos(max(-1.0, min(1.0, (d * d + ra * ra - rb * rb) / (2 * d * ra))))
        beta = math.acos(max(-1.0, min(1.0, (d * d + rb * rb - ra * ra) / (2 * d * rb))))
        inter = ra * ra * alpha + rb * rb * beta - 0.5 * math.sqrt(
            max(0.0, (-d + ra + rb) * (d + ra - rb) * (d - ra + rb) * (d + ra + rb)))
    union = math.pi * (ra * ra + rb * rb) - inter
    return inter / union


# ---------------------------------------------------------------------------- descriptors


class StatEncoder(torch.nn.Module):
    """The official "stat" encoder: a randomly initialised, never trained transformer (8
    pre-norm layers, 4 heads, MLP 4x, GELU, no dropout, no positions) over a region's feature
    vectors, one token per pixel. The official code draws its weights from the global generator;
    here they come from a fixed seed, so a region always gets the same descriptor."""

    def __init__(self, dim: int, layers: int = 8, heads: int = 4, seed: int = 0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"the stat encoder's width {dim} must be a multiple of its {heads} heads")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layer = torch.nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0,
                                                     activation="gelu", batch_first=True, norm_first=True)
            self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder(tokens.float()[None])[0]


def stat_descriptor(encoder: StatEncoder, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean (+) "variance" of the encoder's outputs for a region of features [C, h, w], as the
    official code computes them: the outputs are put back in a zero map of all N positions; the
    mean is their sum over the n region pixels / n, the variance the unbiased variance over all
    N positions (zeros included) / n. (That variance is tiny next to the mean, so the term mostly
    compares means; kept as published.)"""
    m = _resized(mask, features.shape[-2:]) > 0.5
    if not m.any():
        raise ValueError("the region covers no position of the feature map")
    c = features.shape[0]
    out = torch.zeros(c, m.numel(), dtype=torch.float32)
    out[:, m.flatten()] = encoder(features[:, m].T).T
    n = float(m.sum())
    return torch.cat([out.sum(dim=1) / n, out.var(dim=1) / n])


def _resized(mask: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(mask[None, None].float(), size=tuple(size), mode="nearest")[0, 0]


def masked_mean(features: torch.Tensor, mask: torch.Tensor, min_cover: float = 10 / 1024) -> torch.Tensor:
    """Mean of features [C, h, w] over the positions whose cell the mask covers by more than
    ``min_cover`` (the official DINOv2 pooling keeps a 32 x 32 px patch with > 10 mask pixels);
    a mask too small for any cell takes its best-covered one."""
    cover = F.adaptive_avg_pool2d(mask[None, None].float(), features.shape[-2:])[0, 0]
    keep = cover > min_cover
    if not keep.any():
        keep = cover >= cover.max()
    return features[:, keep].float().mean(dim=1)


@dataclass
class RegionDescriptor:
    stat: torch.Tensor
    semantic: torch.Tensor
    circle: tuple[torch.Tensor, float]


def describe(features: torch.Tensor, semantic: torch.Tensor, mask: torch.Tensor,
             encoder: StatEncoder) -> RegionDescriptor:
    """One region's descriptor: the stat encoder on its decoder features, the mean semantic
    feature (DINOv2 patch tokens [D, p, p], or the decoder features without CLIP vision) under it
    and its circle."""
    return RegionDescriptor(stat_descriptor(encoder, features, mask), masked_mean(semantic, mask), mask_circle(mask))


def match_score(content: RegionDescriptor, style: RegionDescriptor, weights: MatchWeights = MatchWeights()) -> float:
    return (weights.stat * float(F.cosine_similarity(content.stat, style.stat, dim=0))
            + weights.semantic * float(F.cosine_similarity(content.semantic, style.semantic, dim=0))
            + weights.circle * circle_iou(content.circle, style.circle))


def match_regions(content: list[RegionDescriptor], styles: list[list[RegionDescriptor]],
                  weights: MatchWeights = MatchWeights()) -> list[tuple[int, int, float]]:
    """For each content region, (style image, style region, score) of the best match over every
    region of every style image (several content regions may take the same one; ties go to the
    first)."""
    if not styles or not any(styles):
        raise ValueError("no style region to match")
    out = []
    for c in content:
        scored = [(match_score(c, s, weights), i, j) for i, regions in enumerate(styles) for j, s in enumerate(regions)]
        score, i, j = max(scored, key=lambda v: (v[0], -v[1], -v[2]))
        out.append((i, j, score))
    return out


def matched_pairs(content: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                  styles: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], seed: int = 0):
    """The matching step end to end. Each image is (labels [h, w], decoder features [C, h, w],
    semantic features [D, p, p]); one seeded stat encoder serves them all. Returns the matches
    [(style image, style region, score)] per content region and the (content mask, style image,
    style mask) pairs :func:`stylize` takes."""
    encoder = StatEncoder(content[1].shape[0], seed=seed)

    def descriptors(labels, features, semantic):
        return [describe(features, semantic, m, encoder) for m in region_masks(labels)]

    matches = match_regions(descriptors(*content), [descriptors(*s) for s in styles])
    content_masks = region_masks(content[0])
    pairs = [(content_masks[c], s, region_masks(styles[s][0])[j]) for c, (s, j, _) in enumerate(matches)]
    return matches, pairs


# ---------------------------------------------------------------------------- losses


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.reshape(b, n, heads, d // heads).transpose(1, 2)


def regional_style_loss(out: torch.Tensor, q: torch.Tensor, k_style: torch.Tensor, v_style: torch.Tensor,
                        content_mask: torch.Tensor, style_mask: torch.Tensor, heads: int,
                        query_scale: float = 1.5) -> torch.Tensor:
    """|| out * M_c - SDPA(s q * M_c, K_s * M_s, V_s * M_s) ||_1 (mean over every element) for
    one matched pair in one layer, the target without gradient. ``out`` and ``q`` [B, N, D] are
    the current latent's attention output and queries, ``k_style``/``v_style`` [B, M, D] the
    style image's; masks are per token, [N] and [M]. Masked tokens are zeroed, not removed, as in
    the official code: a zeroed key still takes part in the softmax with logit 0. The target is
    masked by M_c too (the official code leaves it unmasked; outside M_c that only adds a
    constant without gradient, so the optimisation is the same and a perfect match reads 0)."""
    mc = content_mask.to(out.device, out.dtype)[None, :, None]  # masks live on the CPU, the UNet maybe not
    ms = style_mask.to(out.device, out.dtype)[None, :, None]
    if not style_mask.any():
        raise ValueError("the style region covers no token of this layer")
    with torch.no_grad():
        target = F.scaled_dot_product_attention(_heads(query_scale * q * mc, heads), _heads(k_style * ms, heads),
                                                _heads(v_style * ms, heads))
        target = target.transpose(1, 2).reshape(out.shape)
    return (out * mc - target * mc).abs().mean()


def content_loss(q: torch.Tensor, q_content: torch.Tensor) -> torch.Tensor:
    """|| Q - Q_c ||_1 (mean): the queries of the current latent stay those of the content."""
    return (q - q_content.detach()).abs().mean()


def token_mask(mask: torch.Tensor, tokens: int) -> torch.Tensor:
    """A boolean mask [h, w] (at its image's aspect) resized (nearest) to a layer's token grid of
    ``tokens`` tokens; flattened row-major, as the UNet's tokens are."""
    height, width = mask.shape
    scale = math.sqrt(height * width / tokens)
    h, w = round(height / scale), round(width / scale)
    if h * w != tokens:
        raise ValueError(f"{tokens} tokens do not fit the grid of a {height} x {width} mask")
    return (F.interpolate(mask[None, None].float(), size=(h, w), mode="nearest")[0, 0] > 0.5).flatten()


# ---------------------------------------------------------------------------- the loop


@dataclass
class LayerFeatures:
    """One self-attention layer's tensors for one image: queries, keys, values and output [B, N, D]
    (heads side by side in D), and its number of heads."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    heads: int


FeatureFn = Callable[[torch.Tensor, int], list[LayerFeatures]]  # (latent, timestep) -> per layer


def standardise_channels(latent: torch.Tensor) -> torch.Tensor:
    """Each position of a latent [B, C, h, w] standardised across its channels (unbiased), the
    official start of the optimisation from the inverted content latent."""
    return (latent - latent.mean(dim=1, keepdim=True)) / (latent.std(dim=1, keepdim=True) + 1e-8)


def stylize_loss(current: list[LayerFeatures], content: list[LayerFeatures], styles: list[list[LayerFeatures]],
                 pairs: list[tuple[torch.Tensor, int, torch.Tensor]], content_weight: float,
                 query_scale: float) -> torch.Tensor:
    """L_RSL + w L_GCL at one timestep: the regional style loss summed over matched pairs and
    layers, plus the content loss summed over layers. ``pairs`` are (content mask, style image,
    style mask), masks [h, w] at their images' aspect. A style region finer than a layer's token
    grid (a thin outline, a small island: no token left after the nearest resize) adds nothing
    at that layer and is styled by the layers that see it; with zeroed keys and values its
    target would be zero, which would push the content region's output to zero instead."""
    loss = current[0].q.new_zeros(())
    for layer, (now, own) in enumerate(zip(current, content)):
        tokens = now.q.shape[1]
        for content_mask, s, style_mask in pairs:
            style = styles[s][layer]
            style_tokens = token_mask(style_mask, style.k.shape[1])
            if not style_tokens.any():
                continue
            loss = loss + regional_style_loss(now.out, now.q, style.k, style.v, token_mask(content_mask, tokens),
                                              style_tokens, now.heads, query_scale)
        loss = loss + content_weight * content_loss(now.q, own.q)
    return loss


def stylize(latent: torch.Tensor, features: FeatureFn, content_latent: torch.Tensor,
            style_latents: list[torch.Tensor], pairs: list[tuple[torch.Tensor, int, torch.Tensor]],
            config: StylizeConfig = StylizeConfig(), on_step: Callable[[int, float], None] | None = None) -> torch.Tensor:
    """StyleGallery's optimisation: Adam on ``latent`` (the standardised inverted content), one
    step per timestep of ``config.timesteps`` (``repeats`` each). At every timestep the UNet runs
    on the current latent with gradients and on the clean content and style latents without
    (``features(latent, t)``, as the official code: nothing is noised), and the loss is
    :func:`stylize_loss`. The result is decoded as it is (no sampler step)."""
    x = latent.detach().clone().float().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=config.learning_rate)
    step = 0
    for t in config.timesteps:
        with torch.no_grad():
            content = features(content_latent, t)
            styles = [features(s, t) for s in style_latents]
        for _ in range(config.repeats):
            loss = stylize_loss(features(x, t), content, styles, pairs, config.content_weight, config.query_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if on_step is not None:
                on_step(step, float(loss.detach()))
            step += 1
    return x.detach()


# ---------------------------------------------------------------------------- on a plain UNet


def attention_layers(arch, count: int = 6) -> list[str]:
    """The decoder's last ``count`` self-attention layers (attn1 of each transformer layer, in
    execution order): SD1.5's output_blocks.6.1-11.1 (the official up_blocks.2 and 3), SDXL's
    output_blocks.3.1-5.1 with their two layers each (our extension)."""
    layers = [f"{b}.transformer_blocks.{i}.attn1" for b in arch.attention_blocks() if b.startswith("output_blocks")
              for i in range(arch.transformer_depth(b))]
    if len(layers) < count:
        raise ValueError(f"{arch.name} has {len(layers)} decoder self-attention layers, fewer than {count}")
    return layers[-count:]


class AttentionRecorder:
    """Forward wrappers (``adapters.installed``) on a plain UNet that keep, with their graph, the
    projected q, k, v and the attention output (``to_out.0``'s input) of ``layers``."""

    def __init__(self, layers: list[str], heads: dict[str, int]):
        self.layers, self.heads = layers, heads
        self.names = [f"{layer}.{p}" for layer in layers for p in ("to_q", "to_k", "to_v", "to_out.0")]
        self.store: dict[str, torch.Tensor] = {}

    def wrap(self, name: str, original):
        def forward(x, *args, **kwargs):
            out = original(x, *args, **kwargs)
            self.store[name] = x if name.endswith("to_out.0") else out
            return out

        return forward

    def collect(self) -> list[LayerFeatures]:
        return [LayerFeatures(*(self.store[f"{layer}.{p}"] for p in ("to_q", "to_k", "to_v", "to_out.0")),
                              heads=self.heads[layer]) for layer in self.layers]
