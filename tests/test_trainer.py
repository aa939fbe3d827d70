"""The EmoLoRA trainer on the tiny LDM-layout UNet (CPU, seconds)."""
import pytest
import torch

from embroidery_core.adapters import AdapterSet, installed, linear_targets
from embroidery_core.diffusion import Cond, TorchDenoiser, add_noise, diffusion_loss, target
from embroidery_core.methods import EMOLORA, LORA, EmoLoRAConfig
from embroidery_core.trainer import (Checkpointer, PairLatents, Trainer, _step_loss, export, iteration, loss_map,
                                     resume_point, run_phase)

STAGE1, STAGE2 = EMOLORA.phase(1), EMOLORA.phase(2)


def stage1_iteration(trainer, pair):
    return iteration(trainer, STAGE1, pair)


def run_stage1(trainer, pair, until, on_step=None):
    return run_phase(trainer, STAGE1, pair, until, on_step=on_step)


def run_stage2(trainer, pair, generated, until):
    return run_phase(trainer, STAGE2, pair, until, generated)

STYLE = ["input_blocks.5.1", "input_blocks.7.1", "output_blocks.1.1", "output_blocks.2.1"]


def make_pair(seed=0, design_tokens=5, emb_tokens=7):
    g = torch.Generator().manual_seed(seed)
    design = torch.randn(1, 4, 8, 8, generator=g)
    embroidery = design + 0.5 * torch.sign(torch.randn(1, 4, 8, 8, generator=g))  # "stitches"
    return PairLatents(design, embroidery, Cond(torch.randn(1, design_tokens, 32, generator=g)),
                       Cond(torch.randn(1, emb_tokens, 32, generator=g)))


def make_trainer(unet, **overrides):
    arch = unet.cfg.arch()
    adapters = AdapterSet(linear_targets(unet, arch.attention_modules()), STYLE, rank=4, alpha=4, seed=1)
    config = EmoLoRAConfig(**{"learning_rate": 1e-3, **overrides})
    return Trainer(TorchDenoiser(unet), adapters, config)


def snapshot(adapters):
    return {n: [p.detach().clone() for p in adapters.adapter(n).parameters()] for n in adapters.names}


def changed(before, adapters):
    return {n for n in adapters.names
            if any(not torch.equal(a, b) for a, b in zip(before[n], adapters.adapter(n).parameters()))}


def test_adapters_start_as_identity(tiny_unet):
    trainer = make_trainer(tiny_unet)
    pair = make_pair()
    plain = tiny_unet(pair.design, torch.tensor([500.0]), pair.design_cond.context)
    with installed(tiny_unet, trainer.adapters):
        lora = tiny_unet(pair.design, torch.tensor([500.0]), pair.design_cond.context)
    assert torch.equal(plain, lora)
    assert "forward" not in tiny_unet.input_blocks[5][1].transformer_blocks[0].attn1.to_q.__dict__


def test_embroidery_step_changes_only_style_blocks(tiny_unet):
    trainer = make_trainer(tiny_unet)
    pair = make_pair()
    with installed(tiny_unet, trainer.adapters):
        stage1_iteration(trainer, pair)  # make `up` non-zero so every gradient path is live
        before = snapshot(trainer.adapters)
        noise, sigma = torch.randn_like(pair.design), torch.tensor([2.0])
        _step_loss(trainer, "style", pair.embroidery, noise, sigma, pair.design_cond, routed=pair.embroidery_cond)
    moved = changed(before, trainer.adapters)
    style = {n for n in trainer.adapters.names if trainer.adapters.is_style(n)}
    assert moved == style
    assert len(style) == 4 * 8  # 4 blocks x 1 layer x 8 projections


def test_design_step_changes_every_adapter(tiny_unet):
    trainer = make_trainer(tiny_unet)
    pair = make_pair()
    with installed(tiny_unet, trainer.adapters):
        stage1_iteration(trainer, pair)
        before = snapshot(trainer.adapters)
        _step_loss(trainer, "all", pair.design, torch.randn_like(pair.design), torch.tensor([2.0]), pair.design_cond)
    assert changed(before, trainer.adapters) == set(trainer.adapters.names)


def test_single_prompt_step_trains_every_adapter_on_the_reference(tiny_unet):
    trainer, pair = make_trainer(tiny_unet), make_pair()
    before = snapshot(trainer.adapters)
    with installed(tiny_unet, trainer.adapters):
        losses = iteration(trainer, LORA.phase(1), pair)
    assert changed(before, trainer.adapters) == set(trainer.adapters.names)
    assert trainer.step == 1 and torch.isfinite(losses["loss"])


def test_router_sends_embroidery_prompt_only_to_style_blocks(tiny_unet):
    trainer = make_trainer(tiny_unet)
    pair = make_pair(design_tokens=5, emb_tokens=7)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, out.shape[1]))
             for name, m in tiny_unet.named_modules() if name.endswith(("attn2.to_k", "attn2.to_v"))]
    try:
        with installed(tiny_unet, trainer.adapters):
            trainer.predict(pair.design, torch.tensor([1.0]), pair.design_cond, routed=pair.embroidery_cond)
    finally:
        for h in hooks:
            h.remove()
    assert seen, "no cross-attention ran"
    for name, tokens in seen.items():
        expected = 7 if trainer.adapters.is_style(name) else 5
        assert tokens == expected, name


def test_unrouted_forward_uses_design_prompt_everywhere(tiny_unet):
    trainer = make_trainer(tiny_unet)
    pair = make_pair(design_tokens=5, emb_tokens=7)
    seen = set()
    module = tiny_unet.output_blocks[1][1].transformer_blocks[0].attn2.to_k
    hook = module.register_forward_hook(lambda mod, inp, out: seen.add(out.shape[1]))
    with installed(tiny_unet, trainer.adapters):
        trainer.predict(pair.design, torch.tensor([1.0]), pair.design_cond)
    hook.remove()
    assert seen == {5}


def eval_loss(trainer, pair, x0):
    g = torch.Generator().manual_seed(1234)
    total = 0.0
    with torch.no_grad():
        for _ in range(8):
            noise = torch.randn(x0.shape, generator=g)
            sigma = trainer.denoiser.sample_sigma(1, g)
            out = trainer.predict(add_noise("eps", x0, noise, sigma), sigma, pair.design_cond)
            total += diffusion_loss(out, target("eps", x0, noise, sigma)).item()
    return total / 8


def test_stage1_loss_decreases_on_fixed_pair(tiny_unet):
    trainer = make_trainer(tiny_unet, learning_rate=1e-2)
    pair = make_pair()
    with installed(tiny_unet, trainer.adapters):
        before = eval_loss(trainer, pair, pair.design)
        history = run_stage1(trainer, pair, until=60)
        after = eval_loss(trainer, pair, pair.design)
    assert len(history) == 60 and trainer.step == 60
    # held-out noise draws: the LoRA learned the pair, not the draws it saw
    assert after < before * 0.95
    curves = loss_map(history)
    assert set(curves) == {"design", "embroidery", "loss"} and len(curves["loss"]) == 60


def test_stage2_runs_three_steps_and_contrastive_touches_only_style(tiny_unet):
    trainer = make_trainer(tiny_unet, contrastive_weight=1.0)
    pair, generated = make_pair(0), [make_pair(1), make_pair(2)]
    with installed(tiny_unet, trainer.adapters):
        run_stage1(trainer, pair, until=2)
        history = run_stage2(trainer, pair, generated, until=5)
    assert trainer.step == 5 and len(history) == 3
    for losses in history:
        assert set(losses) == {"design", "embroidery", "contrastive"}
        assert all(torch.isfinite(v) for v in losses.values())


def test_cancel_stops_within_one_step_and_checkpoint_is_complete(tiny_unet, tmp_path):
    from embroidery_core.lora_file import load_lora, save_lora

    trainer = make_trainer(tiny_unet)
    pair = make_pair()
    path = tmp_path / "ckpt.safetensors"
    checkpoint = Checkpointer(trainer, "sdxl", EMOLORA, 1, lambda lora: save_lora(lora, path), every=2)

    class Cancelled(Exception):
        pass

    def on_step(step, total, losses):
        checkpoint(step, total, losses)
        if step == 5:
            raise Cancelled

    with installed(tiny_unet, trainer.adapters), pytest.raises(Cancelled):
        run_stage1(trainer, pair, until=10, on_step=on_step)
    assert trainer.step == 5
    assert checkpoint.saved == [2, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]
    assert resume_point(load_lora(path, arch="sdxl")) == (1, 4)


def test_resume_continues_step_count_and_weights(tiny_unet, tmp_path):
    from embroidery_core.lora_file import load_lora, save_lora

    pair = make_pair()
    first = make_trainer(tiny_unet)
    with installed(tiny_unet, first.adapters):
        run_stage1(first, pair, until=3)
    path = save_lora(export(first, "sdxl", EMOLORA, 1, {"embroidery.trigger": "emb"}), tmp_path / "a.safetensors")

    lora = load_lora(path, arch="sdxl")
    stage, step = resume_point(lora)
    second = make_trainer(tiny_unet)
    second.adapters.load_style_lora(lora)
    second.step = step
    name = second.adapters.names[0]
    assert torch.equal(second.adapters.adapter(name).up, first.adapters.adapter(name).up)
    with installed(tiny_unet, second.adapters):
        history = run_stage1(second, pair, until=5)
    assert (stage, step) == (1, 3) and len(history) == 2 and second.step == 5
    assert export(second, "sdxl", EMOLORA, 1).metadata["embroidery.step"] == "5"


def test_adapters_rebuilt_from_a_lora_hold_its_weights_and_style_blocks(tiny_unet):
    first = make_trainer(tiny_unet)
    with installed(tiny_unet, first.adapters):
        run_stage1(first, make_pair(), until=2)
    lora = export(first, "sdxl", EMOLORA, 1).filter_blocks(STYLE[:2] + ["middle_block.1"])
    rebuilt = AdapterSet.from_style_lora(tiny_unet, lora)
    assert rebuilt.names == sorted(lora.modules) and rebuilt.style_blocks == STYLE
    for name in rebuilt.names:
        assert torch.equal(rebuilt.adapter(name).down, first.adapters.adapter(name).down)
        assert torch.equal(rebuilt.adapter(name).up, first.adapters.adapter(name).up)


def test_resume_point_refuses_foreign_lora():
    from embroidery_core.lora_file import StyleLoRA

    with pytest.raises(ValueError, match="no training state"):
        resume_point(StyleLoRA("sdxl", {}, {}))


def test_gradient_checkpointing_gives_the_same_update(tiny_unet):
    """Checkpointing recomputes forwards in backward; routing must still be on there."""
    import copy

    from embroidery_core.adapters import Checkpointing

    pair = make_pair()
    results = []
    for use_checkpointing in (False, True):
        unet = copy.deepcopy(tiny_unet)
        trainer = make_trainer(unet)
        with installed(unet, trainer.adapters):
            stage1_iteration(trainer, pair)
            if use_checkpointing:
                with installed(unet, Checkpointing(unet)):
                    stage1_iteration(trainer, pair)
            else:
                stage1_iteration(trainer, pair)
        results.append({n: p.detach().clone() for n, p in trainer.adapters.named_parameters()})
    for name in results[0]:
        assert torch.allclose(results[0][name], results[1][name], atol=1e-6), name


def test_file_records_which_blocks_each_step_updated(tiny_unet):
    trainer = make_trainer(tiny_unet)
    pair, generated = make_pair(0), [make_pair(1)]
    with installed(tiny_unet, trainer.adapters):
        run_stage1(trainer, pair, until=2)
        run_stage2(trainer, pair, generated, until=3)
    meta = export(trainer, "sdxl", EMOLORA, 2).metadata
    assert meta["embroidery.updated_blocks.embroidery"].split(",") == STYLE
    assert meta["embroidery.updated_blocks.design"].split(",") == tiny_unet.cfg.arch().attention_blocks()
    # a resumed run keeps what the earlier file recorded
    fresh = make_trainer(tiny_unet)
    merged = export(fresh, "sdxl", EMOLORA, 2, {"embroidery.updated_blocks.embroidery": "input_blocks.5.1"}).metadata
    assert merged["embroidery.updated_blocks.embroidery"] == "input_blocks.5.1"


def test_train_emolora_pipeline_runs_both_stages(tiny_unet):
    from embroidery_core.methods import train_emolora

    arch = tiny_unet.cfg.arch()
    calls = []

    def generate(adapters):
        calls.append(adapters.enabled)
        return [make_pair(5)]

    config = EmoLoRAConfig(rank=2, alpha=2, stage1_iterations=2, stage2_iterations=1, learning_rate=1e-3)
    lora, losses = train_emolora(TorchDenoiser(tiny_unet), tiny_unet, make_pair(), STYLE, arch, config, generate,
                                 metadata={"embroidery.trigger": "emb"})
    assert calls == [True]  # generated with the stage-1 LoRA switched on
    assert lora.metadata["embroidery.stage"] == "2" and lora.metadata["embroidery.step"] == "3"
    assert set(lora.blocks()) == set(arch.attention_blocks()) and lora.metadata["embroidery.trigger"] == "emb"
    assert len(losses["loss"]) == 3 and "contrastive" in losses
    assert not any("forward" in m.__dict__ for m in tiny_unet.modules())  # uninstalled afterwards


def test_a_term_runs_from_its_start_step(tiny_unet):
    """A method is data: a term with ``start`` joins the iteration at that global step (Pair
    Customization's style step), the others run from the first."""
    from embroidery_core.trainer import DiffusionTerm, Phase

    late = DiffusionTerm("style", trainable="style", image="embroidery", prompt="embroidery", start=2)
    phase = Phase(1, (DiffusionTerm("content", trainable="all", image="design"), late))
    trainer = make_trainer(tiny_unet)
    with installed(tiny_unet, trainer.adapters):
        history = run_phase(trainer, phase, make_pair(), until=4)
    assert [sorted(h) for h in history] == [["content"], ["content"], ["content", "style"], ["content", "style"]]
    assert trainer.updated_blocks["style"] == set(STYLE)


def test_a_generated_phase_without_generated_pairs_is_refused(tiny_unet):
    trainer = make_trainer(tiny_unet)
    with pytest.raises(ValueError, match="phase 2 needs at least one generated pair"):
        run_phase(trainer, STAGE2, make_pair(), until=3, generated=[])


def test_one_image_lora_trains_only_its_blocks_and_records_them(tiny_unet):
    from embroidery_core.methods import LoRAConfig, train_lora

    arch = tiny_unet.cfg.arch()
    blocks = STYLE[2:]
    lora, losses = train_lora(TorchDenoiser(tiny_unet), tiny_unet, make_pair(), blocks, arch,
                              LoRAConfig(rank=2, alpha=2, learning_rate=1e-3, iterations=3))
    assert lora.blocks() == blocks and len(losses["loss"]) == 3
    assert lora.metadata["embroidery.method"] == "lora" and lora.metadata["embroidery.step"] == "3"
    assert lora.metadata["embroidery.updated_blocks.reference"].split(",") == blocks
    assert lora.metadata["embroidery.iterations"] == "3" and lora.metadata["embroidery.rank"] == "2"
    assert resume_point(lora, LORA) == (1, 3)


def test_resume_refuses_a_file_another_method_wrote(tiny_unet):
    trainer = make_trainer(tiny_unet)
    lora = export(trainer, "sdxl", EMOLORA, 1)
    assert resume_point(lora, EMOLORA) == (1, 0)
    with pytest.raises(ValueError, match="written by the emolora trainer, not lora; resume it in the trainer"):
        resume_point(lora, LORA)


# ---------------------------------------------------------------------------- runs a user can get wrong

def test_run_identity_tells_runs_apart_and_keeps_a_run_its_own():
    from embroidery_core.trainer import run_identity

    a, b = make_pair(0), make_pair(1)
    settings = {"embroidery.trigger": "emb", "embroidery.learning_rate": "0.0001"}
    first = run_identity([a.embroidery, a.design], settings)
    assert first == run_identity([a.embroidery.clone(), a.design.clone()], dict(settings))  # same run again
    assert len(first) == 8 and int(first, 16) >= 0
    assert first != run_identity([b.embroidery, b.design], settings)  # another style, same trigger
    assert first != run_identity([a.embroidery, a.design], {**settings, "embroidery.learning_rate": "0.001"})
    resumed = {**settings, "embroidery.stage1_iterations": "800", "embroidery.updated_blocks.design": "x"}
    assert first == run_identity([a.embroidery, a.design], resumed)  # the same run, resumed further


def test_a_resume_with_nothing_left_to_train_says_so():
    from embroidery_core.trainer import check_resume_range

    check_resume_range("ckpt.safetensors", 300, 400, "iterations")
    with pytest.raises(ValueError, match=r"ckpt\.safetensors is already at step 400, and this run stops at step "
                                         r"400: nothing is left to train. Raise iterations"):
        check_resume_range("ckpt.safetensors", 400, 400, "iterations")


def test_a_diverged_run_is_stopped_and_never_exported(tiny_unet):
    from embroidery_core.trainer import check_losses

    check_losses(3, {"design": torch.tensor(0.5)})
    with pytest.raises(ValueError, match=r"training diverged at step 7 \(design nan\)"):
        check_losses(7, {"design": torch.tensor(float("nan")), "embroidery": torch.tensor(0.1)})
    trainer = make_trainer(tiny_unet)
    export(trainer, "sdxl", EMOLORA, 1)  # finite: fine
    with torch.no_grad():
        trainer.adapters.adapter(trainer.adapters.names[0]).up.fill_(float("inf"))
    with pytest.raises(ValueError, match="training diverged by step 0: 1 LoRA modules hold NaN or inf"):
        export(trainer, "sdxl", EMOLORA, 1)


def test_a_checkpoint_never_overwrites_a_good_file_with_a_diverged_state(tiny_unet, tmp_path):
    from embroidery_core.lora_file import load_lora, save_lora

    trainer = make_trainer(tiny_unet)
    path = tmp_path / "ckpt.safetensors"
    checkpoint = Checkpointer(trainer, "sdxl", EMOLORA, 1, lambda lora: save_lora(lora, path), every=1)
    checkpoint(1, 10, {})
    good = path.read_bytes()
    with torch.no_grad():
        trainer.adapters.adapter(trainer.adapters.names[0]).up.fill_(float("nan"))
    with pytest.raises(ValueError, match="diverged"):
        checkpoint(2, 10, {})
    assert path.read_bytes() == good and load_lora(path, arch="sdxl").non_finite() == []


# ---------------------------------------------------------------------------- optimizer state, pair order

def _weights(adapters):
    return {n: p.detach().clone() for n, p in adapters.named_parameters()}


def test_stage2_from_the_stage1_file_continues_adamw_as_an_unbroken_run(tiny_unet):
    """The official stage 2 resumes stage 1's optimizer: a stage 2 built from the exported stage-1
    LoRA and its optimizer state makes exactly the updates of one run through both stages."""
    from embroidery_core.trainer import load_optimizer_state

    pair, generated = make_pair(0), [make_pair(1), make_pair(2)]
    unbroken = make_trainer(tiny_unet)
    with installed(tiny_unet, unbroken.adapters):
        run_stage1(unbroken, pair, until=3)
        run_stage2(unbroken, pair, generated, until=6)
    results = {}
    for carry in (True, False):
        first = make_trainer(tiny_unet)
        with installed(tiny_unet, first.adapters):
            run_stage1(first, pair, until=3)
        stage1 = export(first, "sdxl", EMOLORA, 1)
        second = Trainer(first.denoiser, AdapterSet.from_style_lora(tiny_unet, stage1, seed=1), first.config, step=3)
        if carry:
            assert load_optimizer_state(second, stage1.optimizer_state) == 2 * len(second.adapters.names)
        with installed(tiny_unet, second.adapters):
            run_stage2(second, pair, generated, until=6)
        results[carry] = _weights(second.adapters)
    expected = _weights(unbroken.adapters)
    assert all(torch.equal(results[True][n], expected[n]) for n in expected)
    assert any(not torch.equal(results[False][n], expected[n]) for n in expected)  # a fresh AdamW differs


def test_optimizer_state_round_trips_through_its_file_and_between_presets(tiny_unet, tmp_path):
    from embroidery_core.lora_file import load_optimizer_state as read_state, optimizer_path, save_optimizer_state
    from embroidery_core.presets import cpu_offload_adamw
    from embroidery_core.trainer import load_optimizer_state, optimizer_state

    pair = make_pair()
    first = make_trainer(tiny_unet)
    with installed(tiny_unet, first.adapters):
        run_stage1(first, pair, until=2)
    state = optimizer_state(first)
    assert {k.rsplit(".", 1)[1] for k in state} == {"step", "exp_avg", "exp_avg_sq"}
    path = tmp_path / "ckpt.safetensors"
    save_optimizer_state(state, path, {"embroidery.step": "2"})
    assert optimizer_path(path).endswith(".safetensors.optimizer")
    loaded, meta = read_state(path)
    assert meta == {"embroidery.step": "2"} and all(torch.equal(loaded[k], state[k]) for k in state)
    # into the low-VRAM preset's optimizer: the next update is the one plain AdamW makes
    lora = export(first, "sdxl", EMOLORA, 1)
    updates = []
    for factory in (None, cpu_offload_adamw):
        trainer = Trainer(first.denoiser, AdapterSet.from_style_lora(tiny_unet, lora, seed=1), first.config, step=2,
                          optimizer_factory=factory)
        load_optimizer_state(trainer, loaded)
        with installed(tiny_unet, trainer.adapters):
            run_stage1(trainer, pair, until=3)
        updates.append(_weights(trainer.adapters))
    assert all(torch.allclose(updates[0][n], updates[1][n], atol=1e-6) for n in updates[0])
    with pytest.raises(ValueError, match="the optimizer state is of other adapters"):
        load_optimizer_state(trainer, {"adapters.nowhere.down.step": torch.tensor(1.0)})


def test_generated_pairs_come_in_a_new_seeded_order_every_pass():
    from embroidery_core.trainer import generated_index

    passes = [[generated_index(42, epoch * 3 + i, 3) for i in range(3)] for epoch in range(8)]
    assert all(sorted(p) == [0, 1, 2] for p in passes)  # every pair once per pass
    assert len({tuple(p) for p in passes}) > 1  # shuffled, not cycled
    assert passes == [[generated_index(42, epoch * 3 + i, 3) for i in range(3)] for epoch in range(8)]
    assert passes != [[generated_index(7, epoch * 3 + i, 3) for i in range(3)] for epoch in range(8)]
