"""Applying a trained style at sampling time, in plain torch (no ComfyUI imports).

Reading order: the guidance formula (Pair Customization, METHODS.md section 2) -> the switchable
weight-space LoRA that produces the style prediction -> the sampling window -> the B-LoRA block mix
(METHODS.md section 5).

Pair Customization's style guidance, per sampling step::

    eps = eps(neg) + cfg * (eps(pos) - eps(neg)) + sum_i w_i * (eps_{theta + style_i}(pos) - eps(pos))

ComfyUI hands a guidance hook *denoised* predictions instead of eps; :func:`style_delta_in_denoised_space`
explains why the same formula holds there unchanged.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from . import keys
from .blocks import normalize_block
from .lora_file import LoRAModule, StyleLoRA

# ---------------------------------------------------------------------------- the formula


def style_delta_in_denoised_space(cond_denoised: torch.Tensor, style_denoised: torch.Tensor,
                                  weight: float) -> torch.Tensor:
    """``weight * (style_denoised - cond_denoised)``: one style's guidance term, added to the CFG result.

    Why denoised space gives exactly the eps-space formula: for an eps model ComfyUI computes
    ``D = x - sigma * eps`` (``model_sampling.calculate_denoised``), with the same ``x`` and ``sigma``
    for the negative, positive and style passes of one step. The guided prediction is an affine
    combination whose coefficients sum to one (``(1 - cfg) + (cfg - w) + w = 1``), so the ``x`` terms
    cancel inside every difference and survive once outside::

        D_u + cfg (D_c - D_u) + w (D_s - D_c) = x - sigma * [eps_u + cfg (eps_c - eps_u) + w (eps_s - eps_c)]

    i.e. the guided denoised value is ``x - sigma * eps_hat`` of the paper's guided eps, term by term
    (``D_s - D_c = -sigma (eps_s - eps_c)``: the sign flip and the factor sigma are the same affine map
    applied to every prediction). The argument holds for any parameterisation whose denoised output is
    ``a(sigma) x + b(sigma) * model_output`` (v-prediction, flow matching), so this works for them too.
    """
    return (style_denoised - cond_denoised) * weight


def combine_guidance(uncond: torch.Tensor, cond: torch.Tensor,
                     styles: Sequence[tuple[float, torch.Tensor]], cfg: float) -> torch.Tensor:
    """``uncond + cfg * (cond - uncond) + sum_i w_i * (style_i - cond)`` for ``styles = [(w_i, style_i)]``.

    Works on eps or on denoised predictions alike (see :func:`style_delta_in_denoised_space`).
    The CFG part is written exactly as ComfyUI's ``cfg_function`` does, so with no styles the result
    is bit-identical to plain CFG.
    """
    out = uncond + (cond - uncond) * cfg
    for weight, style in styles:
        out = out + style_delta_in_denoised_space(cond, style, weight)
    return out


def eps_to_denoised(x: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """``x - sigma * eps``, ComfyUI's denoised value of an eps model (sigma broadcast over the batch)."""
    return x - eps * _per_sample(sigma, x)


def denoised_to_eps(x: torch.Tensor, denoised: torch.Tensor, sigma) -> torch.Tensor:
    """Inverse of :func:`eps_to_denoised` (sigma must be > 0)."""
    return (x - denoised) / _per_sample(sigma, x)


def _per_sample(sigma, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.reshape(sigma.shape[:1] + (1,) * (x.ndim - 1)) if sigma.ndim else sigma


# ---------------------------------------------------------------------------- switchable LoRA


class StyleGate:
    """One on/off switch shared by every LoRA delta of one style. Off by default, so the model
    behaves as the base model except inside :meth:`active` (the extra style pass).

    Copies are the same switch: ComfyUI deep-copies ``model_options`` (and with it the guidance
    function that flips the gate) on every ``ModelPatcher.clone()``, but only shallow-copies the
    weight wrappers; a copied gate would switch nothing.
    """

    def __init__(self):
        self.enabled = False

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    @contextlib.contextmanager
    def active(self):
        self.enabled = True
        try:
            yield
        finally:  # an interrupted pass must never leave the style switched on
            self.enabled = False


class GatedLoRAWeight:
    """A weight wrapper ``fn(weight) -> weight``: adds ``strength * up @ down * alpha / rank`` while
    its gate is on and returns the weight untouched (same object) while it is off.

    The delta is rebuilt on every gated call from the rank-r factors instead of being cached, because
    a full-size delta per layer would double the memory of the style blocks.
    """

    def __init__(self, module: LoRAModule, strength: float, gate: StyleGate):
        self.down = module.down.detach()
        self.up = module.up.detach()
        self.scale = module.scale * float(strength)
        self.gate = gate

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.gate.enabled:
            return weight
        up = self.up.to(device=weight.device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=weight.device, dtype=torch.float32).flatten(1)
        delta = (up @ down).reshape(weight.shape) * self.scale
        return (weight.float() + delta).to(weight.dtype)

    def delta_numel(self) -> int:
        return self.up.shape[0] * self.down[0].numel()

    def move_to(self, device=None) -> int:
        """Called by ComfyUI's model loader: keep the factors next to the weights; returns bytes held."""
        if device is not None:
            self.down, self.up = self.down.to(device), self.up.to(device)
        return self.down.nbytes + self.up.nbytes


def gated_weight_wrappers(lora: StyleLoRA, strength: float, gate: StyleGate) -> dict[str, GatedLoRAWeight]:
    """``{"<ldm module path>.weight": wrapper}`` for every module of ``lora``, all on one gate."""
    return {f"{path}.weight": GatedLoRAWeight(module, strength, gate) for path, module in lora.modules.items()}


def check_wrapper_shapes(wrappers: dict[str, GatedLoRAWeight], weight_shapes: dict[str, tuple]) -> None:
    """Fail before sampling when a LoRA module has no weight of a matching size in the model."""
    missing = sorted(k for k in wrappers if k not in weight_shapes)
    if missing:
        raise ValueError(f"{len(missing)} LoRA modules have no weight in this model (LoRA for another model "
                         f"family?), e.g. {missing[:3]}")
    wrong = [f"{k}: LoRA {w.delta_numel()} values, model {tuple(weight_shapes[k])}" for k, w in wrappers.items()
             if w.delta_numel() != _numel(weight_shapes[k])]
    if wrong:
        raise ValueError(f"{len(wrong)} LoRA modules do not fit this model's weights (LoRA for another model "
                         f"size?), e.g. {wrong[:3]}")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ---------------------------------------------------------------------------- when to guide

PERCENT_ALWAYS = (0.0, 1.0)


def check_window(start_percent: float, end_percent: float) -> None:
    if not 0.0 <= start_percent <= end_percent <= 1.0:
        raise ValueError(f"start_percent ({start_percent}) must be <= end_percent ({end_percent}), both in 0..1")


def in_window(sigma, start_percent: float, end_percent: float,
              percent_to_sigma: Callable[[float], float]) -> bool:
    """Whether a step at noise level ``sigma`` lies in the window, in ComfyUI's convention
    (ControlNet, ConditioningSetTimestepRange): percent 0 is the first, noisiest step and 1 the end,
    so the window is ``percent_to_sigma(end) <= sigma <= percent_to_sigma(start)``.
    Pair Customization's "style LoRA only while t <= 800" is ``start_percent = 1 - 800/999 ~ 0.2``.
    """
    if (start_percent, end_percent) == PERCENT_ALWAYS:
        return True
    value = float(torch.as_tensor(sigma).flatten()[0])
    return float(percent_to_sigma(end_percent)) <= value <= float(percent_to_sigma(start_percent))


# ---------------------------------------------------------------------------- conds for an extra pass


def copy_conds(conds: list[dict]) -> list[dict]:
    """Copies of a sampler's cond dicts for one more model pass: the dicts are new (nothing a pass
    writes lands in the sampler's own conds) and a ``control`` that is already a dict of residual
    lists gets new lists, because the UNet pops residuals from those lists as it consumes them
    (COMFY_API.md section 8). Tensors and ControlNet objects are shared, not copied."""
    copied = []
    for cond in conds:
        cond = dict(cond)
        control = cond.get("control")
        if isinstance(control, dict):
            cond["control"] = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in control.items()}
        copied.append(cond)
    return copied


# ---------------------------------------------------------------------------- B-LoRA block mix


def mix_block_loras(parts: Sequence[tuple[StyleLoRA, Sequence[str], float]], alpha_squared: bool = False,
                    names: Sequence[str] | None = None) -> StyleLoRA:
    """One LoRA made of chosen blocks of several LoRAs, each at its own strength (B-LoRA: content
    block W4 of one image's LoRA + style block W5 of another's).

    ``parts`` is ``[(lora, blocks, strength)]``; blocks in any spelling. Parts with strength 0 add
    nothing and are left out. Raises ValueError when two parts claim the same block (their updates
    would silently add up), when the families differ, or when a part has no weights in its blocks.
    ``alpha_squared`` folds strength s in as s*s (B-LoRA's ``scale_lora`` scales both factors).
    ``names`` label the parts in error messages (default "part 1", "part 2", ...).
    """
    if not parts:
        raise ValueError("mix_block_loras needs at least one (lora, blocks, strength) part")
    names = list(names) if names is not None else [f"part {i + 1}" for i in range(len(parts))]
    if len(names) != len(parts):
        raise ValueError(f"got {len(parts)} parts but {len(names)} names")
    arch = parts[0][0].arch
    owner: dict[str, int] = {}
    modules: dict[str, LoRAModule] = {}
    for i, (lora, blocks, strength) in enumerate(parts):
        if lora.arch != arch:
            raise ValueError(f"{names[i]} is a {lora.arch} LoRA but {names[0]} is {arch}; mix LoRAs of one family")
        chosen = [normalize_block(b) for b in blocks]
        for block in chosen:
            if block in owner and owner[block] != i:
                raise ValueError(f"block {block} is taken by {names[owner[block]]} and {names[i]}; "
                                 f"give each its own blocks")
            owner[block] = i
        selected = lora.filter_blocks(chosen)
        if not selected.modules:
            raise ValueError(f"{names[i]} has no weights in {', '.join(chosen)}; it touches "
                             f"{', '.join(lora.blocks()) or 'no UNet block'}")
        if float(strength) != 0.0:
            scaled = selected.scaled({}, default=float(strength), alpha_squared=alpha_squared)
            modules.update(scaled.modules)
    return StyleLoRA(arch, modules, {keys.MIX_BLOCKS: ",".join(sorted(owner))})
