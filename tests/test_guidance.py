"""Style guidance (Pair Customization), the switchable LoRA behind it and the B-LoRA block mix.
Hand-made tensors only: every expected value is written out from the paper's formula."""
import copy

import pytest
import torch

from embroidery_core.blocks import SD15, SDXL
from embroidery_core.guidance import (
    GatedLoRAWeight,
    StyleGate,
    check_wrapper_shapes,
    check_window,
    combine_guidance,
    copy_conds,
    denoised_to_eps,
    eps_to_denoised,
    gated_weight_wrappers,
    in_window,
    mix_block_loras,
    style_delta_in_denoised_space,
)
from embroidery_core.lora_file import LoRAModule, lora_from_modules

RANK, DIM = 2, 6


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def attention_lora(arch, blocks, seed=0, alpha=1.0):
    modules = {path: (rand(RANK, DIM, seed=seed + 2 * i), rand(DIM, RANK, seed=seed + 2 * i + 1), alpha)
               for i, path in enumerate(arch.attention_modules(blocks))}
    return lora_from_modules(arch.name, modules)


# ---------------------------------------------------------------------------- the formula


def test_combine_guidance_is_the_pair_customization_formula():
    uncond, cond, s1, s2 = (rand(2, 4, 3, 3, seed=i) for i in range(4))
    got = combine_guidance(uncond, cond, [(4.0, s1), (-1.5, s2)], cfg=5.0)
    expected = uncond + 5.0 * (cond - uncond) + 4.0 * (s1 - cond) - 1.5 * (s2 - cond)
    torch.testing.assert_close(got, expected)


def test_combine_guidance_without_styles_is_bit_identical_to_comfy_cfg():
    uncond, cond = rand(1, 4, 8, 8, seed=1), rand(1, 4, 8, 8, seed=2)
    # comfy.samplers.cfg_function: uncond_pred + (cond_pred - uncond_pred) * cond_scale
    assert torch.equal(combine_guidance(uncond, cond, [], 7.5), uncond + (cond - uncond) * 7.5)


def test_style_delta_is_weighted_difference_and_zero_at_weight_zero():
    cond, style = rand(1, 4, 2, 2, seed=3), rand(1, 4, 2, 2, seed=4)
    torch.testing.assert_close(style_delta_in_denoised_space(cond, style, 3.0), 3.0 * (style - cond))
    assert not style_delta_in_denoised_space(cond, style, 0.0).any()


def test_guidance_in_denoised_space_equals_guidance_in_eps_space():
    """The docstring's derivation, numerically: combine eps, map to denoised == map, then combine."""
    x = rand(2, 4, 5, 5, seed=5)
    sigma = torch.tensor([3.0, 0.7])
    eps_u, eps_c, eps_s1, eps_s2 = (rand(2, 4, 5, 5, seed=10 + i) for i in range(4))
    cfg, styles = 6.0, [(4.0, eps_s1), (2.0, eps_s2)]
    eps_hat = combine_guidance(eps_u, eps_c, styles, cfg)
    d = lambda e: eps_to_denoised(x, e, sigma)  # noqa: E731
    denoised_hat = combine_guidance(d(eps_u), d(eps_c), [(w, d(e)) for w, e in styles], cfg)
    torch.testing.assert_close(denoised_hat, d(eps_hat), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(denoised_to_eps(x, denoised_hat, sigma), eps_hat, rtol=1e-4, atol=1e-4)
    # one term alone: D_s - D_c = -sigma (eps_s - eps_c)
    torch.testing.assert_close(style_delta_in_denoised_space(d(eps_c), d(eps_s1), 1.0),
                               -sigma.view(2, 1, 1, 1) * (eps_s1 - eps_c), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- the switchable LoRA


def test_gated_weight_is_identity_when_off_and_adds_the_lora_delta_when_on():
    module = LoRAModule(rand(RANK, DIM, seed=1), rand(DIM + 1, RANK, seed=2), alpha=1.0)
    gate = StyleGate()
    wrapper = GatedLoRAWeight(module, strength=0.5, gate=gate)
    weight = rand(DIM + 1, DIM, seed=3)
    assert wrapper(weight) is weight
    with gate.active():
        torch.testing.assert_close(wrapper(weight), weight + 0.5 * module.delta())
    assert wrapper(weight) is weight


def test_gated_weight_handles_convs_and_keeps_the_weight_dtype():
    module = LoRAModule(rand(RANK, 3, 1, 1, seed=1), rand(4, RANK, 1, 1, seed=2), alpha=4.0)
    gate = StyleGate()
    weight = rand(4, 3, 1, 1, seed=3).half()
    with gate.active():
        out = GatedLoRAWeight(module, 1.0, gate)(weight)
    assert out.dtype == torch.float16 and out.shape == weight.shape
    torch.testing.assert_close(out.float(), weight.float() + module.delta(), rtol=1e-2, atol=1e-2)


def test_gate_switches_off_after_an_error():
    gate = StyleGate()
    with pytest.raises(RuntimeError):
        with gate.active():
            assert gate.enabled
            raise RuntimeError("interrupted")
    assert not gate.enabled


def test_copies_of_a_gate_or_of_what_holds_it_are_the_same_switch():
    """ComfyUI deep-copies model_options (where the guidance function lives) on every clone."""
    gate = StyleGate()
    wrapper = GatedLoRAWeight(LoRAModule(rand(RANK, DIM), rand(DIM, RANK), 1.0), 1.0, gate)
    holder = copy.deepcopy({"sampler_post_cfg_function": [wrapper]})
    assert copy.copy(gate) is gate and holder["sampler_post_cfg_function"][0].gate is gate


def test_one_gate_switches_all_wrappers_of_a_style():
    lora = attention_lora(SD15, ["output_blocks.4.1"])
    gate = StyleGate()
    wrappers = gated_weight_wrappers(lora, 1.0, gate)
    assert set(wrappers) == {p + ".weight" for p in lora.modules}
    weight = rand(DIM, DIM, seed=9)
    with gate.active():
        assert all(not torch.equal(w(weight), weight) for w in wrappers.values())
    assert all(w(weight) is weight for w in wrappers.values())


def test_check_wrapper_shapes_names_missing_and_misfitting_weights():
    lora = attention_lora(SD15, ["output_blocks.4.1"])
    wrappers = gated_weight_wrappers(lora, 1.0, StyleGate())
    shapes = {key: (DIM, DIM) for key in wrappers}
    check_wrapper_shapes(wrappers, shapes)
    with pytest.raises(ValueError, match="no weight in this model"):
        check_wrapper_shapes(wrappers, dict(list(shapes.items())[1:]))
    with pytest.raises(ValueError, match="do not fit"):
        check_wrapper_shapes(wrappers, {key: (DIM, DIM + 1) for key in wrappers})


# ---------------------------------------------------------------------------- window and conds


def linear_percent_to_sigma(percent):  # a stand-in schedule: sigma 10 at the start, 0 at the end
    return 10.0 * (1.0 - percent)


@pytest.mark.parametrize("sigma, inside", [(10.0, False), (8.01, False), (8.0, True), (5.0, True),
                                           (2.0, True), (1.99, False), (0.0, False)])
def test_in_window_follows_comfy_percent_convention(sigma, inside):
    assert in_window(torch.tensor([sigma]), 0.2, 0.8, linear_percent_to_sigma) is inside


def test_full_window_never_asks_the_schedule():
    def boom(_):
        raise AssertionError("not needed for the full window")
    assert in_window(torch.tensor([1e9]), 0.0, 1.0, boom)


def test_check_window_rejects_reversed_or_out_of_range():
    check_window(0.2, 1.0)
    for start, end in [(0.8, 0.2), (-0.1, 0.5), (0.0, 1.5)]:
        with pytest.raises(ValueError, match="start_percent"):
            check_window(start, end)


def test_copy_conds_copies_dicts_and_control_lists_but_shares_tensors():
    residual = torch.ones(1)
    controlnet = object()
    conds = [{"model_conds": {"c": residual}, "control": {"output": [residual], "middle": [residual]}},
             {"control": controlnet, "uuid": "u"}]
    copied = copy_conds(conds)
    assert copied[0] is not conds[0] and copied[0]["model_conds"] is conds[0]["model_conds"]
    copied[0]["control"]["output"].pop()
    copied[0]["extra"] = 1
    assert conds[0]["control"]["output"] == [residual] and "extra" not in conds[0]
    assert copied[1]["control"] is controlnet and copied[1]["uuid"] == "u"


# ---------------------------------------------------------------------------- B-LoRA mix

CONTENT, STYLE = SDXL.preset("blora_content")[0], SDXL.preset("blora_style")[0]


def test_mix_takes_each_part_only_in_its_blocks_at_its_strength():
    a = attention_lora(SDXL, [CONTENT, STYLE], seed=0)
    b = attention_lora(SDXL, [CONTENT, STYLE], seed=100)
    mixed = mix_block_loras([(a, [CONTENT], 0.5), (b, [STYLE], 2.0)])
    assert mixed.blocks() == [CONTENT, STYLE]
    for path, module in mixed.modules.items():
        source, strength = (a, 0.5) if path.startswith(CONTENT + ".") else (b, 2.0)
        torch.testing.assert_close(module.delta(), strength * source.modules[path].delta())


def test_mix_alpha_squared_squares_the_strength():
    a = attention_lora(SDXL, [CONTENT, STYLE])
    mixed = mix_block_loras([(a, [STYLE], 3.0)], alpha_squared=True)
    path = next(iter(mixed.modules))
    torch.testing.assert_close(mixed.modules[path].delta(), 9.0 * a.modules[path].delta())


def test_mix_accepts_any_block_spelling_and_drops_zero_strength_parts():
    a = attention_lora(SDXL, [CONTENT, STYLE])
    mixed = mix_block_loras([(a, ["up_blocks.0.attentions.0"], 0.0), (a, ["lora_unet_output_blocks_1_1"], 1.0)])
    assert mixed.blocks() == [STYLE]


def test_mix_refuses_two_parts_on_one_block():
    a = attention_lora(SDXL, [CONTENT, STYLE])
    with pytest.raises(ValueError, match="taken by part 1 and part 2"):
        mix_block_loras([(a, [CONTENT, STYLE], 1.0), (a, ["up_blocks.0.attentions.1"], 1.0)])


def test_mix_refuses_mixed_families_and_parts_without_weights():
    sdxl = attention_lora(SDXL, [CONTENT])
    sd15 = attention_lora(SD15, ["output_blocks.4.1"])
    with pytest.raises(ValueError, match="one family"):
        mix_block_loras([(sdxl, [CONTENT], 1.0), (sd15, ["output_blocks.4.1"], 1.0)])
    with pytest.raises(ValueError, match="no weights in output_blocks.1.1"):
        mix_block_loras([(sdxl, [STYLE], 1.0)])
