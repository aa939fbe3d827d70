"""The pack's in-memory LoRA (:class:`StyleLoRA`) and its file format.

Every LoRA the pack writes is a kohya-layout ``.safetensors`` file, because that is the one layout
the stock LoraLoader, A1111 and Forge all read (COMFY_API.md section 3); the pack's settings travel
in the file's metadata, never in its name. Reading is wider: kohya, diffusers / PEFT, B-LoRA's
official script and ComfyUI's TrainLoraNode output all come in, and each is turned into LDM module
paths relative to ``diffusion_model`` (``output_blocks.1.1.transformer_blocks.0.attn1.to_q``), the
one spelling used inside the pack. Block names are converted only through :mod:`.blocks`.

Pickle-based files are refused by extension and never opened: unpickling runs arbitrary code.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from dataclasses import dataclass

import safetensors
import safetensors.torch
import torch

from .blocks import (
    KOHYA_UNET_PREFIX,
    block_of,
    block_sort_key,
    get_arch,
    module_to_diffusers,
    module_to_kohya,
    module_to_ldm,
    normalize_block,
    parse_block_list,
    underscores_to_dots,
)
from . import keys as meta_keys
from .files import atomic_path

try:  # one version string for the whole pack, once the package declares it
    from . import __version__ as PACK_VERSION
except ImportError:
    PACK_VERSION = "0.1.0"

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- key formats

# What we write (kohya); ".alpha" is a 0-dim tensor, scale = alpha / rank.
KOHYA_DOWN = ".lora_down.weight"
KOHYA_UP = ".lora_up.weight"
ALPHA_SUFFIX = ".alpha"

# (down, up) suffix pairs we read. No suffix of one pair is a suffix of another's key, so order is free.
PAIR_SUFFIXES = (
    (KOHYA_DOWN, KOHYA_UP),  # kohya, ComfyUI TrainLoraNode
    (".lora_A.weight", ".lora_B.weight"),  # PEFT / diffusers
    (".lora_A.default.weight", ".lora_B.default.weight"),  # PEFT state dict with its adapter name
    (".lora.down.weight", ".lora.up.weight"),  # B-LoRA's official script
    ("_lora.down.weight", "_lora.up.weight"),  # old diffusers attention processors (processor.to_q_lora)
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),  # diffusers LoRACompatible layers
)

# Full-rank tensors TrainLoraNode writes for norms and biases: not LoRA, skipped and counted.
NOT_LORA_SUFFIXES = (".diff", ".diff_b")

# Prefixes in front of the UNet module path, stripped in any combination. kohya's is underscored.
UNET_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "unet.", KOHYA_UNET_PREFIX)

# Text-encoder LoRA keys (kohya lora_te/te1/te2, diffusers text_encoder/text_encoder_2); the pack
# works on the UNet only, so these are dropped.
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te.", "te_", "te1.", "te1_", "te2.", "te2_")

PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
SAFETENSORS_EXTENSION = ".safetensors"

# diffusers keeps PEFT's LoraConfig (lora_alpha) as JSON under this metadata key.
PEFT_METADATA_KEY = "lora_adapter_metadata"

# How kohya / Stability name each family in metadata; read back to know the family of a file.
BASE_MODEL_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCHITECTURE = {"sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}
FAMILY_NAMES = {"sd15": "SD1.x/SD2.x", "sdxl": "SDXL"}
SDXL_CONTEXT_DIM = 2048  # cross-attention width (CLIP-L + OpenCLIP-G); SD1.x has 768, SD2.x 1024

_TRANSFORMER_INDEX = re.compile(r"transformer_blocks[._](\d+)[._]")


# ---------------------------------------------------------------------------- in-memory LoRA


@dataclass
class LoRAModule:
    """One low-rank update ``delta = up @ down * alpha / rank`` of one UNet weight.

    ``down`` is ``[r, in]`` or, for a conv, ``[r, in, kh, kw]`` (TrainLoraNode flattens conv downs
    to 2-D; those stay 2-D because the kernel cannot be known). ``up`` is ``[out, r]`` or ``[out, r, 1, 1]``.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    def __post_init__(self):
        self.alpha = float(self.alpha)
        if self.down.ndim not in (2, 4) or self.up.ndim not in (2, 4):
            raise ValueError(
                f"LoRA weights must be 2-D or 4-D; got down {tuple(self.down.shape)}, up {tuple(self.up.shape)}"
            )
        if self.up.shape[1] != self.down.shape[0] or any(k != 1 for k in self.up.shape[2:]):
            raise ValueError(
                f"rank mismatch: down {tuple(self.down.shape)} has rank {self.down.shape[0]} "
                f"but up {tuple(self.up.shape)} expects rank {self.up.shape[1]}"
            )

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The full weight update, float32, shaped like the base weight (conv: [out, in, kh, kw])."""
        up, down = self.up.float().flatten(1), self.down.float().flatten(1)
        return (up @ down * self.scale).reshape(up.shape[0], *self.down.shape[1:])

    def norm(self) -> float:
        """``||delta||_F`` without building delta: ``||UD||² = sum((UᵀU) ∘ (DDᵀ))`` needs only r×r
        products, so inspecting a 10-layer SDXL block stays cheap."""
        up, down = self.up.double().flatten(1), self.down.double().flatten(1)
        squared = ((up.T @ up) * (down @ down.T)).sum().item() * self.scale**2
        return math.sqrt(max(squared, 0.0))  # rounding can dip just below zero for a zero update


@dataclass
class StyleLoRA:
    """The LoRA every node passes around: UNet modules keyed by LDM path, plus string metadata.

    Methods return new objects and never modify this one (nodes may be re-run on cached outputs).
    """

    arch: str
    modules: dict[str, LoRAModule]
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    # The trainer's AdamW moments at this step (trainer.optimizer_state), when a trainer made this
    # object: Stage 2 continues stage 1's optimizer from it. Never written into the LoRA file
    # (stock loaders would see unknown keys); checkpoints keep it beside the file.
    optimizer_state: dict[str, torch.Tensor] | None = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self):
        arch = get_arch(self.arch)
        for path in self.modules:
            try:
                module_to_diffusers(path, arch)  # every savable LDM path maps; anything else is a caller bug
            except ValueError as e:
                raise ValueError(
                    f"LoRA module {path!r} is not an LDM path relative to diffusion_model "
                    f"(like 'output_blocks.1.1.transformer_blocks.0.attn1.to_q')"
                ) from e
        bad = sorted(k for k, v in self.metadata.items() if not isinstance(k, str) or not isinstance(v, str))
        if bad:
            raise ValueError(
                f"safetensors metadata holds strings only; convert these values with str() or json.dumps(): {bad[:5]}"
            )

    @property
    def style_blocks(self) -> list[str]:
        """The style blocks the trainer that wrote this LoRA recorded (empty for other files)."""
        return [b for b in self.metadata.get(meta_keys.STYLE_BLOCKS, "").split(",") if b]

    @property
    def rank(self) -> int:
        """The largest rank of its modules (a trainer's files have one rank throughout)."""
        return max(m.rank for m in self.modules.values())

    def blocks(self) -> list[str]:
        """The LDM blocks this LoRA touches, in execution order (modules outside blocks not listed)."""
        return sorted({b for b in map(block_of, self.modules) if b is not None}, key=block_sort_key)

    def filter_blocks(self, blocks) -> StyleLoRA:
        """Keep the modules of the given blocks (any spelling), matched whole: ``output_blocks.1.1``
        never keeps ``output_blocks.10.1``. A string is read as a comma/space separated list."""
        keep = set(parse_block_list(blocks) if isinstance(blocks, str) else map(normalize_block, blocks))
        modules = {p: m for p, m in self.modules.items() if block_of(p) in keep}
        return StyleLoRA(self.arch, modules, dict(self.metadata))

    def scaled(self, block_strengths: dict[str, float], default: float = 1.0, alpha_squared: bool = False) -> StyleLoRA:
        """Fold a strength per block into ``up``; blocks not named get ``default``.

        ``alpha_squared`` follows B-LoRA, whose ``scale_lora`` multiplies both down and up by s, so a
        strength s there means s*s here; use it to reproduce their published settings.
        """
        strengths = {normalize_block(b): float(s) for b, s in block_strengths.items()}
        modules = {}
        for path, m in self.modules.items():
            s = strengths.get(block_of(path), float(default))
            factor = s * s if alpha_squared else s
            modules[path] = dataclasses.replace(m, up=(m.up.float() * factor).to(m.up.dtype))
        return StyleLoRA(self.arch, modules, dict(self.metadata))

    def non_finite(self) -> list[str]:
        """Module paths whose weights hold NaN or inf (a diverged training, a damaged file)."""
        return [p for p, m in self.modules.items()
                if not (torch.isfinite(m.down).all() and torch.isfinite(m.up).all())]

    def misfits(self, weight_shapes: dict[str, tuple[int, ...]]) -> list[str]:
        """What does not fit a model whose weights have ``weight_shapes`` ({module path: weight
        shape}): modules the model lacks and updates of another shape. Convs compare flattened,
        since TrainLoraNode stores their downs 2-D."""
        problems = []
        for path, m in self.modules.items():
            shape = weight_shapes.get(path)
            if shape is None:
                problems.append(f"{path} (the model has no such layer)")
                continue
            want = (shape[0], math.prod(shape[1:]))
            got = (m.up.shape[0], math.prod(m.down.shape[1:]))
            if want != got:
                problems.append(f"{path} (LoRA {got[0]}x{got[1]}, model {'x'.join(map(str, shape))})")
        return problems

    def block_norms(self) -> dict[str, float]:
        """Per block, ``sqrt(sum ||delta||_F²)`` over its modules: how much each block changes the model."""
        squares: dict[str, float] = {}
        for path, m in self.modules.items():
            block = block_of(path)
            if block is not None:
                squares[block] = squares.get(block, 0.0) + m.norm() ** 2
        return {b: math.sqrt(squares[b]) for b in sorted(squares, key=block_sort_key)}


def require_finite(lora: StyleLoRA, what: str = "this LoRA") -> StyleLoRA:
    """``lora``, or ValueError naming its NaN/inf modules."""
    bad = lora.non_finite()
    if bad:
        raise ValueError(f"{what} has NaN or inf weights in {len(bad)} of {len(lora.modules)} modules "
                         f"(e.g. {bad[0]}): it comes from a training that diverged or the file is damaged; "
                         "use an earlier checkpoint, or retrain with a lower learning rate or fp32")
    return lora


def require_fit(lora: StyleLoRA, weight_shapes: dict[str, tuple[int, ...]], model_family: str,
                what: str = "this LoRA") -> StyleLoRA:
    """``lora``, or ValueError when any of its modules does not fit the model (another family or
    width: an SD1.5 LoRA on SDXL, an SD2.x LoRA on SD1.5), before anything is patched."""
    bad = lora.misfits(weight_shapes)
    if bad:
        raise ValueError(f"{what} does not fit this {FAMILY_NAMES[model_family]} model: {len(bad)} of "
                         f"{len(lora.modules)} modules differ, e.g. {'; '.join(bad[:3])}. It was trained on "
                         "another model family or width; pick a LoRA trained on this checkpoint's family, or "
                         "load the checkpoint it was trained on")
    return lora


def lora_from_modules(arch: str, modules: dict[str, tuple], metadata: dict[str, str] | None = None) -> StyleLoRA:
    """``{ldm_path: (down, up, alpha)}`` -> StyleLoRA; the short way for trainers to hand over weights."""
    built = {path: LoRAModule(down, up, alpha) for path, (down, up, alpha) in modules.items()}
    return StyleLoRA(arch, built, dict(metadata or {}))


# ---------------------------------------------------------------------------- writing


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A detached, CPU, contiguous copy: safetensors refuses views that share storage."""
    return tensor.detach().to("cpu", copy=True).contiguous()


def to_kohya_state_dict(lora: StyleLoRA) -> dict[str, torch.Tensor]:
    """Kohya layout: LDM names for SDXL, diffusers names for SD1.x, what kohya's trainers write."""
    arch = get_arch(lora.arch)
    state_dict = {}
    for path, module in lora.modules.items():
        name = module_to_kohya(path, arch)
        up = module.up
        if module.down.ndim == 4 and up.ndim == 2:  # kohya's conv LoRA has a 1x1 conv as up
            up = up[:, :, None, None]
        state_dict[name + KOHYA_DOWN] = _plain(module.down)
        state_dict[name + KOHYA_UP] = _plain(up)
        state_dict[name + ALPHA_SUFFIX] = torch.tensor(module.alpha, dtype=torch.float32)
    return state_dict


def kohya_metadata(lora: StyleLoRA) -> dict[str, str]:
    """``lora.metadata`` plus the keys kohya tools and UIs read, and the pack's own. The computed keys
    win over stale copies in ``lora.metadata`` (a filtered LoRA has fewer blocks than its source)."""
    first = next(iter(lora.modules.values()), None)
    metadata = dict(lora.metadata)
    metadata.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max((m.rank for m in lora.modules.values()), default=0)),
        "ss_network_alpha": str(first.alpha if first is not None else 0.0),
        "ss_base_model_version": BASE_MODEL_VERSION[lora.arch],
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[lora.arch],
        meta_keys.PACK_VERSION: PACK_VERSION,
        meta_keys.ARCH: lora.arch,
        meta_keys.BLOCKS: json.dumps(lora.blocks()),
    })
    return metadata


def save_lora(lora: StyleLoRA, path: str | os.PathLike) -> str:
    """Write ``lora`` as a kohya ``.safetensors`` file, atomically.

    The file is written next to the target under a temporary name and moved into place, so a crash
    or a Cancel never leaves a half-written LoRA that LoraLoader would list, and an existing file at
    ``path`` stays intact until the new one is complete.
    """
    path = os.fspath(path)
    if not path.lower().endswith(SAFETENSORS_EXTENSION):
        stem = os.path.splitext(os.path.basename(path))[0] or "lora"
        raise ValueError(f"LoRA files are saved as .safetensors only; name the file {stem + SAFETENSORS_EXTENSION!r}")
    if not lora.modules:
        raise ValueError("this LoRA has no modules (were all its blocks filtered out?); nothing to save")
    require_finite(lora)
    state_dict, metadata = to_kohya_state_dict(lora), kohya_metadata(lora)
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(state_dict, tmp, metadata=metadata)
    return path


OPTIMIZER_SUFFIX = ".optimizer"  # not an extension ComfyUI lists, so no loader offers the file


def optimizer_path(lora_path: str | os.PathLike) -> str:
    """Where a checkpoint's optimizer state lives: beside it, ``<file>.safetensors.optimizer``."""
    return os.fspath(lora_path) + OPTIMIZER_SUFFIX


def save_optimizer_state(state: dict[str, torch.Tensor], lora_path: str | os.PathLike,
                         metadata: dict[str, str]) -> str:
    """The AdamW state of a checkpoint (``trainer.optimizer_state``), beside it, atomically.
    ``metadata`` (step and run id) ties it to the LoRA file it belongs to."""
    path = optimizer_path(lora_path)
    with atomic_path(path) as tmp:
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata=metadata)
    return path


def load_optimizer_state(lora_path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """(state, metadata) saved beside ``lora_path``, or None when there is none."""
    path = optimizer_path(lora_path)
    if not os.path.isfile(path):
        return None
    with safetensors.safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


# ---------------------------------------------------------------------------- reading


@dataclass
class _SortedKeys:
    """The keys of a state dict, sorted by what they are; LoRA pairs keyed by their raw prefix."""

    downs: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    ups: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    alphas: dict[str, float] = dataclasses.field(default_factory=dict)
    text_encoder: int = 0
    skipped: int = 0
    unknown: list[str] = dataclasses.field(default_factory=list)


def _classify(key: str) -> tuple[str, str]:
    """``(kind, prefix)`` of one key; kind is te, down, up, alpha, skip or unknown."""
    if key.startswith(TEXT_ENCODER_PREFIXES):
        return "te", key
    for down, up in PAIR_SUFFIXES:
        if key.endswith(down):
            return "down", key[: -len(down)]
        if key.endswith(up):
            return "up", key[: -len(up)]
    if key.endswith(ALPHA_SUFFIX):
        return "alpha", key[: -len(ALPHA_SUFFIX)]
    if key.endswith(NOT_LORA_SUFFIXES):
        return "skip", key
    return "unknown", key


def _alpha_value(key: str, tensor: torch.Tensor) -> float:
    """An ``.alpha`` entry as one finite number; anything else names the key."""
    if tensor.numel() != 1:
        raise ValueError(f"{key} holds {tensor.numel()} values {tuple(tensor.shape)}; a LoRA alpha is one "
                         "number, so the file is damaged or not a LoRA: re-export or re-download it")
    value = float(tensor.float().item())
    if not math.isfinite(value):
        raise ValueError(f"{key} is {value}; a LoRA alpha must be a finite number: re-export or re-download the file")
    return value


def _sort_keys(sd: dict[str, torch.Tensor]) -> _SortedKeys:
    keys = _SortedKeys()
    for key, tensor in sd.items():
        kind, prefix = _classify(key)
        if kind == "down":
            keys.downs[prefix] = tensor
        elif kind == "up":
            keys.ups[prefix] = tensor
        elif kind == "alpha":
            keys.alphas[prefix] = _alpha_value(key, tensor)
        elif kind == "te":
            keys.text_encoder += 1
        elif kind == "skip":
            keys.skipped += 1
        else:
            keys.unknown.append(key)
    return keys


def _check_keys(keys: _SortedKeys, sd: dict[str, torch.Tensor]) -> None:
    """Fail with a message that says what the file is, before any tensor is touched."""
    if not keys.downs and not keys.ups:
        if keys.text_encoder:
            raise ValueError(
                f"this is a text-encoder-only LoRA ({keys.text_encoder} text-encoder keys, no UNet keys); "
                f"the pack works on the UNet (diffusion model), so load it with the stock LoraLoader instead"
            )
        raise ValueError(
            f"no LoRA keys found among its {len(sd)} keys (e.g. {sorted(sd)[:5]}); expected pairs like "
            f"'<module>{KOHYA_DOWN}' / '<module>{KOHYA_UP}'"
        )
    if keys.unknown:
        raise ValueError(
            f"{len(keys.unknown)} keys are not LoRA weights this loader understands (LoHa, LoKr, DoRA and "
            f"full weights are not supported): {sorted(keys.unknown)[:5]}"
        )
    no_up = sorted(set(keys.downs) - set(keys.ups))
    no_down = sorted(set(keys.ups) - set(keys.downs))
    if no_up or no_down:
        raise ValueError(
            f"unmatched LoRA weights, the file is incomplete: {len(no_up)} down without up {no_up[:5]}, "
            f"{len(no_down)} up without down {no_down[:5]}"
        )


def _module_path(prefix: str, arch) -> str:
    """A raw key prefix in any supported format -> LDM module path (ValueError if it has none)."""
    path, underscored = prefix, False
    stripped = True
    while stripped:
        stripped = False
        for head in UNET_PREFIXES:
            if path.startswith(head):
                path, stripped = path[len(head):], True
                underscored |= head == KOHYA_UNET_PREFIX
    if underscored:
        path = underscores_to_dots(path)
    path = path.replace(".processor.", ".")  # attention-processor form: attn1.processor.to_q
    if path.endswith(".to_out"):
        path += ".0"
    return module_to_ldm(path, arch)


def _default_alpha(metadata: dict[str, str]) -> float | None:
    """PEFT's lora_alpha from diffusers' metadata, for pairs without an ``.alpha`` key. None means
    alpha = rank (scale 1), which is what ComfyUI's loader does when alpha is missing."""
    try:
        config = json.loads(metadata.get(PEFT_METADATA_KEY) or "{}")
    except json.JSONDecodeError:
        return None
    for key in ("unet.lora_alpha", "lora_alpha"):
        if isinstance(config, dict) and config.get(key) is not None:
            return float(config[key])
    return None


def _build_modules(keys: _SortedKeys, arch, default_alpha: float | None) -> dict[str, LoRAModule]:
    modules, unmapped, sources = {}, [], {}
    for prefix in sorted(keys.downs):
        try:
            path = _module_path(prefix, arch)
        except ValueError:
            unmapped.append(prefix)
            continue
        if path in sources:
            raise ValueError(f"{sources[path]!r} and {prefix!r} both map to module {path!r}; the file mixes two LoRAs")
        down, up = keys.downs[prefix], keys.ups[prefix]
        alpha = keys.alphas.get(prefix, default_alpha if default_alpha is not None else down.shape[0])
        try:
            modules[path] = LoRAModule(down, up, alpha)
        except ValueError as e:
            raise ValueError(f"{prefix}: {e}") from e
        sources[path] = prefix
    if unmapped:
        raise ValueError(
            f"{len(unmapped)} LoRA keys name no {FAMILY_NAMES[arch.name]} UNet module (e.g. {unmapped[:3]}): the "
            f"LoRA is for another model family; pick a LoRA trained on this checkpoint's family"
        )
    return modules


def lora_from_state_dict(sd: dict[str, torch.Tensor], arch: str, metadata: dict[str, str] | None = None) -> StyleLoRA:
    """Any supported LoRA state dict -> StyleLoRA keyed by LDM paths. Text-encoder keys are dropped;
    TrainLoraNode's full ``.diff``/``.diff_b`` tensors are dropped and counted in
    ``metadata["embroidery.skipped_keys"]``."""
    arch_obj = get_arch(arch)
    metadata = dict(metadata or {})
    keys = _sort_keys(sd)
    _check_keys(keys, sd)
    modules = _build_modules(keys, arch_obj, _default_alpha(metadata))
    orphans = sorted(set(keys.alphas) - set(keys.downs))
    if orphans:
        log.warning("ignored %d .alpha keys with no LoRA weights, e.g. %s", len(orphans), orphans[:5])
    if keys.text_encoder:
        log.info("skipped %d text-encoder LoRA keys (the pack works on the UNet only)", keys.text_encoder)
    if keys.skipped:
        log.warning("skipped %d full-tensor .diff/.diff_b keys (norms and biases; not LoRA)", keys.skipped)
        metadata[meta_keys.SKIPPED_KEYS] = str(keys.skipped)
    return StyleLoRA(arch, modules, metadata)


def _arch_from_metadata(metadata: dict[str, str]) -> str | None:
    """The family written by the pack, kohya or modelspec; None if the file does not say."""
    if metadata.get(meta_keys.ARCH) in BASE_MODEL_VERSION:
        return metadata[meta_keys.ARCH]
    version = metadata.get("ss_base_model_version", "") + " " + metadata.get("modelspec.architecture", "")
    if "sdxl" in version or "stable-diffusion-xl" in version:
        return "sdxl"
    if re.search(r"sd_v[12]|stable-diffusion-v[12]", version):
        return "sd15"  # SD2.x shares SD1.x's block layout
    return None


def _guess_arch(sd: dict[str, torch.Tensor]) -> str:
    """SD1.x has one transformer layer per attention block and a 768/1024-wide text context;
    SDXL has 2 or 10 layers and a 2048-wide context, so either sign settles it."""
    for key, tensor in sd.items():
        kind, _ = _classify(key)
        if kind in ("te", "skip", "unknown"):
            continue
        match = _TRANSFORMER_INDEX.search(key)
        if match and int(match.group(1)) >= 1:
            return "sdxl"
        is_context_proj = kind == "down" and "attn2" in key and "to_k" in key and tensor.ndim >= 2
        if is_context_proj and tensor.shape[1] == SDXL_CONTEXT_DIM:
            return "sdxl"
    return "sd15"


def _refuse_pickle(path: str) -> None:
    if path.lower().endswith(PICKLE_EXTENSIONS):
        raise ValueError(
            f"{os.path.basename(path)} is a pickle-based file, which can run code when opened, so it is "
            f"not loaded; convert it to .safetensors (e.g. with kohya's or ComfyUI's converters) and load that"
        )


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            return {key: f.get_tensor(key) for key in f.keys()}, metadata
    except (safetensors.SafetensorError, OSError) as e:
        raise ValueError(
            f"{os.path.basename(path)} is not a readable .safetensors file ({e}); it is damaged or another "
            f"format, re-download or re-export it"
        ) from e


def load_lora(path: str | os.PathLike, arch: str | None = None) -> StyleLoRA:
    """Read a LoRA file of any supported format. ``arch`` ("sd15"/"sdxl") should be passed when the
    caller knows the model family; otherwise it comes from metadata, then from the weights' shapes."""
    path = os.fspath(path)
    _refuse_pickle(path)
    if not os.path.isfile(path):
        raise ValueError(f"LoRA file not found: {path}")
    sd, metadata = _read_safetensors(path)
    name = os.path.basename(path)
    recorded = _arch_from_metadata(metadata)
    if arch is not None and recorded is not None and recorded != arch:
        raise ValueError(f"{name} is a LoRA for {FAMILY_NAMES[recorded]} (its metadata says so) and the model is "
                         f"{FAMILY_NAMES[arch]}; pick a LoRA trained on {FAMILY_NAMES[arch]}, or load a "
                         f"{FAMILY_NAMES[recorded]} checkpoint")
    arch = arch or recorded or _guess_arch(sd)
    try:
        return require_finite(lora_from_state_dict(sd, arch, metadata))
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from e
