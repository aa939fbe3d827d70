"""The bridge between ComfyUI's model objects and embroidery_core's trainers.

Everything installed on a model goes through a ModelPatcher clone's object patches (each
target module's ``forward``; inference-mode parameters swapped for trainable-graph copies),
so the shared model is untouched and ComfyUI restores everything when the clone is unloaded,
which :func:`training_session` forces in ``finally``.
"""
from __future__ import annotations

import contextlib
import logging

import torch

import comfy.model_management as mm
import comfy.model_sampling
import comfy.utils

from ..embroidery_core.diffusion import Cond, model_input
from ..embroidery_core.trainer import check_losses

log = logging.getLogger(__name__)


def prediction_type(model) -> str:
    """"eps", "v" or "flow": what the raw UNet output of ``model`` is, for the targets in
    embroidery_core.diffusion. Those assume sigma_data 1 (every SD1.5/SDXL checkpoint), so EDM and
    x0 parameterisations (which subclass ComfyUI's V_PREDICTION and EPS) are refused rather than
    trained against the wrong target."""
    sampling = model.get_model_object("model_sampling")
    name = type(sampling).__name__
    fix = ("remove the ModelSampling node in front of this one, or load a standard eps or "
           "v-prediction SD1.5/SDXL checkpoint")
    refused = tuple(getattr(comfy.model_sampling, n) for n in ("EDM", "X0") if hasattr(comfy.model_sampling, n))
    if isinstance(sampling, refused):
        kind = next(c.__name__ for c in refused if isinstance(sampling, c))
        raise ValueError(f"the model samples with {kind} prediction ({name}), which the trainers do not implement; {fix}")
    sigma_data = float(getattr(sampling, "sigma_data", 1.0))
    if sigma_data != 1.0:
        raise ValueError(f"the model's sampling has sigma_data {sigma_data:g}; the trainers need 1 (SD's own); {fix}")
    if isinstance(sampling, comfy.model_sampling.CONST):
        return "flow"
    if isinstance(sampling, comfy.model_sampling.V_PREDICTION):
        return "v"
    if isinstance(sampling, comfy.model_sampling.EPS):
        return "eps"
    raise ValueError(f"the model's sampling {name} is not eps, v-prediction or flow; {fix}")


class ComfyDenoiser:
    """embroidery_core's Denoiser over a loaded ModelPatcher: the raw UNet output in the model's
    own parameterisation (what BaseModel._apply_model computes before calculate_denoised)."""

    def __init__(self, patcher):
        self.patcher = patcher
        self.base = patcher.model
        self.sampling = patcher.get_model_object("model_sampling")
        self.prediction = prediction_type(patcher)
        self.device = patcher.load_device

    def sample_sigma(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        sigmas = self.sampling.sigmas.float().cpu()
        return sigmas[torch.randint(0, len(sigmas), (batch,), generator=generator)]

    def __call__(self, x_t: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        dtype = self.base.manual_cast_dtype or self.base.get_dtype()
        sigma = sigma.to(x_t.device)
        cond = cond.repeat_to(x_t.shape[0])
        x_in = model_input(self.prediction, x_t, sigma).to(dtype)
        timestep = self.sampling.timestep(sigma).float()
        extra = {} if cond.y is None else {"y": cond.y.to(x_t.device, dtype)}
        out = self.base.diffusion_model(x_in, timestep, context=cond.context.to(x_t.device, dtype),
                                        transformer_options={}, **extra)
        return out.float()


def _original_forward(model, path: str):
    key = f"{path}.forward"
    if key in model.object_patches:  # another pack already wraps it: keep its behaviour
        return model.object_patches[key]
    return comfy.utils.get_attr(model.model, path).forward


def install_wrappers(clone, provider, prefix: str = "diffusion_model.") -> None:
    """Object-patch ``forward`` of each module named by ``provider.names`` with ``provider.wrap``."""
    for name in provider.names:
        path = prefix + name
        clone.add_object_patch(f"{path}.forward", provider.wrap(name, _original_forward(clone, path)))


def detach_inference_parameters(clone, prefix: str = "diffusion_model.") -> int:
    """Weights created while ComfyUI ran a node are inference tensors, which autograd cannot save
    for backward. Object-patch a normal copy of each (restored when the clone unloads)."""
    count = 0
    with torch.inference_mode(False):
        for name, param in clone.model.named_parameters():
            if name.startswith(prefix) and param.is_inference() and name not in clone.object_patches:
                clone.add_object_patch(name, torch.nn.Parameter(param.detach().clone(), requires_grad=False))
                count += 1
    return count


def unload(clone) -> None:
    """Unload one patcher so its object patches (our forwards) are removed from the shared modules."""
    for i, loaded in enumerate(list(mm.current_loaded_models)):
        if loaded.model is clone:
            mm.current_loaded_models.pop(i)
            loaded.model_unload()
            return


@contextlib.contextmanager
def training_session(model, *providers, trainable_graph: bool = True):
    """A loaded clone of ``model`` with the providers' forward wrappers installed; all of it is
    undone on exit, error or Cancel included."""
    clone = model.clone()
    for provider in providers:
        install_wrappers(clone, provider)
    if trainable_graph:
        detach_inference_parameters(clone)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            mm.load_models_gpu([clone], force_full_load=True)
            yield clone
    finally:
        unload(clone)
        for provider in providers:
            _drop_restored_forwards(model, provider)


def _drop_restored_forwards(model, provider, prefix: str = "diffusion_model.") -> None:
    """ComfyUI restores an object patch by setting the old value back, which leaves the module's
    own bound ``forward`` as an instance attribute; remove it so the module is as it was."""
    for name in provider.names:
        module = comfy.utils.get_attr(model.model, prefix + name)
        restored = module.__dict__.get("forward")
        if getattr(restored, "__self__", None) is module and getattr(restored, "__func__", None) is type(module).forward:
            del module.forward


def compute_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """auto: bf16 where supported, else fp16 on GPUs, fp32 on CPU."""
    if choice == "fp32" or device.type == "cpu" and choice == "auto":
        return None
    if choice == "bf16" or choice == "auto" and mm.should_use_bf16(device, prioritize_performance=True):
        return torch.bfloat16
    return torch.float16


def encode_image(vae, model, image: torch.Tensor, device) -> torch.Tensor:
    """IMAGE [1,H,W,3] -> the model's latent space (scaled, as the UNet sees it), as a normal
    (non-inference) tensor that training graphs may use."""
    with torch.inference_mode():
        latent = model.model.process_latent_in(vae.encode(image[..., :3]))
    with torch.inference_mode(False):
        return latent.clone().to(device).float()


def encode_prompt(clip, model, text: str, height: int, width: int, device) -> Cond:
    """Text -> Cond (token context and, for SDXL, the 2816-wide ``y`` at this size)."""
    with torch.inference_mode():
        context, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        y = model.model.encode_adm(pooled_output=pooled, width=width, height=height, crop_w=0, crop_h=0,
                                   target_width=width, target_height=height, prompt_type="positive")
    with torch.inference_mode(False):
        return Cond(context.clone().to(device).float(), None if y is None else y.clone().to(device).float())


def cond_from_conditioning(model, conditioning, height: int, width: int, device) -> Cond:
    """A CONDITIONING input (its first entry) -> Cond, with SDXL's ``y`` from its pooled output at
    this size, as encode_prompt builds it."""
    if not conditioning:
        raise ValueError("the conditioning is empty; connect a CLIP Text Encode")
    context, extra = conditioning[0][0], conditioning[0][1]
    with torch.inference_mode():
        y = model.model.encode_adm(pooled_output=extra.get("pooled_output"), width=width, height=height, crop_w=0,
                                   crop_h=0, target_width=width, target_height=height, prompt_type="positive")
    with torch.inference_mode(False):
        return Cond(context.clone().to(device).float(), None if y is None else y.clone().to(device).float())


# ---------------------------------------------------------------------------- progress

class Progress:
    """UI progress bar every step (Cancel raises from its update), loss text and a latent
    preview every ``every`` steps, so the loss is read back from the GPU only then."""

    def __init__(self, node_id, start: int, until: int, every: int, model, trainer):
        self.bar = comfy.utils.ProgressBar(max(until - start, 1), node_id=node_id)
        self.node_id, self.start, self.every, self.trainer = node_id, start, max(every, 1), trainer
        self.previewer = None
        try:
            import latent_preview

            fmt = model.model.latent_format
            self.previewer = latent_preview.get_previewer(model.load_device, fmt)
            if self.previewer is None and getattr(fmt, "latent_rgb_factors", None) is not None:
                # the server runs without previews (the default): a training run still shows one
                self.previewer = latent_preview.Latent2RGBPreviewer(fmt.latent_rgb_factors,
                                                                    getattr(fmt, "latent_rgb_factors_bias", None))
        except Exception as e:  # previews are optional; training is not
            log.debug("no latent previewer: %s", e)

    def __call__(self, step: int, until: int, losses) -> None:
        # Cancel raises here, not only through the server's progress hook (which main.py installs):
        # a graph run by another front end, or in-process, stops within one step too
        mm.throw_exception_if_processing_interrupted()
        preview = None
        if step % self.every == 0 or step == until:
            check_losses(step, losses)  # a diverged run stops here, before its next checkpoint
            text = f"step {step}/{until}  " + "  ".join(f"{k} {float(v):.4f}" for k, v in losses.items())
            log.info("embroidery training %s", text)
            self._text(text)
            if self.previewer is not None and self.trainer.last_x0 is not None:
                preview = self.previewer.decode_latent_to_preview_image("JPEG", self.trainer.last_x0[:1])
        self.bar.update_absolute(step - self.start, preview=preview)

    def _text(self, text: str) -> None:
        try:
            from server import PromptServer

            if PromptServer.instance is not None and self.node_id is not None:
                PromptServer.instance.send_progress_text(text, self.node_id)
        except Exception as e:
            log.debug("progress text not sent: %s", e)


def interruptible(function):
    """``function`` that first raises ComfyUI's interrupt if Cancel was pressed: for loops of
    model passes that have no progress bar of their own."""

    def call(*args, **kwargs):
        mm.throw_exception_if_processing_interrupted()
        return function(*args, **kwargs)

    return call


def chain(*callbacks):
    def call(step, until, losses):
        for callback in callbacks:
            if callback is not None:
                callback(step, until, losses)

    return call


# ---------------------------------------------------------------------------- stage-2 pairs

NEGATIVE_PROMPT = "lowres, bad anatomy, cropped, worst quality, low quality"


def sample_image(model, clip, vae, text: str, height: int, width: int, steps: int, cfg: float, seed: int):
    """txt2img with ComfyUI's own sampler (Euler ancestral, as the paper's inference)."""
    import comfy.sample

    positive = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(NEGATIVE_PROMPT))
    channels = model.model.latent_format.latent_channels
    latent = torch.zeros([1, channels, height // 8, width // 8], device=mm.intermediate_device())
    noise = comfy.sample.prepare_noise(latent, seed)
    # the callback runs after every sampler step: Cancel stops here within one step
    samples = comfy.sample.sample(model, noise, steps, cfg, "euler_ancestral", "normal", positive, negative,
                                  latent, denoise=1.0, disable_pbar=True, seed=seed,
                                  callback=interruptible(lambda *args: None))
    image = vae.decode(samples)
    return image.reshape(-1, *image.shape[-3:])[:1].float().clamp(0, 1)
