"""Tiny random-weight SD1.5 / SDXL models for integration tests.

Runs in the ComfyUI venv after `comfy_env.import_comfy()`; comfy is imported inside the
functions, so this module itself imports anywhere.

Two kinds of model:
* `tiny_patcher(family)`: a ModelPatcher built in-process from a config object (no file,
  no detection), 32 (sd15) / 64 (sdxl) channels: fast enough to sample in unit-like tests.
* `write_tiny_checkpoint(family, path)`: a file that ComfyUI's own CheckpointLoaderSimple
  detects by itself. Detection pins model_channels=320 and, for the SDXL family, an exact
  transformer_depth, so these UNets are wider; channel_mult is free and is all ones.
  CLIP configs are fixed (full size, random fp16); the VAE is TAESD (2.4 M params).

Parameter names and shapes come from ComfyUI's own module classes built on the meta
device, so the key layout always matches the ComfyUI tree under test. Values come from a
per-tensor seeded generator: norm weights 1, biases 0, embeddings N(0, 0.02), everything
else N(0, 1/fan_in). Same inputs, same bytes.
"""
import json
import os
import zlib

FORMAT_VERSION = 1  # bump when a layout or the init changes: cached files are rewritten
SEED = 20250101
METADATA_KEY = "tiny_test_model"

# SD1.5 block topology: 4 levels x 2 res blocks, attention at input_blocks 1,2,4,5,7,8,
# middle_block.1 and output_blocks 3..11 (transformer_depth_output is consumed from the
# end: its last entry is output_blocks.0). Same as detect_unet_config would report.
_SD15_LAYOUT = dict(
    use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, in_channels=4, out_channels=4,
    num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 1, 1, 1],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768,
    use_temporal_resblock=False, use_temporal_attention=False,
)

# SDXL family: 3 levels, attention at input_blocks 4,5,7,8, middle_block.1 and
# output_blocks 0..5 (none on the 1st level, as in SDXL), linear proj, adm 2816.
_SDXL_LAYOUT = dict(
    use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, in_channels=4, out_channels=4,
    num_res_blocks=[2, 2, 2], channel_mult=[1, 1, 1],
    transformer_depth=[0, 0, 1, 1, 1, 1],
    transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1],
    transformer_depth_middle=1, use_linear_in_transformer=True, context_dim=2048,
    use_temporal_resblock=False, use_temporal_attention=False,
)

# in-process models (not detectable: SD15/SDXL detection wants 320 channels)
TINY_UNET = {
    "sd15": dict(_SD15_LAYOUT, model_channels=32),
    "sdxl": dict(_SDXL_LAYOUT, model_channels=64),
}
# checkpoint files: detected as SD15, resp. Segmind_Vega (transformer_depth [0,0,1,1,2,2])
CKPT_UNET = {
    "sd15": dict(_SD15_LAYOUT, model_channels=320),
    "sdxl": dict(_SDXL_LAYOUT, model_channels=320, transformer_depth=[0, 0, 1, 1, 2, 2]),
}
CKPT_CLASS = {"sd15": "SD15", "sdxl": "Segmind_Vega"}
CONTEXT_DIM = {"sd15": 768, "sdxl": 2048}
POOLED_DIM = {"sdxl": 1280}


def _check_family(family):
    if family not in TINY_UNET:
        raise ValueError("family must be 'sd15' or 'sdxl', got {!r}".format(family))


def _config_class(family):
    import comfy.supported_models
    return {"sd15": comfy.supported_models.SD15, "sdxl": comfy.supported_models.SDXL}[family]


def _with_heads(family, cfg):
    """cfg plus the head settings the family's config class adds (num_heads / num_head_channels)."""
    return dict(cfg, **_config_class(family).unet_extra_config)


# ---------------------------------------------------------------- random values

def init_value(name, shape, dtype, seed):
    """Deterministic value for one tensor, independent of the order tensors are made in."""
    import torch
    if not dtype.is_floating_point:
        return torch.zeros(shape, dtype=dtype)
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) == 0:
        scalars = {"logit_scale": 4.6052, "vae_shift": 0.0}
        return torch.tensor(scalars.get(leaf, 1.0), dtype=dtype)
    if leaf == "bias" or leaf.endswith("_bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1:  # GroupNorm / LayerNorm gamma
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed((seed + zlib.crc32(name.encode())) & 0xFFFFFFFFFFFF)
    if "embedding" in name:
        return (torch.randn(shape, generator=g) * 0.02).to(dtype)
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    return (torch.randn(shape, generator=g) / fan_in ** 0.5).to(dtype)


def _shapes(module):
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


def _fill(shapes, prefix, seed, dtype):
    """Values for a {name: (shape, dtype)} layout, stored as `dtype` (integer buffers kept)."""
    out = {}
    for name, (shape, src_dtype) in shapes.items():
        value = init_value(prefix + name, shape, src_dtype, seed)
        out[prefix + name] = value.to(dtype) if value.is_floating_point() else value
    return out


# ---------------------------------------------------------------- in-process

def tiny_patcher(family, seed=0):
    """A ModelPatcher around a tiny random UNet of the family's block layout (CPU, fp32).

    Built through the family's own model config class (SD15 / SDXL) constructed directly,
    so the detection list in comfy.supported_models is never touched."""
    _check_family(family)
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher

    config = _config_class(family)(dict(TINY_UNET[family]))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            p.copy_(init_value("model.diffusion_model." + name, tuple(p.shape), torch.float32, SEED + seed))
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                           offload_device=mm.unet_offload_device())


def tiny_conditioning(family, text_seed=0, batch=1, tokens=77):
    """CONDITIONING shaped like CLIPTextEncode's output for the family (random values)."""
    _check_family(family)
    import torch
    g = torch.Generator().manual_seed(text_seed)
    cond = torch.randn((batch, tokens, CONTEXT_DIM[family]), generator=g)
    extra = {}
    if family in POOLED_DIM:
        extra["pooled_output"] = torch.randn((batch, POOLED_DIM[family]), generator=g)
    return [[cond, extra]]


# ---------------------------------------------------------------- layouts on meta

def unet_shapes(cfg):
    import torch
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    return _shapes(UNetModel(**cfg, dtype=torch.float32, device="meta", operations=comfy.ops.disable_weight_init))


def controlnet_shapes(cfg):
    import torch
    import comfy.cldm.cldm
    import comfy.ops
    cfg = {k: v for k, v in cfg.items() if k != "out_channels"}
    net = comfy.cldm.cldm.ControlNet(**cfg, hint_channels=3, dtype=torch.float32, device="meta",
                                     operations=comfy.ops.disable_weight_init)
    return _shapes(net)


def clip_shapes(config_file):
    """A text encoder from one of ComfyUI's own CLIP config files (e.g. sd1_clip_config.json)."""
    import torch
    import comfy.clip_model
    import comfy.ops
    with open(os.path.join(os.path.dirname(comfy.clip_model.__file__), config_file)) as f:
        config = json.load(f)
    return _shapes(comfy.clip_model.CLIPTextModel(config, torch.float32, "meta", comfy.ops.manual_cast))


def taesd_shapes():
    import torch
    import comfy.taesd.taesd
    with torch.device("meta"):
        return _shapes(comfy.taesd.taesd.TAESD(latent_channels=4))


def checkpoint_state_dict(family, dtype=None):
    """Full checkpoint state dict: UNet + CLIP (L, or L+G) + TAESD VAE, in checkpoint key names."""
    _check_family(family)
    import torch
    dtype = dtype or torch.float16
    seed = SEED + (0 if family == "sd15" else 100)
    clip_l = {k: v for k, v in clip_shapes("sd1_clip_config.json").items() if k.startswith("text_model.")}
    sd = _fill(unet_shapes(_with_heads(family, CKPT_UNET[family])), "model.diffusion_model.", seed, dtype)
    if family == "sd15":
        sd.update(_fill(clip_l, "cond_stage_model.transformer.", seed, dtype))
    else:
        sd.update(_fill(clip_l, "conditioner.embedders.0.transformer.", seed, dtype))
        # HF layout under the OpenCLIP prefix: SDXL.process_clip_state_dict maps it to clip_g.transformer.*
        sd.update(_fill(clip_shapes("clip_config_bigg.json"), "conditioner.embedders.1.model.transformer.", seed, dtype))
    sd.update(_fill(taesd_shapes(), "first_stage_model.", seed, dtype))
    return sd


def controlnet_state_dict(family, dtype=None):
    """ldm-layout ControlNet (input_blocks, zero_convs, input_hint_block, middle_block_out)
    with the same UNet config as the family's checkpoint, so its controls line up."""
    _check_family(family)
    import torch
    return _fill(controlnet_shapes(_with_heads(family, CKPT_UNET[family])), "", SEED + (1 if family == "sd15" else 101),
                 dtype or torch.float16)


# ---------------------------------------------------------------- files

def _stamp(kind, family):
    return {"format_version": FORMAT_VERSION, "kind": kind, "family": family, "seed": SEED}


def _is_current(path, stamp):
    if not os.path.isfile(path):
        return False
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta.get(METADATA_KEY, "null")) == stamp
    except Exception:  # truncated or foreign file: rewrite it
        return False


def _write(sd, path, stamp):
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = "{}.tmp-{}".format(path, os.getpid())
    save_file(sd, tmp, metadata={METADATA_KEY: json.dumps(stamp, sort_keys=True)})
    os.replace(tmp, path)  # atomic: a concurrent run sees the old file or the new one


def write_tiny_checkpoint(family, path):
    """Write (unless already current) a checkpoint CheckpointLoaderSimple detects as
    SD15 (sd15) or Segmind_Vega (sdxl). Returns path. sd15 ~0.5 GB, sdxl ~1.9 GB."""
    path, stamp = os.fspath(path), _stamp("checkpoint", family)
    if not _is_current(path, stamp):
        _write(checkpoint_state_dict(family), path, stamp)
    return path


def write_tiny_controlnet(family, path):
    """Write (unless already current) a ControlNet that ControlNetLoader loads. Returns path."""
    path, stamp = os.fspath(path), _stamp("controlnet", family)
    if not _is_current(path, stamp):
        _write(controlnet_state_dict(family), path, stamp)
    return path


def verify_checkpoint(path):
    """Load with ComfyUI's own loader (detection included); the model config class name."""
    import comfy.sd
    patcher, _clip, _vae, _ = comfy.sd.load_checkpoint_guess_config(os.fspath(path), output_vae=False,
                                                                    output_clip=False)
    return type(patcher.model.model_config).__name__


def write_tiny_loras(checkpoint, loras_dir, names, rank=4, family="sdxl"):
    """Random LoRAs on every attention projection of the checkpoint's UNet, in kohya layout."""
    import re

    import torch
    from safetensors import safe_open

    from embroidery_core.lora_file import lora_from_modules, save_lora

    prefix = "model.diffusion_model."
    pattern = re.compile(r"\.attn[12]\.to_(q|k|v|out\.0)\.weight$")
    with safe_open(str(checkpoint), "pt") as f:
        shapes = {k[len(prefix):-len(".weight")]: f.get_slice(k).get_shape()
                  for k in f.keys() if k.startswith(prefix) and pattern.search(k)}
    for i, name in enumerate(names):
        g = torch.Generator().manual_seed(i)
        modules = {m: (torch.randn(rank, s[1], generator=g) * 0.1, torch.randn(s[0], rank, generator=g) * 0.1, rank)
                   for m, s in shapes.items()}
        save_lora(lora_from_modules(family, modules), os.path.join(loras_dir, name))
