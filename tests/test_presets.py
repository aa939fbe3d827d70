"""Memory presets: each switch changes what the trainer really does, never the update it makes."""
import contextlib

import pytest
import torch

from embroidery_core.adapters import AdapterSet, Checkpointing, installed, linear_targets
from embroidery_core.diffusion import Cond, TorchDenoiser
from embroidery_core.presets import (DEFAULT_MEMORY_PRESET, MEMORY_PRESETS, CPUOffloadAdamW, MemoryPreset,
                                     get_memory_preset)
from embroidery_core.methods import EMOLORA, EmoLoRAConfig
from embroidery_core.trainer import PairLatents, Trainer, iteration

@pytest.fixture(autouse=True)
def one_thread():
    """Ops this small only lose to thread handoffs on shared CI cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


STYLE = ["input_blocks.5.1", "input_blocks.7.1", "output_blocks.1.1", "output_blocks.2.1"]


def make_pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    design = torch.randn(1, 4, 8, 8, generator=g)
    embroidery = design + 0.5 * torch.sign(torch.randn(1, 4, 8, 8, generator=g))
    return PairLatents(design, embroidery, Cond(torch.randn(1, 5, 32, generator=g)),
                       Cond(torch.randn(1, 7, 32, generator=g)))


def make_trainer(unet, preset=None):
    adapters = AdapterSet(linear_targets(unet, unet.cfg.arch().attention_modules()), STYLE, rank=4, alpha=4, seed=1)
    factory = None if preset is None else preset.optimizer_factory
    return Trainer(TorchDenoiser(unet), adapters, EmoLoRAConfig(learning_rate=1e-3), optimizer_factory=factory)


def train(unet, preset, iterations=2):
    """Losses and final adapter weights of a few stage-1 iterations with the preset's wrappers."""
    trainer = make_trainer(unet, preset)
    with installed_all(unet, preset.providers(trainer.adapters, unet)):
        losses = [iteration(trainer, EMOLORA.phase(1), make_pair()) for _ in range(iterations)]
    return losses, [p.detach().clone() for p in trainer.adapters.parameters()]


@contextlib.contextmanager
def installed_all(unet, providers):
    with contextlib.ExitStack() as stack:
        for provider in providers:
            stack.enter_context(installed(unet, provider))
        yield


def test_presets_are_the_documented_three_and_balanced_is_the_node_default():
    assert list(MEMORY_PRESETS) == ["speed", "balanced", "low_vram"]
    assert DEFAULT_MEMORY_PRESET == "balanced"
    balanced = MEMORY_PRESETS["balanced"]
    assert (balanced.gradient_checkpointing, balanced.optimizer_state) == (True, "fp32")
    assert not MEMORY_PRESETS["speed"].gradient_checkpointing
    assert MEMORY_PRESETS["low_vram"].optimizer_state == "cpu_offload"


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="low_vram"):
        get_memory_preset("tiny")
    with pytest.raises(ValueError, match="cpu_offload"):
        MemoryPreset("x", gradient_checkpointing=True, optimizer_state="8bit", description="")


def test_preset_optimizer_reaches_the_trainer(tiny_unet):
    assert type(make_trainer(tiny_unet).optimizer) is torch.optim.AdamW  # no factory: unchanged default
    assert type(make_trainer(tiny_unet, get_memory_preset("balanced")).optimizer) is torch.optim.AdamW
    assert isinstance(make_trainer(tiny_unet, get_memory_preset("low_vram")).optimizer, CPUOffloadAdamW)


def test_providers_add_checkpointing_only_when_the_preset_says_so(tiny_unet):
    adapters = make_trainer(tiny_unet).adapters
    assert get_memory_preset("speed").providers(adapters, tiny_unet) == [adapters]
    first, second = get_memory_preset("low_vram").providers(adapters, tiny_unet)
    assert first is adapters and isinstance(second, Checkpointing)
    assert "middle_block.0" in second.names


def test_checkpointing_recomputes_blocks_in_backward(tiny_unet):
    calls = []
    hook = tiny_unet.middle_block[0].in_layers.register_forward_hook(lambda *a: calls.append(1))
    try:
        counts = {}
        for name in ("speed", "balanced"):
            calls.clear()
            preset = get_memory_preset(name)
            trainer = make_trainer(tiny_unet, preset)
            with installed_all(tiny_unet, preset.providers(trainer.adapters, tiny_unet)):
                iteration(trainer, EMOLORA.phase(1), make_pair())
            counts[name] = len(calls)
    finally:
        hook.remove()
    assert counts["speed"] == 2            # design step + embroidery step, one forward each
    assert counts["balanced"] == 4         # plus one recomputation per backward


def test_every_preset_trains_to_the_same_weights(tiny_unet):
    """Presets trade memory for time only: same losses, same adapters (CPU: bit for bit for the
    optimizer, float-equal for recomputed activations)."""
    ref_losses, ref_weights = train(tiny_unet, get_memory_preset("balanced"))
    for name in ("speed", "low_vram"):
        losses, weights = train(tiny_unet, get_memory_preset(name))
        for a, b in zip(ref_losses, losses):
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)
        for a, b in zip(ref_weights, weights):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert any(not torch.equal(w, torch.zeros_like(w)) for w in weights[1::2])  # `up` moved


def _adamw_pair(**kw):
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(6, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    return a, torch.optim.AdamW(a, **kw), b, CPUOffloadAdamW(b, **kw)


def test_cpu_offload_adamw_makes_adamws_update_and_skips_params_without_grad():
    a, ref, b, off = _adamw_pair(lr=1e-2, weight_decay=0.1)
    frozen_before = b[2].detach().clone()
    for i in range(5):
        for params, opt in ((a, ref), (b, off)):
            opt.zero_grad(set_to_none=True)
            loss = (params[0] ** 2).sum() + (params[1] * (i + 1)).sum() * (i % 2)  # params[1]: grad every other step
            loss.backward()
            opt.step()
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert torch.equal(b[2], frozen_before)  # never had a gradient: no step, no weight decay


def test_cpu_offload_adamw_keeps_its_state_in_host_memory_only():
    _, _, b, off = _adamw_pair(lr=1e-2)
    b[0].grad = torch.ones_like(b[0])
    off.step()
    assert len(off.state) == 0  # nothing per parameter on the parameters' device
    host_state = off.inner.state
    assert len(host_state) == 1
    assert all(t.device.type == "cpu" for s in host_state.values() for t in s.values() if torch.is_tensor(t))
    off.param_groups[0]["lr"] = 0.0  # a changed learning rate reaches the host optimizer
    before = b[0].detach().clone()
    off.step()
    assert torch.equal(b[0], before)
