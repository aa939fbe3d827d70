"""Memory presets of the trainers: what each one changes, and the optimizer it needs.

A preset is two switches that each change the trainer's real behaviour:

- ``gradient_checkpointing``: :meth:`MemoryPreset.providers` adds :class:`adapters.Checkpointing`
  to the forward wrappers the caller installs, so activations inside each UNet sub-block are recomputed in backward instead of kept.
  By far the biggest lever (activations dominate), at the price of one extra forward per step.
- ``optimizer_state``: where AdamW keeps its two moments. ``"fp32"`` is torch's AdamW on the
  adapters' device; ``"cpu_offload"`` keeps the moments and an fp32 master copy in host memory
  (:class:`CPUOffloadAdamW`): the same update, 2x the LoRA's size less device memory, two copies
  of the LoRA over the bus per optimizer step.

Every preset computes the same update; they trade device memory for time only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters import Checkpointing
from .trainer import Config, OptimizerFactory, adamw

OPTIMIZER_STATES = ("fp32", "cpu_offload")


class CPUOffloadAdamW(torch.optim.Optimizer):
    """AdamW whose state lives in host memory.

    The device keeps only the parameters and their gradients. Each step copies the gradients
    into host buffers, runs torch's AdamW on fp32 host copies of the parameters, and copies the
    updated values back. A parameter without a gradient is skipped entirely (no weight decay
    either), exactly as in torch's AdamW, which the EmoLoRA steps on theta_e alone rely on.
    ``param_groups`` are the device parameters, so ``zero_grad`` and GradScaler work as usual.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._host: dict[torch.Tensor, torch.Tensor] = {}
        self._host_grad: dict[torch.Tensor, torch.Tensor] = {}
        host_groups = []
        for group in self.param_groups:
            hosts = []
            for p in group["params"]:
                pin = p.device.type == "cuda"  # pinned buffers make the copies asynchronous
                self._host[p] = _host_copy(p, pin)
                self._host_grad[p] = torch.empty(p.shape, dtype=torch.float32, pin_memory=pin)
                hosts.append(self._host[p])
            host_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": hosts})
        self.inner = torch.optim.AdamW(host_groups)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped = []
        for group, host_group in zip(self.param_groups, self.inner.param_groups):
            host_group.update({k: v for k, v in group.items() if k != "params"})  # lr etc. may change
            for p in group["params"]:
                host = self._host[p]
                if p.grad is None:
                    host.grad = None
                    continue
                host.grad = self._host_grad[p]
                host.grad.copy_(p.grad, non_blocking=True)
                stepped.append(p)
        _synchronize(stepped)
        self.inner.step()
        for p in stepped:
            p.copy_(self._host[p], non_blocking=True)
        return loss


    def state_of(self, p: torch.Tensor) -> dict:
        """AdamW's state of device parameter ``p`` (held for its host copy)."""
        return self.inner.state[self._host[p]]

    def set_state_of(self, p: torch.Tensor, state: dict) -> None:
        self.inner.state[self._host[p]] = {k: v.to("cpu", torch.float32).clone() for k, v in state.items()}


def _host_copy(p: torch.Tensor, pin: bool) -> torch.Tensor:
    return torch.empty(p.shape, dtype=torch.float32, pin_memory=pin).copy_(p.detach())


def _synchronize(params: list[torch.Tensor]) -> None:
    for device in {p.device for p in params if p.device.type == "cuda"}:
        torch.cuda.synchronize(device)


def cpu_offload_adamw(params: list[torch.nn.Parameter], config: Config) -> torch.optim.Optimizer:
    return CPUOffloadAdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


_OPTIMIZERS: dict[str, OptimizerFactory] = {"fp32": adamw, "cpu_offload": cpu_offload_adamw}


@dataclass(frozen=True)
class MemoryPreset:
    name: str
    gradient_checkpointing: bool
    optimizer_state: str  # one of OPTIMIZER_STATES
    description: str

    def __post_init__(self):
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise ValueError(f"optimizer_state must be one of {OPTIMIZER_STATES}, got {self.optimizer_state!r}")

    @property
    def optimizer_factory(self) -> OptimizerFactory:
        """For ``Trainer(optimizer_factory=...)``."""
        return _OPTIMIZERS[self.optimizer_state]

    def providers(self, adapters, unet: torch.nn.Module) -> list:
        """The forward wrappers a run installs on ``unet`` (the ``diffusion_model``): the
        adapters, then gradient checkpointing if this preset uses it."""
        return [adapters] + ([Checkpointing(unet)] if self.gradient_checkpointing else [])


MEMORY_PRESETS: dict[str, MemoryPreset] = {p.name: p for p in (
    MemoryPreset("speed", gradient_checkpointing=False, optimizer_state="fp32",
                 description="Keep every activation: fastest steps, most memory."),
    MemoryPreset("balanced", gradient_checkpointing=True, optimizer_state="fp32",
                 description="Recompute activations in backward (the trainers' default)."),
    MemoryPreset("low_vram", gradient_checkpointing=True, optimizer_state="cpu_offload",
                 description="Recompute activations and keep AdamW's state in CPU memory."),
)}
DEFAULT_MEMORY_PRESET = "balanced"


def get_memory_preset(name: str) -> MemoryPreset:
    if name not in MEMORY_PRESETS:
        raise ValueError(f"unknown memory preset {name!r}; choose one of {list(MEMORY_PRESETS)}")
    return MEMORY_PRESETS[name]
