"""DiffStyler's inversion node in-process on tiny SD1.5: shapes and levels, the empty prompt from
the clip, mistakes refused with the fix, the shared model untouched."""
import pytest
import torch

from .test_training_nodes import sd15, snapshot  # noqa: F401 (fixture)

NODE = "Embroidery DDIM Inversion"


def _latent(vae):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 64, 64, 3, generator=g)
    with torch.inference_mode():
        return {"samples": vae.encode(image)}


def test_inversion_climbs_the_schedule_and_samples_back(pack, sd15):
    model, clip, vae = sd15
    latent = _latent(vae)
    before = snapshot(model)
    with torch.inference_mode():
        inversion, noisy, back, sigmas = pack["EmbroideryInvert"].execute(model, latent, 8, clip=clip).result
    assert inversion.latents.shape == (9, *latent["samples"].shape) and inversion.sigmas[-1] == 0
    assert torch.all(inversion.sigmas[:-1] > inversion.sigmas[1:])
    source = model.model.process_latent_in(latent["samples"].float())
    assert torch.allclose(inversion.latents[-1], source)  # the last level is the source itself
    assert noisy["samples"].shape == back["samples"].shape == latent["samples"].shape
    assert torch.isfinite(back["samples"]).all()
    assert noisy["samples"].std() > 3 * latent["samples"].std()  # it climbed to the noisy end
    after = snapshot(model)
    assert after[1] == before[1] and after[2] == before[2] == []
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])


def test_conditioning_or_clip_is_needed(pack, sd15):
    model, clip, vae = sd15
    with pytest.raises(ValueError, match=rf"^{NODE}: connect a conditioning"), torch.inference_mode():
        pack["EmbroideryInvert"].execute(model, _latent(vae), 4)
    with torch.inference_mode():
        tokens = clip.tokenize("")
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        inversion = pack["EmbroideryInvert"].execute(model, _latent(vae), 4, conditioning=[[cond, {"pooled_output": pooled}]]).result[0]
    assert inversion.latents.shape[0] == 5


# ---------------------------------------------------------------------------- the DiffStyler guider

GUIDER = "Embroidery DiffStyler"
SIZE = 16  # latent side: 128 px


@pytest.fixture(scope="module")
def mod(pack, pack_dir):
    """The pack's submodules, as ComfyUI imported them."""
    import importlib

    return lambda sub: importlib.import_module(f"{str(pack_dir).replace('.', '_x_')}.{sub}")


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def base(comfy, family):
    from . import tiny_models

    return tiny_models.tiny_patcher(family)


def _conds(family, seed):
    from . import tiny_models

    return tiny_models.tiny_conditioning(family, text_seed=seed)


def _style_model(mod, base, seed, scale=1.0):
    """``base`` with a random LoRA on every attention block, loaded as ComfyUI's LoRA loader does."""
    common, lora_file = mod("nodes.common"), mod("embroidery_core.lora_file")
    arch = common.model_family(base, "test")
    shapes = {k: tuple(v.shape) for k, v in base.model.diffusion_model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for path in arch.attention_modules():
        out, inp = shapes[path + ".weight"][:2]
        modules[path] = (torch.randn(4, inp, generator=g) / inp ** 0.5, torch.randn(out, 4, generator=g) * scale, 4.0)
    return common.apply_lora_patches(base, lora_file.lora_from_modules(arch.name, modules), 1.0, "test")


def _inverted(pack, base, family, steps=6):
    g = torch.Generator().manual_seed(3)
    latent = {"samples": torch.randn(1, 4, SIZE, SIZE, generator=g) * 0.5}
    with torch.inference_mode():
        inversion, noisy, _, sigmas = pack["EmbroideryInvert"].execute(base, latent, steps,
                                                                       conditioning=_conds(family, 0)).result
    return inversion, noisy, sigmas


def _guide(pack, base, family, inversion, styles, **options):
    inputs = dict(model=base, positive=_conds(family, 1), negative=_conds(family, 2), source=_conds(family, 0),
                  inversion=inversion, cfg=3.0, feature_fraction=0.6, attention_fraction=0.5)
    inputs.update(options)
    for i, (model, positive, mask) in enumerate(styles, start=1):
        inputs.update({f"style_model_{i}": model, f"style_positive_{i}": positive, f"mask_{i}": mask})
    return pack["EmbroideryDiffStyler"].execute(**inputs).result[0]


def _sample(guider, noisy, sigmas, noise=None):
    import comfy.samplers

    latent = noisy["samples"]
    with torch.inference_mode():
        return guider.sample(torch.zeros_like(latent) if noise is None else noise, latent,
                             comfy.samplers.sampler_object("euler"), sigmas, disable_pbar=True)


def _half(side="left"):
    mask = torch.zeros(1, SIZE * 8, SIZE * 8)
    if side == "left":
        mask[..., : SIZE * 4] = 1
    else:
        mask[..., SIZE * 4:] = 1
    return mask


def test_guider_samples_two_masked_styles_and_leaves_every_model_untouched(pack, mod, base, family):
    inversion, noisy, sigmas = _inverted(pack, base, family)
    one, two = _style_model(mod, base, 1), _style_model(mod, base, 2)
    before = [snapshot(m) for m in (base, one, two)]
    patches_before = [dict(m.patches) for m in (one, two)]
    guider = _guide(pack, base, family, inversion,
                    [(one, _conds(family, 4), _half("left")), (two, _conds(family, 5), _half("right"))])
    out = _sample(guider, noisy, sigmas)
    assert out.shape == noisy["samples"].shape and torch.isfinite(out).all()
    # the injection ran inside ComfyUI's real UNet: every attn1 layer and the feature block recorded
    assert set(guider.injection.store) == set(guider.injection.names) and guider.injection.names
    for m, b in zip((base, one, two), before):
        after = snapshot(m)
        assert after[1] == b[1] and after[2] == b[2] == []
        assert all(torch.equal(b[0][k], after[0][k]) for k in b[0])
    assert [dict(m.patches) for m in (one, two)] == patches_before and not base.patches
    assert not base.weight_wrapper_patches and not base.object_patches


def test_the_style_changes_the_picture_mostly_inside_its_mask(pack, mod, base, family):
    """A style whose LoRA is exactly zero, with the base's own prompt and injection on every step,
    is the base branch again; a real LoRA in the left half then changes mostly the left half."""
    inversion, noisy, sigmas = _inverted(pack, base, family)
    same = dict(feature_fraction=1.0, attention_fraction=1.0)
    zero = _sample(_guide(pack, base, family, inversion,
                          [(_style_model(mod, base, 1, scale=0.0), _conds(family, 1), _half())], **same), noisy, sigmas)
    styled = _sample(_guide(pack, base, family, inversion,
                            [(_style_model(mod, base, 1, scale=3.0), _conds(family, 1), _half())], **same),
                     noisy, sigmas)
    change = (styled - zero).abs().mean(dim=(0, 1))
    left, right = change[:, : SIZE // 2].mean(), change[:, SIZE // 2:].mean()
    assert left > 0 and left > 2 * right, (float(left), float(right))


def test_the_patched_attention_is_comfyuis_own_until_it_injects(pack, mod, base, family):
    """The attn1 replace patch and the out_layers stand-in compute what the model computes when
    neither recording nor injecting: a plain sampler on the patched clone is bit-identical."""
    import comfy.sample

    nodes = mod("nodes.diffstyler_nodes")
    diffstyler, common = mod("embroidery_core.diffstyler"), mod("nodes.common")
    arch = common.model_family(base, "test")
    feature, attention = diffstyler.injection_blocks(arch)
    clone = nodes.injected_clone(base, diffstyler.SourceInjection(arch, attention, feature), feature)
    latent = torch.zeros(1, 4, SIZE, SIZE)
    noise = comfy.sample.prepare_noise(latent, 0)

    def run(model):
        with torch.inference_mode():
            return comfy.sample.sample(model, noise, 2, 3.0, "euler", "normal", _conds(family, 1), _conds(family, 2),
                                       latent, seed=0, disable_pbar=True)

    assert torch.equal(run(clone), run(base))


def test_guider_mistakes_are_refused_with_the_fix(pack, mod, base, family):
    inversion, noisy, sigmas = _inverted(pack, base, family)
    style = _style_model(mod, base, 1)
    with pytest.raises(ValueError, match=rf"^{GUIDER}: connect style_model_1"):
        _guide(pack, base, family, inversion, [])
    with pytest.raises(ValueError, match="needs both style_model_2 and style_positive_2"):
        _guide(pack, base, family, inversion, [(style, _conds(family, 4), _half()), (style, None, _half("right"))])
    with pytest.raises(ValueError, match="each needs its mask: connect mask_2"):
        _guide(pack, base, family, inversion, [(style, _conds(family, 4), _half()), (style, _conds(family, 5), None)])
    with pytest.raises(ValueError, match="carries no LoRA beyond 'model'"):
        _guide(pack, base, family, inversion, [(base.clone(), _conds(family, 4), None)])
    with pytest.raises(ValueError, match="lacks a LoRA that 'model' has"):  # 'model' has a LoRA the style lacks
        _guide(pack, style, family, inversion, [(_style_model(mod, base, 2), _conds(family, 4), None)])
    with pytest.raises(ValueError, match="not the source's aspect"):
        _guide(pack, base, family, inversion, [(style, _conds(family, 4), torch.ones(1, 64, 128))])
    with pytest.raises(ValueError, match="mask_1 is empty"):
        _guide(pack, base, family, inversion, [(style, _conds(family, 4), torch.zeros(1, 128, 128))])
    guider = _guide(pack, base, family, inversion, [(style, _conds(family, 4), None)])
    with pytest.raises(ValueError, match="connect a Disable Noise node"):
        _sample(guider, noisy, sigmas, noise=torch.ones_like(noisy["samples"]))
    import comfy.samplers

    with pytest.raises(ValueError, match="connect Embroidery DDIM Inversion's sigmas output"):
        _sample(guider, noisy, comfy.samplers.calculate_sigmas(base.get_model_object("model_sampling"), "karras", 6))
    with pytest.raises(ValueError, match="connect the inversion's 'noisy' latent"):
        _sample(guider, {"samples": torch.zeros(1, 4, SIZE, SIZE // 2)}, sigmas)
