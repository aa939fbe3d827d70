"""Speed and memory of the embroidery trainers next to ComfyUI's TrainLoraNode, in one run.

    python benchmarks/bench_training.py --comfy /path/to/ComfyUI --json results.json
    python benchmarks/bench_training.py --smoke            # CPU, reduced sizes, about a minute

Two backends:

- ComfyUI (a tree from --comfy or $COMFYUI_PATH): the real SDXL and SD1.5 UNets, built from
  the configs ComfyUI's own model detection returns, random weights (no checkpoint file).
  (a) TrainLoraNode's mechanics, imported from ComfyUI: LoRA weight wrappers (create_train +
      add_weight_wrapper), its gradient checkpointing, its TrainSampler loop (x0 loss, AdamW);
      on every layer as the node does, and on exactly the modules our trainers train.
  (b) One stage-1 and one stage-2 iteration of ours through the nodes' own bridge
      (nodes/comfy_training.py), node defaults and every memory preset.
  (c) Sampling without and with our style-block LoRA (weight patches, as the loader applies).
- core only (no ComfyUI; what CI runs with --smoke): (b) on embroidery_core's TinyUNet.
  (a) and (c) need ComfyUI and are listed as skipped.

Each row: seconds per step (mean of the timed steps, after warm-up), peak GPU memory, FLOP per
step (torch.utils.flop_counter, backward and checkpoint recomputation included), achieved
TFLOP/s and the ratio to the matching TrainLoraNode row. A "step" is one optimizer step for
TrainLoraNode, one iteration for ours (stage 1: 2 passes with gradients; stage 2: 3 passes with
gradients and 3 without, batch 2), one sampler step for sampling (cfg: batch 2).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import importlib.util
import json
import os
import platform
import sys
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
PACK = "embroidery_pack"  # the repo imported as a package, so nodes/' relative imports resolve
PRESETS = ("default", "speed", "balanced", "low_vram")  # default: the trainer nodes' defaults
FAMILIES = ("sdxl", "sd15")


# ---------------------------------------------------------------------------- settings

@dataclass
class Settings:
    """Every default of a run in one place; ``--smoke`` swaps in the reduced column."""

    families: tuple[str, ...] = FAMILIES
    resolution: dict = field(default_factory=lambda: {"sdxl": 1024, "sd15": 512})
    warmup: int = 2            # untimed calls after the FLOP-counting first call
    steps: int = 5
    sample_steps: int = 20
    cfg: float = 7.0
    theirs_rank: int = 8       # TrainLoraNode's default
    rank: int = 32             # ours (EmoLoRAConfig), also TrainLoraNode on our modules
    reduced: bool = False      # smoke: model_channels 64, one transformer layer per block

    @staticmethod
    def smoke(families=FAMILIES) -> "Settings":
        return Settings(families=families, resolution={"sdxl": 64, "sd15": 64}, warmup=0, steps=1,
                        sample_steps=2, reduced=True)


# Reduced sizes of the same two families (smoke): fields that differ from the real config.
REDUCED_UNET = {
    "sdxl": dict(model_channels=64, channel_mult=[1, 1, 1], transformer_depth=[0, 0, 1, 1, 1, 1],
                 transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1], transformer_depth_middle=1),
    "sd15": dict(model_channels=64, channel_mult=[1, 1, 1, 1]),
}


# ---------------------------------------------------------------------------- measuring

_START = time.perf_counter()


def progress(text: str) -> None:
    """What runs now, on stderr (the table goes to stdout)."""
    print(f"[{time.perf_counter() - _START:6.1f}s] {text}", file=sys.stderr, flush=True)


def pack(module: str):
    """A module of this repo, imported as the package ``embroidery_pack``. ``nodes/__init__``
    (node registration: comfy_api, PyAV) is not run; its modules import on their own."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        sys.modules[PACK] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[PACK])
        nodes = types.ModuleType(f"{PACK}.nodes")
        nodes.__path__ = [str(ROOT / "nodes")]
        sys.modules[nodes.__name__] = nodes
    return importlib.import_module(f"{PACK}.{module}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()  # frees what the previous row left, so peaks do not add up
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measure(step, settings: Settings, device: torch.device, flops: int | None = None) -> dict:
    """One call under the FLOP counter (it doubles as the first warm-up: nothing it does first,
    such as creating the optimizer state, is a matmul) unless ``flops`` is known already,
    ``settings.warmup`` more untimed calls, then ``settings.steps`` timed ones."""
    if flops is None:
        flops = count_flops(step)
    else:
        step()
    for _ in range(settings.warmup):
        step()
    reset_peak(device)
    times = []
    for _ in range(settings.steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return {"step_times": times, "peak_gib": peak_gib(device), "flop_per_step": flops}


@dataclass
class Row:
    family: str
    part: str                  # "train_lora_node" | "ours" | "sampling"
    name: str
    s_per_step: float | None   # None: the row failed (``error``)
    peak_gib: float | None     # None on CPU
    flop_per_step: int | None
    step_times: list[float]
    details: dict = field(default_factory=dict)
    ratio: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def tflops(self) -> float | None:
        return None if self.s_per_step is None else self.flop_per_step / self.s_per_step / 1e12

    @staticmethod
    def of(family, part, name, measured: dict, **details) -> "Row":
        times = measured["step_times"]
        progress(f"{family} {name}: {sum(times) / len(times):.4f} s/step")
        return Row(family, part, name, sum(times) / len(times), measured["peak_gib"], int(measured["flop_per_step"]),
                   times, details)


def guarded(family: str, part: str, name: str, device: torch.device, fn):
    """``fn()``, or a failed row when it runs out of GPU memory (the run goes on)."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError as e:
        progress(f"{family} {name}: out of memory")
        reset_peak(device)
        return Row(family, part, name, None, None, None, [], error=f"out of memory: {str(e).splitlines()[0]}")


# ---------------------------------------------------------------------------- ours (both backends)

def make_trainer(core, denoiser, adapters, preset: str, compute_dtype):
    """A Trainer as the nodes build it; "default" leaves the optimizer to the Trainer."""
    config = core.methods.EmoLoRAConfig(rank=adapters.adapter(adapters.names[0]).rank)
    factory = None if preset == "default" else core.presets.get_memory_preset(preset).optimizer_factory
    return core.trainer.Trainer(denoiser, adapters, config, compute_dtype, optimizer_factory=factory)


def providers_for(core, preset: str, adapters, unet) -> list:
    """The forward wrappers of a run: the preset's, or the nodes' default (checkpointing on)."""
    if preset == "default":
        return [adapters, core.adapters.Checkpointing(unet)]
    return core.presets.get_memory_preset(preset).providers(adapters, unet)


def uses_checkpointing(core, preset: str) -> bool:
    return preset == "default" or core.presets.get_memory_preset(preset).gradient_checkpointing


def random_pairs(core, latent_shape, context_shape, y_width, device, seed=0):
    """The reference pair and one generated pair: random latents and prompt embeddings."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device)
    cond = lambda: core.diffusion.Cond(rand(*context_shape), rand(1, y_width) if y_width else None)
    make = lambda: core.trainer.PairLatents(rand(*latent_shape), rand(*latent_shape), cond(), cond())
    return make(), make()


def iteration(core, trainer, stage: int, pair, generated):
    phase = core.methods.EMOLORA.phase(stage)
    return lambda: core.trainer.iteration(trainer, phase, pair, generated if phase.generated else None)


def measure_ours(cache: dict, step, stage: int, checkpointing: bool, settings, device) -> dict:
    """measure(), counting FLOPs once per (stage, checkpointing): presets that differ only in
    where the optimizer keeps its state run the same matmuls (and the counter is slow on CPU)."""
    measured = measure(step, settings, device, cache.get((stage, checkpointing)))
    cache[(stage, checkpointing)] = measured["flop_per_step"]
    return measured


OURS_SHAPE = {1: dict(batch=1, grad_passes=2, nograd_passes=0), 2: dict(batch=2, grad_passes=3, nograd_passes=3)}


def ours_details(core, preset, adapters, stage):
    state = "fp32" if preset == "default" else core.presets.get_memory_preset(preset).optimizer_state
    return dict(stage=stage, preset=preset, gradient_checkpointing=uses_checkpointing(core, preset),
                optimizer_state=state, rank=adapters.adapter(adapters.names[0]).rank,
                trainable_params=sum(p.numel() for p in adapters.parameters()),
                modules=len(adapters.names), style_blocks=list(adapters.style_blocks), **OURS_SHAPE[stage])


# ---------------------------------------------------------------------------- core-only backend

class CoreBackend:
    """Our iterations on embroidery_core's TinyUNet (SDXL block layout), plain torch."""

    family = "tiny_core"

    def __init__(self, settings: Settings, device: torch.device):
        self.settings, self.device = settings, device
        self.core = _Core()
        tiny = pack("embroidery_core.tiny_unet")
        torch.manual_seed(0)
        self.unet = tiny.TinyUNet(tiny.TinyUNetConfig()).to(device).requires_grad_(False)
        self.arch = self.unet.cfg.arch("sdxl")
        self.flops: dict = {}

    def skipped(self) -> list[dict]:
        why = "needs ComfyUI (pass --comfy PATH or set COMFYUI_PATH)"
        return [{"part": "train_lora_node", "reason": f"timing TrainLoraNode's mechanics {why}"},
                {"part": "sampling", "reason": f"sampling with weight patches (the loader's path) {why}"},
                {"part": "real_architectures", "reason": f"building the real SDXL/SD1.5 UNets {why}; ours ran on the TinyUNet"}]

    def run(self) -> list[Row]:
        side = max(self.settings.resolution.values()) // 8
        pair, generated = random_pairs(self.core, (1, 4, side, side), (1, 77, self.unet.cfg.context_dim), 0,
                                       self.device)
        return [self.ours(stage, preset, pair, generated) for stage in (1, 2) for preset in PRESETS]

    def ours(self, stage, preset, pair, generated) -> Row:
        core = self.core
        adapters = core.adapters.AdapterSet(core.adapters.linear_targets(self.unet, self.arch.attention_modules()),
                                            self.arch.preset("emolora_style"), self.settings.rank,
                                            self.settings.rank).to(self.device)
        providers = providers_for(core, preset, adapters, self.unet)
        trainer = make_trainer(core, core.diffusion.TorchDenoiser(self.unet), adapters, preset, None)
        with contextlib.ExitStack() as stack:
            for provider in providers:
                stack.enter_context(core.adapters.installed(self.unet, provider))
            measured = measure_ours(self.flops, iteration(core, trainer, stage, pair, generated), stage,
                                    uses_checkpointing(core, preset), self.settings, self.device)
        return Row.of(self.family, "ours", f"stage {stage} {preset}", measured,
                      **ours_details(core, preset, adapters, stage))


class _Core:
    """The core modules used here, imported once through the pack."""

    def __init__(self):
        for name in ("adapters", "blocks", "diffusion", "lora_file", "methods", "presets", "trainer"):
            setattr(self, name, pack(f"embroidery_core.{name}"))


# ---------------------------------------------------------------------------- ComfyUI backend

def comfy_tree(arg: str | None) -> Path | None:
    path = arg or os.environ.get("COMFYUI_PATH")
    if not path:
        return None
    path = Path(path).expanduser().resolve()
    return path if (path / "comfy" / "model_management.py").is_file() else None


def import_comfy(tree: Path, device: torch.device):
    """ComfyUI in-process: its tree first on sys.path, no argv parsing, CPU mode unless CUDA."""
    sys.path.insert(0, str(tree))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = device.type != "cuda"
    import comfy.model_management
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False  # TrainSampler's tqdm would flood the log
    return comfy.model_management


def detected_unet_config(family: str) -> dict:
    """The SDXL / SD15 unet_config exactly as ComfyUI's diffusers-UNet detection returns it,
    asked with a key/shape skeleton (meta tensors) of that architecture."""
    import comfy.model_detection

    meta = lambda *shape: torch.empty(shape, device="meta")
    sd = {"conv_in.weight": meta(320, 4, 3, 3)}
    depth, context = ((0, 2, 10), 2048) if family == "sdxl" else ((1, 1, 1, 0), 768)
    for level, layers in enumerate(depth):
        for i in range(2):
            sd[f"down_blocks.{level}.resnets.{i}.conv1.weight"] = meta(1)
            for t in range(layers):
                sd[f"down_blocks.{level}.attentions.{i}.transformer_blocks.{t}.attn2.to_k.weight"] = meta(320, context)
    if family == "sdxl":
        sd["add_embedding.linear_1.weight"] = meta(1280, 2816)
    config = comfy.model_detection.unet_config_from_diffusers_unet(sd)
    if config is None:
        raise RuntimeError(f"this ComfyUI's detection no longer knows the {family} UNet layout")
    return config


def build_model(family: str, reduced: bool, dtype: torch.dtype, device: torch.device):
    """A ModelPatcher over the real architecture (or its reduced smoke size), N(0, 0.02) weights."""
    import comfy.model_patcher
    import comfy.supported_models

    config = {**detected_unet_config(family), **(REDUCED_UNET[family] if reduced else {})}
    model_config = {"sdxl": comfy.supported_models.SDXL, "sd15": comfy.supported_models.SD15}[family](config)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


class ComfyBackend:
    def __init__(self, tree: Path, settings: Settings, device: torch.device):
        self.tree, self.settings, self.device = tree, settings, device
        self.mm = import_comfy(tree, device)
        self.core = _Core()
        self.ct = pack("nodes.comfy_training")
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def version(self) -> str | None:
        try:
            return importlib.import_module("comfyui_version").__version__
        except ImportError:
            return None

    def skipped(self) -> list[dict]:
        return []

    def run(self) -> list[Row]:
        rows = []
        for family in self.settings.families:
            progress(f"building {family}{' (reduced)' if self.settings.reduced else ''}")
            rows += FamilyBench(self, family).run()
            gc.collect()
        return rows


class FamilyBench:
    """All rows of one model family on one ModelPatcher."""

    def __init__(self, backend: ComfyBackend, family: str):
        self.b, self.family, self.s = backend, family, backend.settings
        self.patcher = build_model(family, self.s.reduced, backend.dtype, backend.device)
        self.arch = backend.core.blocks.arch_from_unet_config(family, self.patcher.model.model_config.unet_config)
        side = self.s.resolution[family] // 8
        self.latent_shape = (1, 4, side, side)
        self.context_shape = (1, 77, 2048 if family == "sdxl" else 768)
        self.y_width = 2816 if family == "sdxl" else 0
        self.modules = self.arch.attention_modules()
        self.lora = None  # the first LoRA ours trains; sampling loads its style blocks
        self.flops: dict = {}

    def run(self) -> list[Row]:
        theirs = [self.theirs("all layers", None, self.s.theirs_rank, True),
                  self.theirs("our modules", set(self.modules), self.s.rank, True),
                  self.theirs("our modules", set(self.modules), self.s.rank, False)]
        pair, generated = random_pairs(self.b.core, self.latent_shape, self.context_shape, self.y_width, self.b.device)
        ours = [self.ours(stage, preset, pair, generated) for stage in (1, 2) for preset in PRESETS]
        add_ratios(ours, theirs)
        return theirs + ours + self.sampling()

    # -------------------------------------------------------------- (a) TrainLoraNode mechanics
    def theirs(self, what: str, modules: set[str] | None, rank: int, checkpointing: bool) -> Row:
        name = f"TrainLoraNode {what} r{rank}" + (" ckpt" if checkpointing else " no-ckpt")
        details = dict(target=what, rank=rank, gradient_checkpointing=checkpointing, batch=1, grad_passes=1,
                       nograd_passes=0, lora_dtype=str(self.b.dtype))
        row = guarded(self.family, "train_lora_node", name, self.b.device,
                      lambda: self.theirs_row(name, modules, rank, checkpointing))
        row.details = {**details, **row.details}
        return row

    def theirs_row(self, name: str, modules: set[str] | None, rank: int, checkpointing: bool) -> Row:
        nt = importlib.import_module("comfy_extras.nodes_train")
        mp, params = self.theirs_clone(nt, modules, rank)
        ckpt = nt.find_all_highest_child_module_with_forward(mp.model.diffusion_model) if checkpointing else []
        try:
            for m in ckpt:
                nt.patch(m)
            mp.model.requires_grad_(False)
            self.b.mm.load_models_gpu([mp], memory_required=1e20, force_full_load=True)
            measured = self.train_sampler_run(nt, mp, params)
        finally:
            for m in mp.model.modules():
                nt.unpatch(m)
            self.b.ct.unload(mp)
        return Row.of(self.family, "train_lora_node", name, measured, trainable_params=sum(p.numel() for p in params))

    def theirs_clone(self, nt, modules: set[str] | None, rank: int):
        """TrainLoraNode.train's adapter setup: every comfy.ops layer (``modules`` None) gets a
        LoRA on its weight (a BiasDiff on 1-D weights and on biases); else only those modules'
        weights get a LoRA, i.e. the trainable set of our design step."""
        from comfy.weight_adapter import adapter_maps

        mp = self.patcher.clone()
        mp.set_model_compute_dtype(self.b.dtype)
        params, dtype = [], self.b.dtype
        for n, m in mp.model.named_modules():
            if not hasattr(m, "weight_function") or modules is not None and n.removeprefix("diffusion_model.") not in modules:
                continue
            wrappers = []
            if m.weight is not None:
                if m.weight.ndim >= 2:
                    wrappers.append(("weight", adapter_maps["LoRA"].create_train(m.weight, rank=rank, alpha=1.0).to(dtype)))
                elif modules is None:
                    wrappers.append(("weight", nt.BiasDiff(torch.nn.Parameter(torch.zeros(m.weight.shape, dtype=dtype)))))
            if modules is None and getattr(m, "bias", None) is not None:
                wrappers.append(("bias", nt.BiasDiff(torch.nn.Parameter(torch.zeros(m.bias.shape, dtype=dtype)))))
            for kind, adapter in wrappers:
                mp.add_weight_wrapper(f"{n}.{kind}", adapter)
                params += list(adapter.parameters())
        return mp, [p for p in params if p.requires_grad]

    def train_sampler_run(self, nt, mp, params) -> dict:
        """TrainLoraNode's own loop (Guider_Basic + TrainSampler); a step lasts from one loss
        callback to the next (optimizer step, noise, forward, backward, loss.item())."""
        ncs = importlib.import_module("comfy_extras.nodes_custom_sampler")
        latents = torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(0)).to(self.b.dtype)
        positive = [[torch.randn(self.context_shape), {"pooled_output": torch.randn(1, 1280)} if self.y_width else {}]]
        optimizer = torch.optim.AdamW(params, lr=5e-4)

        def run(steps, callback=None):
            sampler = nt.TrainSampler(torch.nn.MSELoss(), optimizer, loss_callback=callback, batch_size=1,
                                      total_steps=steps, seed=0, training_dtype=self.b.dtype)
            guider = ncs.Guider_Basic(mp)
            guider.set_conds(positive)
            noise = ncs.Noise_RandomNoise(0).generate_noise({"samples": latents})
            guider.sample(noise, latents, sampler, torch.tensor(range(1)), seed=0)

        flops = count_flops(lambda: run(1))  # also the first warm-up, as in measure()
        stamps = []
        reset_peak(self.b.device)
        run(self.s.warmup + self.s.steps + 1, lambda loss: stamps.append(time.perf_counter()))
        times = [b - a for a, b in zip(stamps, stamps[1:])][-self.s.steps:]
        return {"step_times": times, "peak_gib": peak_gib(self.b.device), "flop_per_step": flops}

    # -------------------------------------------------------------- (b) ours
    def ours(self, stage, preset, pair, generated) -> Row:
        row = guarded(self.family, "ours", f"stage {stage} {preset}", self.b.device,
                      lambda: self.ours_row(stage, preset, pair, generated))
        if row.error:
            row.details = dict(stage=stage, preset=preset, gradient_checkpointing=uses_checkpointing(self.b.core, preset))
        return row

    def ours_row(self, stage, preset, pair, generated) -> Row:
        core, ct, model = self.b.core, self.b.ct, self.patcher
        targets = core.adapters.linear_targets(model.model.diffusion_model, self.modules)
        adapters = core.adapters.AdapterSet(targets, self.arch.preset("emolora_style"), self.s.rank, self.s.rank)
        providers = providers_for(core, preset, adapters, model.model.diffusion_model)
        with ct.training_session(model, *providers) as clone:
            denoiser = ct.ComfyDenoiser(clone)
            adapters.to(denoiser.device)
            trainer = make_trainer(core, denoiser, adapters, preset, ct.compute_dtype("auto", denoiser.device))
            measured = measure_ours(self.flops, iteration(core, trainer, stage, pair, generated), stage,
                                    uses_checkpointing(core, preset), self.s, self.b.device)
        if self.lora is None:
            self.lora = core.trainer.export(trainer, self.arch.name, core.methods.EMOLORA, stage)  # for (c)
        return Row.of(self.family, "ours", f"stage {stage} {preset}", measured,
                      precision=str(trainer.compute_dtype or "model dtype"),
                      **ours_details(core, preset, adapters, stage))

    # -------------------------------------------------------------- (c) sampling
    def sampling(self) -> list[Row]:
        if self.lora is None:
            raise RuntimeError(f"{self.family}: no training row succeeded, so there is no LoRA to sample with")
        blocks = self.arch.preset("emolora_style")
        patched, loader = style_lora_patches(self.b.core, self.patcher, self.lora.filter_blocks(blocks))
        plain = guarded(self.family, "sampling", "sampling without LoRA", self.b.device,
                        lambda: self.sample_row("sampling without LoRA", self.patcher))
        styled = guarded(self.family, "sampling", "sampling with style-block LoRA", self.b.device,
                         lambda: self.sample_row("sampling with style-block LoRA", patched, blocks=blocks,
                                                 patched_weights=len(patched.patches), loader=loader))
        styled.ratio = ratio(styled, plain, plain.name)
        return [plain, styled]

    def sample_row(self, name, model, **details) -> Row:
        import comfy.sample

        g = torch.Generator().manual_seed(0)
        extra = lambda: {"pooled_output": torch.randn(1, 1280, generator=g)} if self.y_width else {}
        positive = [[torch.randn(self.context_shape, generator=g), extra()]]
        negative = [[torch.randn(self.context_shape, generator=g), extra()]]
        latent = torch.zeros(self.latent_shape)
        noise = torch.randn(self.latent_shape, generator=g)

        def run(steps):
            with torch.inference_mode():  # as ComfyUI executes nodes
                comfy.sample.sample(model, noise, steps, self.s.cfg, "euler", "normal", positive, negative, latent,
                                    denoise=1.0, disable_pbar=True, seed=0)

        sync(self.b.device)
        start = time.perf_counter()
        run(self.s.sample_steps)  # first call: loads the model, bakes the patches in
        sync(self.b.device)
        first = time.perf_counter() - start
        measured = measure(lambda: run(self.s.sample_steps), Settings(warmup=0, steps=1), self.b.device)
        per_step = lambda x: x / self.s.sample_steps
        measured = {"step_times": [per_step(t) for t in measured["step_times"]], "peak_gib": measured["peak_gib"],
                    "flop_per_step": per_step(measured["flop_per_step"])}
        self.b.ct.unload(model)
        return Row.of(self.family, "sampling", name, measured, sampler="euler", steps=self.s.sample_steps,
                      cfg=self.s.cfg, batch=2, first_call_s=first, **details)


def style_lora_patches(core, patcher, lora):
    """A clone of ``patcher`` with the LoRA as weight patches, through the loader's own
    ``nodes.common.apply_lora_patches``; where comfy_api cannot import (no PyAV, e.g. a bare GPU
    image) the same three ComfyUI calls are made here. Returns (clone, which path ran)."""
    try:
        return pack("nodes.common").apply_lora_patches(patcher, lora, 1.0, "benchmark"), "nodes.common"
    except ImportError as e:
        progress(f"nodes.common does not import ({e}); applying the patches with the same ComfyUI calls")
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    patches = comfy.lora.load_lora(core.lora_file.to_kohya_state_dict(lora), key_map, log_missing=False)
    if len(patches) != len(lora.modules):
        raise RuntimeError(f"only {len(patches)} of {len(lora.modules)} LoRA modules match the model")
    clone = patcher.clone()
    clone.add_patches(patches, 1.0)
    return clone, "comfy.lora (fallback)"


def ratio(row: Row, ref: Row, ref_name: str) -> dict:
    """ours / theirs (or with / without LoRA): time, peak memory and FLOP per step."""
    if row.error or ref.error:
        return {}
    out = {"vs": ref_name, "s_per_step": row.s_per_step / ref.s_per_step,
           "flop_per_step": row.flop_per_step / ref.flop_per_step if ref.flop_per_step else None}
    out["peak_gib"] = row.peak_gib / ref.peak_gib if row.peak_gib and ref.peak_gib else None
    return out


def add_ratios(ours: list[Row], theirs: list[Row]) -> None:
    """Each row of ours against TrainLoraNode on the same modules with the same checkpointing,
    and against TrainLoraNode on every layer (its default use)."""
    same = {r.details["gradient_checkpointing"]: r for r in theirs if r.details["target"] == "our modules"}
    every = next(r for r in theirs if r.details["target"] == "all layers")
    for row in ours:
        ref = same[row.details["gradient_checkpointing"]]
        row.ratio = ratio(row, ref, ref.name)
        row.details["vs_all_layers"] = ratio(row, every, every.name)


# ---------------------------------------------------------------------------- report

def environment(device: torch.device, backend: str, comfy_version: str | None) -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    provenance = pack("embroidery_core.provenance")
    return {"backend": backend, "device": str(device), "gpu": gpu, "cpu": provenance.cpu_name(),
            "arithmetic": provenance.arithmetic(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "comfyui": comfy_version, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "threads": torch.get_num_threads(), **provenance.git_commit(ROOT)}


def table(rows: list[Row]) -> str:
    head = ("family", "part", "variant", "s/step", "peak GiB", "TFLOP/step", "TFLOP/s", "time ratio", "ratio vs")
    lines = [head]
    for r in rows:
        if r.error:
            lines.append((r.family, r.part, r.name, r.error.split(":")[0]) + ("-",) * 5)
            continue
        peak = "-" if r.peak_gib is None else f"{r.peak_gib:.2f}"
        rel = f"{r.ratio['s_per_step']:.2f}" if r.ratio else "-"
        lines.append((r.family, r.part, r.name, f"{r.s_per_step:.4f}", peak, f"{r.flop_per_step / 1e12:.3g}",
                      f"{r.tflops:.3g}", rel, r.ratio.get("vs", "-") if r.ratio else "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    fmt = lambda line: "  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
    return "\n".join([fmt(lines[0]), fmt(tuple("-" * w for w in widths))] + [fmt(line) for line in lines[1:]])


def report(rows, skipped, env, settings, path: str | None) -> None:
    print(f"# {env['backend']} backend on {env['gpu'] or 'CPU (' + env['cpu'] + ')'}, torch {env['torch']}, "
          f"ComfyUI {env['comfyui'] or '-'}, commit {env['commit'] or 'unknown'}, {env['date']}")
    print(table(rows))
    for item in skipped:
        print(f"skipped {item['part']}: {item['reason']}")
    if path:
        data = {"schema": 1, "env": env, "settings": asdict(settings), "skipped": skipped,
                "rows": [{**asdict(r), "tflops": r.tflops} for r in rows]}
        Path(path).write_text(json.dumps(data, indent=1))
        print(f"wrote {path}")


# ---------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfy", help="ComfyUI tree (default: $COMFYUI_PATH); without one only --smoke runs")
    p.add_argument("--smoke", action="store_true", help="reduced sizes on CPU in under a minute (CI)")
    p.add_argument("--family", choices=FAMILIES, action="append", help="only this family (repeatable)")
    p.add_argument("--steps", type=int, help="timed steps per row (default 5; smoke 1)")
    p.add_argument("--warmup", type=int, help="untimed steps after the FLOP-counting first one (default 2; smoke 0)")
    p.add_argument("--sample-steps", type=int, help="sampler steps per sampling call (default 20; smoke 2)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu; smoke: cpu)")
    p.add_argument("--json", help="also write the results to this JSON file")
    return p.parse_args(argv)


def settings_from(args) -> Settings:
    families = tuple(args.family) if args.family else FAMILIES
    s = Settings.smoke(families) if args.smoke else Settings(families=families)
    for name in ("steps", "warmup", "sample_steps"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    if s.steps < 1 or s.warmup < 0:
        raise SystemExit(f"--steps must be >= 1 and --warmup >= 0, got {s.steps} and {s.warmup}")
    return s


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    device = torch.device(args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda"))
    if args.smoke:
        torch.set_num_threads(1)  # ops this small only lose to thread handoffs on shared CI cores
    tree = comfy_tree(args.comfy)
    if tree is None and (args.comfy or os.environ.get("COMFYUI_PATH")):
        print(f"no ComfyUI tree at {args.comfy or os.environ['COMFYUI_PATH']} (no comfy/model_management.py)",
              file=sys.stderr)
        return 2
    if tree is None and not args.smoke:
        print("the full benchmark needs ComfyUI: pass --comfy PATH or set COMFYUI_PATH "
              "(without ComfyUI only --smoke runs, on the core's TinyUNet)", file=sys.stderr)
        return 2
    progress(f"{'ComfyUI at ' + str(tree) if tree else 'core only (no ComfyUI)'}, {device}")
    backend = ComfyBackend(tree, settings, device) if tree else CoreBackend(settings, device)
    progress("imported")
    rows = backend.run()
    env = environment(device, "comfyui" if tree else "core", backend.version() if tree else None)
    report(rows, backend.skipped(), env, settings, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
