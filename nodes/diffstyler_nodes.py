"""DiffStyler in the sampler graph (METHODS.md section 3): the source's DDIM inversion, and a
GUIDER for SamplerCustomAdvanced that runs the source, base and style branches of every step.

Per-branch models without re-patching: every style MODEL must be the base model with a LoRA
loaded on it; the weight patches it adds are put on one clone of the base as weight wrappers,
each style's behind its own gate (off except during that style's passes). The source's
injection is an attn1 replace patch (ComfyUI hands it the projected q, k, v) and an object patch
on the feature block's ``out_layers`` that shares its child modules, so every weight key stays.
"""
from __future__ import annotations

import math

import torch

import comfy.model_management as mm
import comfy.samplers
import comfy.utils
from comfy_api.latest import io

from ..embroidery_core.diffstyler import (Branch, Inversion, Schedule, SourceInjection, ddim_sample, ddim_sigmas,
                                          fused_step, injection_blocks, invert, latent_masks)
from ..embroidery_core.guidance import StyleGate, copy_conds
from . import comfy_training as ct
from .common import CATEGORY, NodeInputError, PackNode, model_family

InversionType = io.Custom("EMBROIDERY_INVERSION")  # embroidery_core.diffstyler.Inversion
MAX_STEPS = 1000


class EmbroideryInvert(PackNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EmbroideryInvert",
            display_name="Embroidery DDIM Inversion",
            category=f"{CATEGORY}/sampling",
            description="DDIM inversion of a source latent (DiffStyler's content branch): the latent at every level "
                        "of a DDIM schedule, the fully noised latent to start sampling from, and the reconstruction "
                        "that sampling back gives (how faithful the inversion is).",
            inputs=[
                io.Model.Input("model", tooltip="An eps or v model (SD1.5, SD2.x, SDXL); it is cloned, never modified."),
                io.Latent.Input("latent", tooltip="The source image's latent (VAE Encode of the photo or design)."),
                io.Int.Input("steps", default=50, min=1, max=MAX_STEPS,
                             tooltip="DDIM levels; the DiffStyler sampler replays one per step. More steps invert more "
                                     "faithfully (the official code inverts over 999)."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="The prompt the inversion runs with; DiffStyler uses the empty prompt "
                                              "(a CLIP Text Encode of ''). Without it, connect clip."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Used to encode the empty prompt when no conditioning is connected."),
            ],
            outputs=[InversionType.Output(display_name="inversion", tooltip="The latent at every level, for DiffStyler."),
                     io.Latent.Output(display_name="noisy", tooltip="The fully inverted latent, where sampling starts."),
                     io.Latent.Output(display_name="reconstruction",
                                      tooltip="Deterministic DDIM back from 'noisy' with the same prompt: decode it to "
                                              "see how much of the source the inversion keeps."),
                     io.Sigmas.Output(display_name="sigmas",
                                      tooltip="The inversion's levels: connect them to SamplerCustomAdvanced's sigmas "
                                              "when it samples with the DiffStyler guider.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, latent, steps, conditioning=None, clip=None) -> io.NodeOutput:
        node = "Embroidery DDIM Inversion"
        prediction = ct.prediction_type(model)
        if prediction not in ("eps", "v"):
            raise NodeInputError(node, f"DDIM inversion needs an eps or v model, this one predicts {prediction}")
        if conditioning is None and clip is None:
            raise NodeInputError(node, "connect a conditioning (CLIP Text Encode of an empty prompt) or the clip")
        samples = latent["samples"]
        if samples.ndim != 4:
            raise NodeInputError(node, f"expected an image latent [B, C, h, w], got {tuple(samples.shape)}")
        height, width = samples.shape[2] * 8, samples.shape[3] * 8
        bar = comfy.utils.ProgressBar(2 * steps, node_id=cls.hidden.unique_id if cls.hidden is not None else None)
        with ct.training_session(model, trainable_graph=False) as clone, torch.no_grad():
            denoiser = ct.ComfyDenoiser(clone)
            device = denoiser.device
            cond = (ct.cond_from_conditioning(model, conditioning, height, width, device) if conditioning is not None
                    else ct.encode_prompt(clip, model, "", height, width, device))
            source = model.model.process_latent_in(samples.float()).to(device)
            schedule = denoiser.sampling.sigmas.float().cpu()

            def run(x_t, sigma):
                bar.update(1)  # Cancel raises from here between model passes
                return ct.interruptible(denoiser)(x_t, sigma, cond)

            sigmas = ddim_sigmas(schedule, steps)
            inversion = invert(run, prediction, source, sigmas, float(schedule[0]))
            back = ddim_sample(run, prediction, inversion.noisy, sigmas)
        inversion = Inversion(inversion.sigmas, inversion.latents.cpu())
        out = lambda x: {"samples": model.model.process_latent_out(x.cpu().float())}  # noqa: E731
        return io.NodeOutput(inversion, out(inversion.noisy), out(back), inversion.sigmas.clone())


# ---------------------------------------------------------------------------- the guider

MAX_STYLES = 3
DIFFSTYLER = "Embroidery DiffStyler"


def style_patches(base, style, what: str) -> dict[str, list]:
    """The weight patches ``style`` carries beyond ``base``'s: what a LoRA loader added to a clone
    of the base model (any LoRA format ComfyUI loads). Errors name ``what`` and the fix."""
    if style.model is not base.model:
        raise NodeInputError(DIFFSTYLER, f"{what} is not the base model with a LoRA on it; connect the model you "
                                         f"connect to 'model' through a LoRA loader (Load LoRA, Load Style Blocks of a "
                                         f"LoRA) into {what}")
    extra = {}
    for key in set(base.patches) | set(style.patches):
        mine, theirs = base.patches.get(key, []), style.patches.get(key, [])
        if len(theirs) < len(mine) or any(a is not b for a, b in zip(mine, theirs)):
            raise NodeInputError(DIFFSTYLER, f"{what} lacks a LoRA that 'model' has ({key}); load the style LoRA on "
                                             "top of the model you connect to 'model'")
        if len(theirs) > len(mine):
            extra[key] = theirs[len(mine):]
    if not extra:
        raise NodeInputError(DIFFSTYLER, f"{what} carries no LoRA beyond 'model'; load the style's LoRA on it")
    return extra


class GatedPatches:
    """A weight wrapper: ComfyUI's own ``calculate_weight`` of one style's patches while its gate
    is on (that style's passes), the weight untouched otherwise."""

    def __init__(self, key: str, patches: list, gate: StyleGate):
        self.key, self.patches, self.gate = key, patches, gate

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.gate.enabled:
            return weight
        import comfy.lora

        return comfy.lora.calculate_weight(self.patches, weight.to(torch.float32, copy=True), self.key).to(weight.dtype)


class AttentionBlend:
    """An attn1 replace patch: DiffStyler's q/k record or blend, then ComfyUI's own attention."""

    def __init__(self, injection: SourceInjection, layer: str):
        self.injection, self.layer = injection, layer

    def __call__(self, q, k, v, extra_options):
        import comfy.ldm.modules.attention as attention

        q, k = self.injection.query_key(self.layer, q, k)
        return attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                             attn_precision=extra_options.get("attn_precision"))


class FeatureTap(torch.nn.Sequential):
    """Stands in for a ResBlock's ``out_layers`` (object patch): the same child modules, so every
    weight key and patch still applies, and its output goes through the injection."""

    def __init__(self, layers: torch.nn.Sequential, injection: SourceInjection):
        super().__init__(*layers)
        self.injection = injection

    def forward(self, x):
        return self.injection.feature_output(super().forward(x))


def _attn1_key(layer: str) -> tuple[str, int, int]:
    """"output_blocks.4.1.transformer_blocks.0.attn1" -> ("output", 4, 0), ComfyUI's patch key."""
    parts = layer.split(".")
    return "output", int(parts[1]), int(parts[4])


def injected_clone(model, injection: SourceInjection, feature_block: str):
    """A clone of the base with the source injection patched in (nothing else changes)."""
    clone = model.clone()
    replaces = clone.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn1", {})
    for layer in injection.layers:
        block, number, index = _attn1_key(layer)
        if (block, number, index) in replaces or (block, number) in replaces:
            raise NodeInputError(DIFFSTYLER, f"another node already replaces the self-attention of {layer} on this "
                                             "model; DiffStyler needs it: connect the model before that node")
        clone.set_model_attn1_replace(AttentionBlend(injection, layer), block, number, index)
    path = f"diffusion_model.{feature_block}"
    resblock = clone.get_model_object(path)
    if getattr(resblock, "use_scale_shift_norm", False) or not isinstance(getattr(resblock, "out_layers", None),
                                                                          torch.nn.Sequential):
        raise NodeInputError(DIFFSTYLER, f"{feature_block} of this model is not an SD ResBlock; DiffStyler's feature "
                                         "injection does not fit it")
    clone.add_object_patch(f"{path}.out_layers", FeatureTap(resblock.out_layers, injection))
    return clone


class DiffStylerGuider(comfy.samplers.CFGGuider):
    """CFG after DiffStyler's fusion: each step, the base and every style branch replay the
    inverted source of that level through their own model, then predict with its queries, keys
    and features injected; the style predictions replace the base's inside their masks."""

    def __init__(self, model_patcher, inversion: Inversion, injection: SourceInjection,
                 gates: list[StyleGate], masks: list, schedule: Schedule):
        super().__init__(model_patcher)
        self.inversion, self.injection, self.gates = inversion, injection, gates
        self.masks, self.schedule = masks, schedule

    def set_conds(self, positive, negative, source, styles):
        self.inner_set_conds({"positive": positive, "negative": negative, "source": source,
                              **{f"style_{i}": c for i, c in enumerate(styles)}})

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
               seed=None):
        # the checks a user's graph can fail, before any model pass
        if torch.count_nonzero(noise) > 0:
            raise NodeInputError(DIFFSTYLER, "the sampler adds noise to the inverted latent; connect a Disable Noise "
                                             "node to SamplerCustomAdvanced's noise")
        expected = tuple(self.inversion.latents.shape[1:])
        if tuple(latent_image.shape) != expected:
            raise NodeInputError(DIFFSTYLER, f"the sampler's latent is {tuple(latent_image.shape)}, the inversion's "
                                             f"{expected}; connect the inversion's 'noisy' latent to the sampler")
        try:
            for sigma in sigmas[:-1].tolist():
                self.inversion.level(sigma)
        except ValueError as e:
            raise NodeInputError(DIFFSTYLER, f"{e}: connect Embroidery DDIM Inversion's sigmas output to "
                                             "SamplerCustomAdvanced") from e
        return super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)

    def _passes(self, positive: str, timestep, model_options):
        def run(conds, x):
            mm.throw_exception_if_processing_interrupted()  # Cancel between the step's model passes
            return comfy.samplers.calc_cond_batch(self.inner_model, [copy_conds(c) for c in conds], x, timestep,
                                                  model_options)

        source = lambda x, sigma: run([self.conds["source"]], x)  # noqa: E731
        predict = lambda x, sigma: tuple(run([self.conds["negative"], self.conds[positive]], x))  # noqa: E731
        return source, predict

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        index = self.inversion.level(float(timestep.flatten()[0]))
        steps = len(self.inversion.sigmas) - 1
        source = self.inversion.latents[index].to(x.device, x.dtype)
        t = float(self.inner_model.model_sampling.timestep(timestep).flatten()[0])
        masks = latent_masks([m for m in self.masks if m is not None], x.shape[-2], x.shape[-1])
        if len(masks) < len(self.gates):  # a single style without a mask covers the picture
            masks = [torch.ones(1, 1, *x.shape[-2:], dtype=torch.bool)]
        branches = [Branch(*self._passes("positive", timestep, model_options))]
        for i, (gate, mask) in enumerate(zip(self.gates, masks)):
            branches.append(Branch(*self._passes(f"style_{i}", timestep, model_options), mask=mask.to(x.device),
                                   active=gate.active))
        negative, positive = fused_step(self.injection, branches, self.schedule, index, steps, x, source, timestep, t)
        return comfy.samplers.cfg_function(self.inner_model, positive, negative, self.cfg, x, timestep,
                                           model_options=model_options, cond=self.conds["positive"],
                                           uncond=self.conds["negative"])


def _style_inputs(i: int) -> list:
    first = i == 1
    where = "Style 1" if first else f"Optional style {i}"
    return [
        io.Model.Input(f"style_model_{i}", optional=not first,
                       tooltip=f"{where}: the base model with this style's LoRA loaded on it (Load LoRA, Load Style "
                               "Blocks of a LoRA...). Only its weight patches are used."),
        io.Conditioning.Input(f"style_positive_{i}", optional=not first,
                              tooltip=f"{where}: this style's prompt, with its trigger word (e.g. 'a photo in <sks> "
                                      "embroidery style')."),
        io.Mask.Input(f"mask_{i}", optional=True,
                      tooltip=f"{where}: where this style replaces the base (white; the first mask of a batch). "
                              "Optional with one style (it then covers the picture); needed with two or three. "
                              "Where masks overlap, the later style wins."),
    ]


def _active_styles(entries: dict) -> list[tuple[int, object, object, object]]:
    """``[(index, style_model, style_positive, mask)]`` of the entries in use; half-filled ones are errors."""
    active = []
    for i in range(1, MAX_STYLES + 1):
        model, positive, mask = (entries.get(f"{n}_{i}") for n in ("style_model", "style_positive", "mask"))
        if model is None and positive is None and mask is None:
            continue
        if model is None or positive is None:
            missing = "style_model" if model is None else "style_positive"
            raise NodeInputError(DIFFSTYLER, f"style {i} needs both style_model_{i} and style_positive_{i}; connect "
                                             f"{missing}_{i} or disconnect the others")
        active.append((i, model, positive, mask))
    if not active:
        raise NodeInputError(DIFFSTYLER, "connect style_model_1 and style_positive_1")
    if len(active) > 1 and any(a[3] is None for a in active):
        raise NodeInputError(DIFFSTYLER, "with several styles each needs its mask: connect mask_"
                                         f"{next(a[0] for a in active if a[3] is None)}")
    return active


def _check_mask(mask: torch.Tensor, i: int, latent_shape) -> torch.Tensor:
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise NodeInputError(DIFFSTYLER, f"mask_{i} must be a MASK [B, H, W], got {tuple(mask.shape)}")
    height, width = latent_shape[-2:]
    if not math.isclose(mask.shape[-2] / mask.shape[-1], height / width, rel_tol=0.05):
        raise NodeInputError(DIFFSTYLER, f"mask_{i} is {mask.shape[-1]} x {mask.shape[-2]} px, not the source's "
                                         f"aspect ({width * 8} x {height * 8}); draw it on the source image")
    if not bool((mask[:1] > 0.5).any()):
        raise NodeInputError(DIFFSTYLER, f"mask_{i} is empty (nothing above 0.5); paint the region the style covers")
    return mask[:1].float().cpu()


class EmbroideryDiffStyler(PackNode):
    @classmethod
    def define_schema(cls):
        styles = [x for i in range(1, MAX_STYLES + 1) for x in _style_inputs(i)]
        return io.Schema(
            node_id="EmbroideryDiffStyler",
            display_name=DIFFSTYLER,
            category=f"{CATEGORY}/sampling",
            description="DiffStyler as a GUIDER for SamplerCustomAdvanced: the source photo's structure is kept by "
                        "replaying its DDIM inversion and injecting its features and self-attention into every "
                        "branch (the style LoRA copies too); up to three style LoRAs each restyle their mask. "
                        "Sample with the inversion's sigmas, its noisy latent and Disable Noise.",
            inputs=[
                io.Model.Input("model", tooltip="The base model (the one the inversion ran with). It is cloned, never "
                                                "modified."),
                io.Conditioning.Input("positive", tooltip="The base branch's prompt, outside the style masks (the "
                                                          "official code uses the empty prompt)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt of every branch (official: 'ugly, "
                                                          "blurry, black, low res, unrealistic')."),
                io.Conditioning.Input("source", tooltip="The prompt the inversion ran with (the empty prompt): the "
                                                        "source branch replays the inverted latent with it."),
                InversionType.Input("inversion", tooltip="From Embroidery DDIM Inversion of the source's latent."),
                io.Float.Input("cfg", default=10.5, min=0.0, max=30.0, step=0.1,
                               tooltip="Classifier-free guidance, applied after the fusion (official: 10.5)."),
                io.Float.Input("feature_fraction", default=0.6, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of the steps (from the first) in which the style branches take the "
                                       "source's decoder features (official: 30 of 50). The base branch always does. "
                                       "Lower = more of the style's own shapes."),
                io.Float.Input("attention_fraction", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of the steps in which the style branches blend the source's self-attention "
                                       "queries and keys, r = min(1, 2t/1000) (official: 25 of 50)."),
                *styles,
            ],
            outputs=[io.Guider.Output(tooltip="For SamplerCustomAdvanced, with the inversion's sigmas and noisy "
                                              "latent and a Disable Noise node.")],
        )

    @classmethod
    def execute(cls, model, positive, negative, source, inversion, cfg, feature_fraction, attention_fraction,
                **entries) -> io.NodeOutput:
        if not isinstance(inversion, Inversion):
            raise NodeInputError(DIFFSTYLER, "inversion must come from Embroidery DDIM Inversion")
        active = _active_styles(entries)
        masks = [None if mask is None else _check_mask(mask, i, inversion.latents.shape) for i, _, _, mask in active]
        patches = [style_patches(model, style, f"style_model_{i}") for i, style, _, _ in active]
        feature, attention = injection_blocks(model_family(model, DIFFSTYLER))
        injection = SourceInjection(model_family(model, DIFFSTYLER), attention, feature)
        clone = injected_clone(model, injection, feature)
        weights = {name for name, _ in model.model.named_parameters()}
        gates = []
        for (i, _, _, _), extra in zip(active, patches):
            gate = StyleGate()
            for key, entries_of_key in extra.items():
                if key not in weights:
                    raise NodeInputError(DIFFSTYLER, f"style_model_{i} patches {key}, which is no weight of this model")
                clone.add_weight_wrapper(key, GatedPatches(key, entries_of_key, gate))
            gates.append(gate)
        guider = DiffStylerGuider(clone, inversion, injection, gates, masks,
                                  Schedule(float(feature_fraction), float(attention_fraction)))
        guider.set_conds(positive, negative, source, [p for _, _, p, _ in active])
        guider.set_cfg(float(cfg))
        return io.NodeOutput(guider)


DIFFSTYLER_NODES: list[type[io.ComfyNode]] = [EmbroideryInvert, EmbroideryDiffStyler]
