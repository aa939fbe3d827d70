"""Activation-space LoRA on chosen modules, with EmoLoRA's prompt router.

A run's LoRA lives in an :class:`AdapterSet`: one trainable (down, up) pair per target module,
which blocks are "style blocks", an on/off switch and the router's context. The set never
touches a model by itself. It hands out replacement ``forward`` functions (:meth:`AdapterSet.
wrap`) that the caller installs and removes: ComfyUI nodes install them as ModelPatcher object
patches on a clone, plain torch code with :func:`installed`. Patching ``forward`` rather than
swapping the module keeps every weight key where ComfyUI expects it, so LoRAs patched upstream
in the graph, low-VRAM casting and weight wrappers keep working under training.

Why not peft's LoRA layers: they replace the module (``to_q`` becomes a wrapper holding
``to_q.base_layer``), which renames the weight keys ComfyUI patches by while the wrapper is in
place, so upstream LoRA patches would silently stop applying to exactly the layers we train.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import keys
from .blocks import block_of, block_sort_key
from .lora_file import StyleLoRA, lora_from_modules

ROUTED_PROJECTIONS = ("attn2.to_k", "attn2.to_v")  # what reads the text context in cross-attention


class LoRAAdapter(nn.Module):
    """delta(x) = (x @ down.T) @ up.T * alpha / rank, computed in x's dtype.

    ``down`` starts Gaussian with std 1/rank (the official EmoLoRA code's PEFT "gaussian" init),
    ``up`` at zero, so a new adapter changes nothing. Parameters stay float32 (master weights);
    they are cast to the activation dtype per call, so bf16/fp16 compute keeps fp32 updates.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 generator: torch.Generator | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.down = nn.Parameter(torch.randn(rank, in_features, generator=generator) / rank)
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        self.alpha = float(alpha)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(x, self.down.to(x.dtype))
        return F.linear(hidden, self.up.to(x.dtype)) * (self.alpha / self.rank)


def _key(name: str) -> str:
    return name.replace(".", "__")  # ModuleDict keys cannot hold dots


@contextlib.contextmanager
def _temporarily(owner, attribute: str, value):
    """``owner.attribute = value`` for the duration of the block, then what it was."""
    previous = getattr(owner, attribute)
    setattr(owner, attribute, value)
    try:
        yield
    finally:
        setattr(owner, attribute, previous)


class AdapterSet(nn.Module):
    """The LoRA of one training run, plus the switches the EmoLoRA steps need."""

    def __init__(self, targets: dict[str, tuple[int, int]], style_blocks: Iterable[str],
                 rank: int = 32, alpha: float = 32.0, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.names = sorted(targets)
        self.adapters = nn.ModuleDict(
            {_key(n): LoRAAdapter(targets[n][0], targets[n][1], rank, alpha, generator) for n in self.names})
        self.style_blocks = list(style_blocks)
        self.routed_modules = {n for n in self.names if self.is_style(n) and n.endswith(ROUTED_PROJECTIONS)}
        self.enabled = True
        self.routed_context: torch.Tensor | None = None

    @classmethod
    def from_style_lora(cls, root: nn.Module, lora: StyleLoRA, seed: int = 0) -> "AdapterSet":
        """Adapters on exactly ``lora``'s modules under ``root``, holding its weights, with the
        style blocks it recorded: how stage 2 continues stage 1, and how a LoRA is applied to a
        plain torch UNet."""
        adapters = cls(linear_targets(root, sorted(lora.modules)), lora.style_blocks, lora.rank, seed=seed)
        adapters.load_style_lora(lora)
        return adapters

    # ------------------------------------------------------------------ membership
    def is_style(self, name: str) -> bool:
        return block_of(name) in self.style_blocks

    def adapter(self, name: str) -> LoRAAdapter:
        return self.adapters[_key(name)]

    def style_parameters(self) -> list[nn.Parameter]:
        return [p for n in self.names if self.is_style(n) for p in self.adapter(n).parameters()]

    def set_trainable(self, which: str) -> None:
        """``"all"``: every adapter learns (EmoLoRA's design step); ``"style"``: only the
        style blocks' adapters (embroidery and contrastive steps). Frozen adapters get no
        gradient at all, so backward stops where the earliest trainable block needs it."""
        if which not in ("all", "style"):
            raise ValueError(f"trainable set must be 'all' or 'style', got {which!r}")
        for n in self.names:
            self.adapter(n).requires_grad_(which == "all" or self.is_style(n))

    # ------------------------------------------------------------------ switches
    def routed(self, context: torch.Tensor | None):
        """While active, the style blocks' cross-attention reads ``context`` (the embroidery
        prompt) instead of the one the model was called with (the design prompt)."""
        return _temporarily(self, "routed_context", context)

    def disabled(self):
        """The base model theta_0: adapters off, routing unchanged."""
        return _temporarily(self, "enabled", False)

    # ------------------------------------------------------------------ installation
    def wrap(self, name: str, original: Callable) -> Callable:
        """A replacement ``forward`` for module ``name`` that adds its LoRA (and routes)."""
        adapter = self.adapter(name)
        routed = name in self.routed_modules

        def forward(x, *args, **kwargs):
            if routed and self.routed_context is not None:
                x = self.routed_context.to(device=x.device, dtype=x.dtype)
            out = original(x, *args, **kwargs)
            if self.enabled:
                out = out + adapter(x).to(out.dtype)
            return out

        return forward

    # ------------------------------------------------------------------ files
    def to_style_lora(self, arch: str, metadata: dict[str, str] | None = None,
                      blocks: Iterable[str] | None = None) -> StyleLoRA:
        keep = set(blocks) if blocks is not None else None
        modules = {}
        for n in self.names:
            if keep is None or block_of(n) in keep:
                a = self.adapter(n)
                modules[n] = (a.down.detach().float().cpu().clone(), a.up.detach().float().cpu().clone(), a.alpha)
        meta = dict(metadata or {})
        meta[keys.STYLE_BLOCKS] = ",".join(self.style_blocks)
        return lora_from_modules(arch, modules, meta)

    def load_style_lora(self, lora: StyleLoRA) -> None:
        """Continue from a saved LoRA: every module of ours must be in the file, same rank."""
        _require_modules(self.names, lora, "the LoRA to resume")
        with torch.no_grad():
            for n in self.names:
                src, dst = lora.modules[n], self.adapter(n)
                if src.down.shape != dst.down.shape or src.up.shape != dst.up.shape:
                    raise ValueError(f"LoRA to resume has rank {src.rank} at {n}, the trainer uses {dst.rank}; "
                                     "set the same rank as the file")
                dst.down.copy_(src.down)
                dst.up.copy_(src.up)
                dst.alpha = src.alpha


# ---------------------------------------------------------------------------- Pair Customization

PAIR_SEED = 123846  # the official Pair Customization code's seed of the orthonormal bases
PAIR_GROUPS = ("content", "style")


def orthonormal_downs(width: int, rank: int, seed: int = PAIR_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair Customization's frozen down matrices for inputs of ``width`` features: the rows
    [0:r] and [r:2r] of the Q of a seeded random width x width matrix, so A_content A_style^T = 0
    and each has orthonormal rows."""
    if 2 * rank > width:
        raise ValueError(f"Pair Customization needs rank <= half the input width: rank {rank} at width {width}; "
                         f"lower the rank to {width // 2} or less")
    q, _ = torch.linalg.qr(torch.randn(width, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q[:rank].float().contiguous(), q[rank:2 * rank].float().contiguous()


class PairAdapter(nn.Module):
    """A content and a style LoRA on one module: frozen orthonormal downs (buffers, never
    trained), trainable ups starting at zero; delta = sum over active groups of up_g down_g x
    alpha / rank."""

    def __init__(self, content_down: torch.Tensor, style_down: torch.Tensor, out_features: int, alpha: float):
        super().__init__()
        rank = content_down.shape[0]
        self.register_buffer("down_content", content_down.clone())
        self.register_buffer("down_style", style_down.clone())
        self.up_content = nn.Parameter(torch.zeros(out_features, rank))
        self.up_style = nn.Parameter(torch.zeros(out_features, rank))
        self.alpha = float(alpha)

    @property
    def rank(self) -> int:
        return self.down_content.shape[0]

    def down(self, group: str) -> torch.Tensor:
        return getattr(self, f"down_{group}")

    def up(self, group: str) -> nn.Parameter:
        return getattr(self, f"up_{group}")

    def forward(self, x: torch.Tensor, groups: Iterable[str]) -> torch.Tensor | None:
        out = None
        for group in groups:
            delta = F.linear(F.linear(x, self.down(group).to(x.dtype)), self.up(group).to(x.dtype))
            out = delta if out is None else out + delta
        return None if out is None else out * (self.alpha / self.rank)


class PairAdapterSet(nn.Module):
    """Pair Customization's two LoRAs of one run, with the switches its steps need: which groups
    are active in a forward (``only``) and which one learns (``set_trainable``). Same interface as
    :class:`AdapterSet`, so the trainer drives it unchanged; ``style_blocks`` is every block (the
    style LoRA is applied whole)."""

    def __init__(self, targets: dict[str, tuple[int, int]], rank: int = 64, alpha: float = 64.0,
                 seed: int = PAIR_SEED):
        super().__init__()
        self.names = sorted(targets)
        bases = {}
        for width in sorted({targets[n][0] for n in self.names}):
            bases[width] = orthonormal_downs(width, rank, seed)
        self.adapters = nn.ModuleDict({_key(n): PairAdapter(*bases[targets[n][0]], targets[n][1], alpha)
                                       for n in self.names})
        self.style_blocks = sorted({block_of(n) for n in self.names}, key=block_sort_key)
        self.routed_modules: set[str] = set()  # no prompt routing
        self.enabled = True
        self.active_groups: tuple[str, ...] = PAIR_GROUPS
        self.routed_context = None

    def adapter(self, name: str) -> PairAdapter:
        return self.adapters[_key(name)]

    def is_style(self, name: str) -> bool:
        return True

    def set_trainable(self, which: str) -> None:
        """Only ``which`` group's ups learn ("content" or "style"); the downs never do."""
        if which not in PAIR_GROUPS:
            raise ValueError(f"trainable group must be one of {PAIR_GROUPS}, got {which!r}")
        for n in self.names:
            for group in PAIR_GROUPS:
                self.adapter(n).up(group).requires_grad_(group == which)

    def only(self, groups: Iterable[str]):
        """While active, only ``groups`` add their LoRA (the content step runs theta + theta_c)."""
        return _temporarily(self, "active_groups", tuple(groups))

    def routed(self, context):
        return contextlib.nullcontext()  # Pair Customization does not route prompts

    def disabled(self):
        """The base model: both LoRAs off."""
        return _temporarily(self, "enabled", False)

    def wrap(self, name: str, original: Callable) -> Callable:
        adapter = self.adapter(name)

        def forward(x, *args, **kwargs):
            out = original(x, *args, **kwargs)
            if self.enabled:
                delta = adapter(x, self.active_groups)
                if delta is not None:
                    out = out + delta.to(out.dtype)
            return out

        return forward

    def to_style_lora(self, arch: str, metadata: dict[str, str] | None = None, group: str = "style") -> StyleLoRA:
        """One of the two LoRAs as an ordinary LoRA file's content (down = the frozen basis)."""
        modules = {}
        for n in self.names:
            a = self.adapter(n)
            modules[n] = (a.down(group).detach().float().cpu().clone(), a.up(group).detach().float().cpu().clone(),
                          a.alpha)
        meta = dict(metadata or {})
        meta[keys.STYLE_BLOCKS] = ",".join(self.style_blocks)
        return lora_from_modules(arch, modules, meta)

    EXTRA_PREFIX = "extra."

    def extra_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint of the style LoRA alone lacks to resume: the content LoRA's ups
        (kept beside the checkpoint with the optimizer state)."""
        return {f"{self.EXTRA_PREFIX}{n}.up_content": self.adapter(n).up_content.detach().float().cpu().clone()
                for n in self.names}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if f"{self.EXTRA_PREFIX}{n}.up_content" not in state]
        if missing:
            raise ValueError(f"the saved training state lacks the content LoRA of {len(missing)} modules "
                             f"(e.g. {missing[0]}); resume from a checkpoint of this trainer")
        with torch.no_grad():
            for n in self.names:
                self.adapter(n).up_content.copy_(state[f"{self.EXTRA_PREFIX}{n}.up_content"])

    def load_style_lora(self, lora: StyleLoRA, group: str = "style") -> None:
        """Continue ``group`` from a LoRA this set wrote: same modules and rank, and the same frozen
        basis (another seed or rank would not be the same run)."""
        _require_modules(self.names, lora, f"the {group} LoRA to resume")
        with torch.no_grad():
            for n in self.names:
                src, dst = lora.modules[n], self.adapter(n)
                if src.up.shape != dst.up(group).shape or not torch.allclose(src.down, dst.down(group), atol=1e-6):
                    raise ValueError(f"the {group} LoRA to resume has another rank or basis at {n} than this run "
                                     "(rank and seed must match the file)")
                dst.up(group).copy_(src.up)


def _require_modules(names: list[str], lora: StyleLoRA, what: str) -> None:
    missing = [n for n in names if n not in lora.modules]
    if missing:
        raise ValueError(f"{what} lacks {len(missing)} of the {len(names)} trained modules "
                         f"(e.g. {missing[0]}); resume only from a file this trainer wrote")


def linear_targets(root: nn.Module, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """(in, out) features of each named Linear under ``root``; a clear error for the rest."""
    modules = dict(root.named_modules())
    targets = {}
    for name in names:
        module = modules.get(name)
        if module is None:
            raise ValueError(f"the model has no module {name!r}: is the block list for another model family?")
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name!r} is a {type(module).__name__}, LoRA targets must be Linear layers")
        targets[name] = (module.in_features, module.out_features)
    return targets


@contextlib.contextmanager
def installed(root: nn.Module, adapters):
    """Install forward wrappers on a plain torch model for the duration of the block.

    ``adapters`` is anything with ``names`` and ``wrap(name, original)``: an AdapterSet, a
    block_metric.FeatureRecorder, or gradient checkpointing."""
    modules = dict(root.named_modules())
    patched = []
    try:
        for name in adapters.names:
            module = modules[name]
            had_own = "forward" in module.__dict__
            patched.append((module, had_own, module.__dict__.get("forward")))
            module.forward = adapters.wrap(name, module.forward)
        yield adapters
    finally:
        for module, had_own, previous in reversed(patched):
            if had_own:
                module.forward = previous
            else:
                del module.forward


class Checkpointing:
    """Gradient checkpointing as forward wrappers on whole UNet sub-blocks (ResBlock,
    SpatialTransformer...): activations inside them are recomputed in backward instead of kept."""

    def __init__(self, root: nn.Module):
        self.names = [f"{group}.{i}.{j}" for group in ("input_blocks", "output_blocks")
                      for i, block in enumerate(getattr(root, group)) for j, _ in enumerate(block)]
        self.names += [f"middle_block.{j}" for j, _ in enumerate(root.middle_block)]

    def wrap(self, name: str, original: Callable) -> Callable:
        from torch.utils.checkpoint import checkpoint

        def forward(*args, **kwargs):
            if not torch.is_grad_enabled():
                return original(*args, **kwargs)
            return checkpoint(original, *args, use_reentrant=False, **kwargs)

        return forward
