"""The style nodes inside ComfyUI (in-process, CPU, tiny random SD1.5 UNet, 128 px, 2 steps).

Each test checks a promise of a node against ComfyUI's own machinery: the sampler's output is
bit-identical when the style weight is 0, the guided step equals Pair Customization's formula
rebuilt by hand from three calc_cond_batch passes (also with a ControlNet on the prompt), a masked
style changes the picture where its mask is, and the B-LoRA mix patches exactly its two blocks."""
import asyncio
import contextlib
import importlib
import sys

import pytest

from .comfy_env import require_comfy

require_comfy()

import torch  # noqa: E402

from . import tiny_models  # noqa: E402

FAMILY = "sd15"
CFG = 5.0
LATENT = 16  # 128 px: the tiny SD1.5 UNet halves it 3 times, GroupNorm needs > 1 value at the bottom
RANK = 4


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny convolutions gain nothing from threads, and on a busy machine two OpenMP threads
    spin-waiting for each other made these tests ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)



@pytest.fixture(scope="module")
def pack(comfy, pack_dir):
    """The pack loaded the way ComfyUI loads it; returns a function importing its submodules."""
    import nodes

    name = str(pack_dir).replace(".", "_x_")
    if name not in sys.modules:
        assert asyncio.run(nodes.load_custom_node(str(pack_dir))), "the pack failed to load"
    return lambda sub: importlib.import_module(f"{name}.{sub}")


@pytest.fixture(scope="module")
def style_nodes(pack):
    return pack("nodes.style_nodes")


@pytest.fixture(scope="module")
def model(comfy):
    return tiny_models.tiny_patcher(FAMILY)


@pytest.fixture(scope="module")
def arch(pack, model):
    return pack("nodes.common").model_family(model, "test")


@pytest.fixture(scope="module")
def lora_dir(comfy, tmp_path_factory):
    """A temporary 'loras' folder, registered with folder_paths for this module only."""
    import folder_paths

    path = str(tmp_path_factory.mktemp("style_loras"))
    folder_paths.add_model_folder_path("loras", path)
    yield path
    folder_paths.folder_names_and_paths["loras"][0].remove(path)
    folder_paths.filename_list_cache.pop("loras", None)


@pytest.fixture(scope="module")
def make_lora(pack, model, arch, lora_dir):
    """Write a random LoRA on the attention modules of some blocks; returns (file name, StyleLoRA)."""
    import folder_paths

    lora_file = pack("embroidery_core.lora_file")
    shapes = {k: tuple(v.shape) for k, v in model.model.diffusion_model.state_dict().items()}

    def make(name, blocks=None, seed=0, scale=1.0):
        g = torch.Generator().manual_seed(seed)
        modules = {}
        for path in arch.attention_modules(blocks):
            out, inp = shapes[path + ".weight"][:2]
            down = torch.randn(RANK, inp, generator=g) / inp ** 0.5
            up = torch.randn(out, RANK, generator=g) * scale
            modules[path] = (down, up, float(RANK))
        lora = lora_file.lora_from_modules(arch.name, modules)
        lora_file.save_lora(lora, f"{lora_dir}/{name}.safetensors")
        folder_paths.filename_list_cache.pop("loras", None)
        return f"{name}.safetensors", lora

    return make


@pytest.fixture(scope="module")
def style_lora(make_lora):
    return make_lora("style_all", seed=1)


# ---------------------------------------------------------------------------- helpers


def run(node, **inputs):
    with torch.inference_mode():
        return node.execute(**inputs).result


def conds(seed):
    return tiny_models.tiny_conditioning(FAMILY, text_seed=seed)


def sample(model, positive=None, negative=None, steps=2, size=LATENT, seed=0):
    import comfy.sample

    latent = torch.zeros(1, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, steps, CFG, "euler", "normal", positive or conds(1),
                                   negative or conds(2), latent, seed=seed, disable_pbar=True)


def guidance(style_nodes, model, lora_name, weight, start=0.0, end=1.0, blocks="all_attention"):
    (patched,) = run(style_nodes.EmbroideryStyleGuidance, model=model, lora_name=lora_name, blocks=blocks,
                     custom_blocks="", weight=weight, lora_strength=1.0, start_percent=start, end_percent=end)
    return patched


@contextlib.contextmanager
def lora_in_weights(diffusion_model, lora):
    """The style LoRA added straight into the module weights (not through the node's wrappers)."""
    import comfy.utils

    backups = {}
    try:
        with torch.no_grad():
            for path, module in lora.modules.items():
                weight = comfy.utils.get_attr(diffusion_model, path + ".weight")
                backups[path] = weight.detach().clone()
                weight.add_(module.delta().reshape(weight.shape).to(weight.dtype))
        yield
    finally:
        with torch.no_grad():
            for path, backup in backups.items():
                comfy.utils.get_attr(diffusion_model, path + ".weight").copy_(backup)


class Recorder:
    """A post-CFG function placed after the guidance: records what the guided step returned and
    rebuilds it by hand from calc_cond_batch passes: [pos, neg] with the base weights, then [pos]
    once per style LoRA added into the weights."""

    def __init__(self, loras, without_control=False):
        self.loras, self.without_control, self.steps = loras, without_control, []

    def __call__(self, args):
        import comfy.samplers

        model, x, sigma, options = args["model"], args["input"], args["sigma"], args["model_options"]
        cond, uncond = comfy.samplers.calc_cond_batch(model, [args["cond"], args["uncond"]], x, sigma, options)
        step = {"denoised": args["denoised"].clone(), "cond": cond, "styles": [],
                "plain": uncond + (cond - uncond) * CFG, "cond_seen": args["cond_denoised"]}
        for lora in self.loras:
            with lora_in_weights(model.diffusion_model, lora):
                step["styles"].append(comfy.samplers.calc_cond_batch(model, [args["cond"]], x, sigma, options)[0])
                if self.without_control:
                    bare = [{k: v for k, v in c.items() if k != "control"} for c in args["cond"]]
                    step["style_without_control"] = comfy.samplers.calc_cond_batch(model, [bare], x, sigma, options)[0]
        self.steps.append(step)
        return args["denoised"]


def record(model, loras, positive=None, negative=None, steps=2, without_control=False):
    recorder = Recorder(loras, without_control)
    probe = model.clone()
    probe.set_model_sampler_post_cfg_function(recorder)
    sample(probe, positive, negative, steps=steps)
    return recorder.steps


def expected(step, weights):
    return step["plain"] + sum(w * (s - step["cond"]) for w, s in zip(weights, step["styles"]))


# ---------------------------------------------------------------------------- style guidance


def test_weight_zero_is_bit_identical_to_the_plain_sampler(style_nodes, model, style_lora):
    plain = sample(model)
    guided = sample(guidance(style_nodes, model, style_lora[0], 3.0))  # leaves nothing behind in the UNet
    off = guidance(style_nodes, model, style_lora[0], 0.0)
    assert off is model
    assert torch.equal(sample(off), plain)
    assert not torch.equal(guided, plain)


def test_guided_step_equals_the_formula_from_three_passes(style_nodes, model, style_lora):
    weight = 3.0
    steps = record(guidance(style_nodes, model, style_lora[0], weight), [style_lora[1]])
    assert len(steps) == 2
    for step in steps:
        torch.testing.assert_close(step["cond_seen"], step["cond"])
        torch.testing.assert_close(step["denoised"], expected(step, [weight]), rtol=1e-4, atol=1e-5)
        assert (step["denoised"] - step["plain"]).abs().mean() > 1e-3  # the style term is not negligible


def test_stacked_guidance_adds_one_term_per_style(style_nodes, model, style_lora, make_lora):
    second_name, second = make_lora("style_second", seed=2)
    stacked = guidance(style_nodes, guidance(style_nodes, model, style_lora[0], 2.0), second_name, 1.5)
    steps = record(stacked, [style_lora[1], second])
    for step in steps:
        torch.testing.assert_close(step["denoised"], expected(step, [2.0, 1.5]), rtol=1e-4, atol=1e-5)
    # a style at weight 0 on top changes nothing, bit for bit
    assert torch.equal(sample(guidance(style_nodes, stacked, second_name, 0.0)), sample(stacked))


def test_window_guides_only_the_steps_inside_it(style_nodes, model, style_lora):
    # 2 steps: the first at sigma_max (percent 0) is outside [0.5, 1], the second inside
    steps = record(guidance(style_nodes, model, style_lora[0], 3.0, start=0.5), [style_lora[1]])
    assert torch.equal(steps[0]["denoised"], steps[0]["plain"])
    torch.testing.assert_close(steps[1]["denoised"], expected(steps[1], [3.0]), rtol=1e-4, atol=1e-5)
    assert (steps[1]["denoised"] - steps[1]["plain"]).abs().mean() > 1e-3


def tiny_controlnet():
    """A random ControlNet with the tiny UNet's layout (built directly: detection wants 320 channels)."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management as mm
    import comfy.ops
    import comfy.supported_models

    cfg = dict(tiny_models.TINY_UNET[FAMILY], **comfy.supported_models.SD15.unet_extra_config)
    cfg.pop("out_channels")
    net = comfy.cldm.cldm.ControlNet(**cfg, hint_channels=3, dtype=torch.float32, device="cpu",
                                     operations=comfy.ops.disable_weight_init)
    net.load_state_dict({k: tiny_models.init_value(k, tuple(v.shape), torch.float32, 7)
                         for k, v in net.state_dict().items()})
    return comfy.controlnet.ControlNet(net, load_device=mm.get_torch_device())


def test_guidance_keeps_the_controlnet_in_the_style_pass(style_nodes, model, style_lora):
    import nodes

    hint = torch.rand(1, LATENT * 8, LATENT * 8, 3, generator=torch.Generator().manual_seed(3))
    positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(
        conds(1), conds(2), tiny_controlnet(), hint, 1.0, 0.0, 1.0)
    weight = 3.0
    steps = record(guidance(style_nodes, model, style_lora[0], weight), [style_lora[1]], positive, negative,
                   without_control=True)
    for step in steps:
        torch.testing.assert_close(step["denoised"], expected(step, [weight]), rtol=1e-4, atol=1e-5)
        # the control really acts on the style pass, so the check above would see it missing
        assert (step["styles"][0] - step["style_without_control"]).abs().mean() > 1e-3


def test_guidance_rejects_a_reversed_window(style_nodes, model, style_lora):
    with pytest.raises(ValueError, match="start_percent"):
        guidance(style_nodes, model, style_lora[0], 3.0, start=0.8, end=0.2)


# ---------------------------------------------------------------------------- masked style


def test_masked_style_changes_the_picture_mostly_inside_its_mask(style_nodes, model, make_lora):
    name, _ = make_lora("style_masked", seed=4, scale=3.0)
    size = LATENT
    mask = torch.zeros(1, size * 8, size * 8)
    mask[..., : size * 4] = 1.0  # left half
    positive, negative = run(style_nodes.EmbroideryMaskedStyle, model=model, positive=conds(1), negative=conds(2),
                             blocks="all_attention", custom_blocks="", lora_1=name, strength_1=1.0, mask_1=mask)
    assert len(positive) == len(negative) == 2  # base (right half) + region (left half)
    masks = [c[1]["mask"] for c in positive]
    torch.testing.assert_close(masks[0] + masks[1], torch.ones_like(mask))
    assert [c[1].get("hooks") is None for c in positive] == [True, False]

    diff = (sample(model, positive, negative, size=size) - sample(model, size=size)).abs().mean(dim=(0, 1))
    inside, outside = diff[:, : size // 2 - 1].mean(), diff[:, size // 2 + 1:].mean()
    assert inside > 100 * outside, (float(inside), float(outside))


def test_masked_style_errors_name_the_region(style_nodes, model, style_lora):
    mask = torch.ones(1, 64, 64)
    common = dict(model=model, positive=conds(1), negative=conds(2), blocks="all_attention", custom_blocks="",
                  lora_1=style_lora[0], strength_1=1.0, mask_1=mask)
    with pytest.raises(ValueError, match="lora_2 is set but mask_2 is not connected"):
        run(style_nodes.EmbroideryMaskedStyle, **common, lora_2=style_lora[0])
    with pytest.raises(ValueError, match="different sizes"):
        run(style_nodes.EmbroideryMaskedStyle, **common, lora_2=style_lora[0], mask_2=torch.ones(1, 32, 32))


# ---------------------------------------------------------------------------- B-LoRA mix and colour fix


def test_blora_mix_patches_exactly_the_two_blocks(style_nodes, model, arch, style_lora, make_lora):
    content_name, _ = make_lora("content_all", seed=5)
    content_block, style_block = arch.preset("blora_content")[0], arch.preset("blora_style")[0]
    (mixed,) = run(style_nodes.EmbroideryBLoRAMix, model=model, content_lora=content_name,
                   content_blocks="blora_content", content_strength=1.0, style_lora=style_lora[0],
                   style_blocks="blora_style", style_strength=0.8, alpha_squared=True)
    expected_keys = {f"diffusion_model.{p}.weight" for p in arch.attention_modules([content_block, style_block])}
    assert set(mixed.patches) == expected_keys
    assert not model.patches  # the input model stays untouched
    with pytest.raises(ValueError, match="taken by content and style"):
        run(style_nodes.EmbroideryBLoRAMix, model=model, content_lora=content_name, content_blocks="blora_style",
            content_strength=1.0, style_lora=style_lora[0], style_blocks="blora_style", style_strength=1.0,
            alpha_squared=False)


def test_colour_fix_returns_the_image_shape(style_nodes):
    image = torch.rand(2, 32, 48, 3)
    design = torch.rand(1, 16, 16, 3)
    (fixed,) = run(style_nodes.EmbroideryColourFix, image=image, design=design, strength=1.0)
    assert fixed.shape == image.shape and fixed.dtype == torch.float32
    (masked,) = run(style_nodes.EmbroideryColourFix, image=image, design=design, strength=0.5,
                    mask=torch.zeros(1, 32, 48))
    assert torch.equal(masked, image)
