"""DiffStyler in the sampler graph (METHODS.md section 3): the source's DDIM inversion."""
from __future__ import annotations

import torch

import comfy.utils
from comfy_api.latest import io

from ..embroidery_core.diffstyler import ddim_sample, ddim_sigmas, invert, Inversion
from . import comfy_training as ct
from .common import CATEGORY, NodeInputError, PackNode

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
                                              "see how much of the source the inversion keeps.")],
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
        return io.NodeOutput(inversion, out(inversion.noisy), out(back))


DIFFSTYLER_NODES: list[type[io.ComfyNode]] = [EmbroideryInvert]
