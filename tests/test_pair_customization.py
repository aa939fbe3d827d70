"""Pair Customization's trainer on the tiny UNet: frozen orthonormal downs, content and style
steps that each move only their own ups, the content LoRA frozen but active in style steps."""
import pytest
import torch

from embroidery_core.adapters import PairAdapterSet, installed, linear_targets, orthonormal_downs
from embroidery_core.diffusion import TorchDenoiser
from embroidery_core.methods import PairConfig, pair_customization, train_pair
from embroidery_core.trainer import Trainer, iteration, run_phase

from .test_trainer import make_pair

RANK = 2  # the tiny UNet's narrowest input is 32 wide: rank <= 16


def test_orthonormal_downs_are_orthogonal_to_each_other_and_orthonormal():
    content, style = orthonormal_downs(32, 8)
    assert content.shape == style.shape == (8, 32)
    assert torch.allclose(content @ style.T, torch.zeros(8, 8), atol=1e-6)
    assert torch.allclose(content @ content.T, torch.eye(8), atol=1e-6)
    assert torch.allclose(style @ style.T, torch.eye(8), atol=1e-6)
    again, _ = orthonormal_downs(32, 8)
    assert torch.equal(again, content)  # seeded: every layer of this width, every run, the same basis
    assert not torch.allclose(orthonormal_downs(32, 8, seed=1)[0], content)
    with pytest.raises(ValueError, match="rank <= half the input width: rank 20 at width 32"):
        orthonormal_downs(32, 20)


def _set(unet):
    arch = unet.cfg.arch()
    return PairAdapterSet(linear_targets(unet, arch.attention_modules()), rank=RANK, alpha=RANK)


def _ups(adapters, group):
    return {n: adapters.adapter(n).up(group).detach().clone() for n in adapters.names}


def test_each_step_moves_only_its_own_ups_and_the_content_lora_is_active_in_style_steps(tiny_unet):
    adapters = _set(tiny_unet)
    config = PairConfig(rank=RANK, alpha=RANK, learning_rate=1e-3, style_start=1, accumulate=1)
    trainer = Trainer(TorchDenoiser(tiny_unet), adapters, config)
    phase = pair_customization(config).phase(1)
    pair = make_pair()
    seen = []
    with installed(tiny_unet, adapters):
        before = {g: _ups(adapters, g) for g in ("content", "style")}
        losses = iteration(trainer, phase, pair)  # step 0: content only
        assert set(losses) == {"content"}
        moved = {g: {n for n in adapters.names if not torch.equal(before[g][n], _ups(adapters, g)[n])}
                 for g in ("content", "style")}
        assert moved == {"content": set(adapters.names), "style": set()}
        style_term = phase.terms[1]
        original = adapters.only

        def spy(groups):
            seen.append(tuple(groups))
            return original(groups)

        adapters.only = spy
        content_before = _ups(adapters, "content")
        trainer.begin("style")  # the style step alone, as iteration runs it
        noise, sigma = torch.randn_like(pair.design), torch.tensor([2.0])
        style_term(trainer, pair, [(noise, sigma)], None)
        adapters.only = original
    assert seen == [("content", "style")]
    assert all(torch.equal(content_before[n], _ups(adapters, "content")[n]) for n in adapters.names)
    assert trainer.updated_blocks.keys() == {"content", "style"}


def test_downs_stay_frozen_and_orthogonal_in_the_saved_files(tiny_unet, tmp_path):
    from embroidery_core.lora_file import load_lora, save_lora

    arch = tiny_unet.cfg.arch()
    config = PairConfig(rank=RANK, alpha=RANK, learning_rate=1e-3, iterations=4, style_start=2, accumulate=2)
    style, content, losses = train_pair(TorchDenoiser(tiny_unet), tiny_unet, make_pair(), arch, config)
    assert len(losses["content"]) == 4 and losses["style"][:2] == [None, None] and losses["style"][2] is not None
    save_lora(style, tmp_path / "style.safetensors")
    save_lora(content, tmp_path / "content.safetensors")
    style, content = load_lora(tmp_path / "style.safetensors"), load_lora(tmp_path / "content.safetensors")
    assert style.metadata["embroidery.pair_group"] == "style" and content.metadata["embroidery.pair_group"] == "content"
    assert set(style.modules) == set(content.modules) == set(arch.attention_modules())
    for name, module in style.modules.items():
        expected_content, expected_style = orthonormal_downs(module.down.shape[1], RANK)
        assert torch.allclose(module.down, expected_style, atol=1e-6), name  # unchanged by training
        assert torch.allclose(content.modules[name].down, expected_content, atol=1e-6), name
        assert torch.allclose(content.modules[name].down @ module.down.T, torch.zeros(RANK, RANK), atol=1e-6)
    assert any(m.up.abs().sum() > 0 for m in style.modules.values())
    assert any(m.up.abs().sum() > 0 for m in content.modules.values())


def test_gradient_accumulation_averages_its_draws(tiny_unet):
    """accumulate N: one optimizer step per term over the mean loss of N draws, the k-th draw
    shared by both terms; N = 1 is a plain step."""
    pair = make_pair()
    for accumulate in (1, 3):
        adapters = _set(tiny_unet)
        config = PairConfig(rank=RANK, alpha=RANK, learning_rate=1e-3, style_start=0, accumulate=accumulate)
        trainer = Trainer(TorchDenoiser(tiny_unet), adapters, config)
        with installed(tiny_unet, adapters):
            history = run_phase(trainer, pair_customization(config).phase(1), pair, until=2)
        assert trainer.step == 2 and len(history) == 2 and set(history[0]) == {"content", "style"}
        assert int(trainer.optimizer.state[adapters.adapter(adapters.names[0]).up_content]["step"]) == 2


def test_training_pair_resizes_and_mirrors_both_images():
    from embroidery_core.pair import AnalogyPair, training_pair

    g = torch.Generator().manual_seed(0)
    pair = AnalogyPair(torch.rand(1, 128, 96, 3, generator=g), torch.rand(1, 128, 96, 3, generator=g), "cat", "emb")
    same = training_pair(pair)
    assert torch.equal(same.embroidery, pair.embroidery) and same.subject == "cat" and same.trigger == "emb"
    flipped = training_pair(pair, flip=True)
    assert torch.equal(flipped.design, pair.design.flip(2))
    small = training_pair(pair, 64)
    assert small.embroidery.shape[1] == 64 and small.design.shape == small.embroidery.shape
    with pytest.raises(ValueError, match="multiple of 64"):
        training_pair(pair, 100)


def test_recipe_defaults_fill_in_zero_values():
    from embroidery_core.methods import LORA_RECIPES

    recipe = LORA_RECIPES["b_lora"]
    config = recipe.config(seed=3)
    assert (config.rank, config.alpha, config.learning_rate, config.weight_decay, config.iterations, config.seed) == \
        (64, 64.0, 5e-5, 1e-4, 1000, 3)
    mine = recipe.config(rank=8, learning_rate=1e-3, weight_decay=0.0, iterations=5)
    assert (mine.rank, mine.alpha, mine.learning_rate, mine.weight_decay, mine.iterations) == (8, 8.0, 1e-3, 0.0, 5)
    assert recipe.text("emb", "cat") == "A emb"


def test_a_run_resumed_from_its_files_ends_where_an_unbroken_run_ends(tiny_unet, tmp_path):
    """Stopped at step 2 (style step already running, accumulation on) and resumed from the style
    file and the state beside it, step 3 gives the unbroken run's ups: the content LoRA and AdamW's
    moments come back from the file. Without the content LoRA the resumed run goes elsewhere."""
    from embroidery_core.lora_file import load_lora, load_optimizer_state, save_lora, save_optimizer_state
    from embroidery_core.trainer import export, load_optimizer_state as load_into

    pair = make_pair()
    config = PairConfig(rank=RANK, alpha=RANK, learning_rate=1e-3, style_start=1, accumulate=2)
    method = pair_customization(config)

    def run(until, start=0, style=None, state=None, extra=True):
        adapters = _set(tiny_unet)
        trainer = Trainer(TorchDenoiser(tiny_unet), adapters, config)
        if style is not None:
            adapters.load_style_lora(style)
            if extra:
                adapters.load_extra_state(state)
            load_into(trainer, state)
            trainer.step = start
        with installed(tiny_unet, adapters):
            run_phase(trainer, method.phase(1), pair, until=until)
        return trainer, adapters

    _, unbroken = run(3)
    stopped, _ = run(2)
    lora = export(stopped, "sdxl", method, 1)
    path = save_lora(lora, tmp_path / "ckpt.safetensors")
    save_optimizer_state(lora.optimizer_state, path, {})
    state, _ = load_optimizer_state(path)
    _, resumed = run(3, 2, load_lora(path), state)
    for group in ("content", "style"):
        assert all(torch.allclose(_ups(resumed, group)[n], _ups(unbroken, group)[n], rtol=0, atol=1e-7)
                   for n in unbroken.names), group
    _, without_content = run(3, 2, load_lora(path), state, extra=False)
    assert not all(torch.allclose(_ups(without_content, "content")[n], _ups(unbroken, "content")[n], atol=1e-4)
                   for n in unbroken.names)
