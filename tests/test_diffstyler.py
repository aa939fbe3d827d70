"""DiffStyler's pieces on hand-made tensors: the q/k blend is its formula, the fusion leaves every
position outside the masks bit-identical, and DDIM inversion then sampling gives the source back."""
import pytest
import torch

from embroidery_core.diffstyler import (blend_query_key, blend_ratio, ddim_sample, ddim_sigmas, fuse, invert,
                                        latent_masks)
from embroidery_core.diffusion import DiscreteSchedule, target


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("t, r", [(0, 0.0), (100, 0.2), (250, 0.5), (499, 0.998), (500, 1.0), (999, 1.0)])
def test_blend_ratio_is_min_1_2t_over_T(t, r):
    assert blend_ratio(t) == pytest.approx(r)


def test_query_key_blend_is_the_formula_and_the_identity_at_zero():
    g = torch.Generator().manual_seed(0)
    q, k, qs, ks = (torch.randn(2, 16, 8, generator=g) for _ in range(4))
    for r in (0.25, 0.5, 1.0):
        bq, bk = blend_query_key(q, k, qs, ks, r)
        assert torch.allclose(bq, r * qs + (1 - r) * q) and torch.allclose(bk, r * ks + (1 - r) * k)
    same_q, same_k = blend_query_key(q, k, qs, ks, 0.0)
    assert same_q is q and same_k is k
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        blend_query_key(q, k, qs, ks, 1.5)


def test_fusion_leaves_every_position_outside_the_masks_bit_identical():
    g = torch.Generator().manual_seed(1)
    base, a, b = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(3))
    left = torch.zeros(64, 64)
    left[:, :40] = 1  # 40 of 64 columns: 5 of 8 latent columns
    right = torch.zeros(64, 64)
    right[:, 24:] = 1  # overlaps the left mask in latent columns 3-4
    masks = latent_masks([left, right[None]], 8, 8)
    assert masks[0].shape == (1, 1, 8, 8) and int(masks[0].sum()) == 8 * 5 and int(masks[1].sum()) == 8 * 5
    out = fuse(base, [(a, masks[0]), (b, masks[1])])
    outside = ~(masks[0] | masks[1]).expand_as(base)
    assert torch.equal(out[outside], base[outside])  # (no position here is outside both: checked below)
    only_a = (masks[0] & ~masks[1]).expand_as(base)
    assert torch.equal(out[only_a], a[only_a])
    overlap = (masks[0] & masks[1]).expand_as(base)
    assert overlap.any() and torch.equal(out[overlap], b[overlap])  # the later style wins
    none = latent_masks([torch.zeros(64, 64)], 8, 8)
    assert torch.equal(fuse(base, [(a, none[0])]), base)


def _gaussian_model(prediction: str, data_std: float = 0.7):
    """The exact denoiser of data ~ N(0, data_std^2), as an eps or v network's raw output."""
    def model(x, sigma):
        s = sigma.reshape(-1, 1, 1, 1)
        x0 = x * data_std ** 2 / (data_std ** 2 + s ** 2)
        eps = (x - x0) / s
        return target(prediction, x0, eps, sigma)
    return model


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_inversion_then_ddim_sampling_gives_the_source_back(prediction):
    """With the exact denoiser of a Gaussian, DDIM is an Euler scheme of the probability-flow ODE:
    inverting and sampling back returns the source up to its step error, which shrinks with the
    steps (measured: 7.3 % at 50, 2.1 % at 200, 0.56 % at 1000; DiffStyler inverts over 999). At
    1000 steps within 1 % (relative)."""
    schedule = DiscreteSchedule().sigmas()
    sigmas = ddim_sigmas(schedule, 1000)
    assert sigmas[-1] == 0 and torch.all(sigmas[:-1] > sigmas[1:])
    source = 0.7 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    model = _gaussian_model(prediction)
    inversion = invert(model, prediction, source, sigmas, float(schedule[0]))
    assert inversion.latents.shape == (1001, 1, 4, 8, 8) and torch.equal(inversion.latents[-1], source)
    assert inversion.noisy.std() > 5 * source.std()  # it really climbed to the noisy end
    back = ddim_sample(model, prediction, inversion.noisy, sigmas)
    assert (back - source).norm() / source.norm() < 0.01
    with pytest.raises(ValueError, match="eps and v models"):
        invert(model, "flow", source, sigmas, float(schedule[0]))


# ---------------------------------------------------------------------------- on the tiny UNet

def _inputs(seed):
    from embroidery_core.diffusion import Cond

    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, 8, 8, generator=g), Cond(torch.randn(1, 5, 32, generator=g))


def _capture(unet, names):
    seen = {}
    modules = dict(unet.named_modules())
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.detach().clone()))
             for n in names]
    return seen, hooks


def test_with_ratio_1_the_base_branch_queries_equal_the_sources_and_ratio_0_changes_nothing(tiny_unet):
    from embroidery_core.adapters import installed
    from embroidery_core.diffstyler import SourceInjection
    from embroidery_core.diffusion import TorchDenoiser

    arch = tiny_unet.cfg.arch()
    blocks = [b for b in arch.attention_blocks() if b.startswith("output_blocks")]
    injection = SourceInjection(arch, blocks, "output_blocks.4.0")
    denoiser = TorchDenoiser(tiny_unet)
    (source, cond), (other, other_cond) = _inputs(0), _inputs(1)
    sigma = torch.tensor([3.0])
    with torch.no_grad():
        plain = denoiser(other, sigma, other_cond)
        with installed(tiny_unet, injection):
            untouched = denoiser(other, sigma, other_cond)  # neither recording nor injecting
            with injection.recording():
                denoiser(source, sigma, cond)
            recorded = dict(injection.store)
            queries = [n for n in injection.attention if n.endswith("to_q")]
            plain_seen, hooks = _capture(tiny_unet, queries)
            with injection.injecting(0.0, features=False):
                unchanged = denoiser(other, sigma, other_cond)
            for h in hooks:
                h.remove()
            plain_queries = dict(plain_seen)
            seen, hooks = _capture(tiny_unet, queries)
            try:
                with injection.injecting(1.0, features=True):
                    denoiser(other, sigma, other_cond)
            finally:
                for h in hooks:
                    h.remove()
    assert torch.equal(untouched, plain) and torch.equal(unchanged, plain)
    assert len(queries) == len(blocks) and set(recorded) == set(injection.names)
    # a forward hook sees what the module returns, i.e. the wrapped (injected) queries that
    # attention then uses: with r = 1 they are the source's, on another input and prompt
    for name in queries:
        assert not torch.equal(recorded[name], plain_queries[name])  # the branches differ without injection
        assert torch.equal(seen[name], recorded[name]), name


def test_injected_queries_and_features_reach_the_attention_and_the_decoder(tiny_unet):
    """What attention really reads: wrap the attention's softmax input via a forward hook on the
    block's attn1 (its q is to_q's wrapped output); with r = 1 and features on, the branch's
    attn1 sees the source's queries, and output_blocks.4.0 returns the source's residual."""
    from embroidery_core.adapters import installed
    from embroidery_core.diffstyler import SourceInjection
    from embroidery_core.diffusion import TorchDenoiser

    arch = tiny_unet.cfg.arch()
    block = "output_blocks.4.1"
    injection = SourceInjection(arch, [block], "output_blocks.4.0")
    denoiser = TorchDenoiser(tiny_unet)
    (source, cond), (other, other_cond) = _inputs(0), _inputs(1)
    sigma = torch.tensor([3.0])
    to_q = f"{block}.transformer_blocks.0.attn1.to_q"
    modules = dict(tiny_unet.named_modules())
    got = {}
    with torch.no_grad(), installed(tiny_unet, injection):
        with injection.recording():
            denoiser(source, sigma, cond)
        with injection.injecting(1.0, features=True):
            got["q"] = modules[to_q](torch.randn(1, 16, modules[to_q].in_features))  # any input: the source's q
            got["feature"] = modules["output_blocks.4.0.out_layers"](torch.randn_like(injection.store[
                "output_blocks.4.0.out_layers"]))
        with injection.injecting(0.5, features=False):
            half = modules[to_q](torch.zeros(1, 16, modules[to_q].in_features))
    assert torch.equal(got["q"], injection.store[to_q].expand_as(got["q"]))
    assert torch.equal(got["feature"], injection.store["output_blocks.4.0.out_layers"])
    bias = modules[to_q].bias if modules[to_q].bias is not None else 0.0
    assert torch.allclose(half, 0.5 * injection.store[to_q] + 0.5 * (torch.zeros_like(half) + bias))
    fresh = SourceInjection(arch, [block], None)
    with torch.no_grad(), installed(tiny_unet, fresh), fresh.injecting(1.0, False), \
            pytest.raises(ValueError, match="run the source branch first"):
        denoiser(other, sigma, other_cond)


def test_inversion_on_the_trained_toy_base_samples_back_to_the_render():
    """The trained toy base (a TinyUNet, v-prediction): inverting a render's latent over 200 levels
    with the empty prompt and sampling back gives it within 40 % (measured 33.8 % on the shipped
    base, round 11; 9.8 % on round 1, whose inversion of this render diverged over 50 levels,
    112 %). A broken inversion lands at 100 % or more. DDIM inversion's drift moves from base to
    base and render to render (round 11: the coarse cross's render comes back within 11 %),
    docs/FIDELITY.md."""
    from toyworld import demo
    from toyworld.model import load_toy_model, to_latent, toy_denoiser

    unet, encoder = load_toy_model()
    denoiser = toy_denoiser(unet)
    render = to_latent(demo.make_reference("knot vertical fine metallic", demo.REFERENCE_SEED).embroidery)
    cond = encoder.encode("")
    model = lambda x, s: denoiser(x, s, cond)  # noqa: E731
    sigmas = ddim_sigmas(denoiser.sigmas, 200)
    inversion = invert(model, denoiser.prediction, render, sigmas, float(denoiser.sigmas[0]))
    back = ddim_sample(model, denoiser.prediction, inversion.noisy, sigmas)
    assert (back - render).norm() / render.norm() < 0.40


def test_injection_blocks_are_the_official_ones_on_sd15_and_their_analogue_on_sdxl(tiny_unet):
    from embroidery_core.blocks import SD15, SDXL
    from embroidery_core.diffstyler import injection_blocks

    feature, attention = injection_blocks(SD15)
    assert feature == "output_blocks.4.0"
    assert attention == [f"output_blocks.{i}.1" for i in range(4, 12)]  # 4.1-11.1, METHODS.md section 3
    feature, attention = injection_blocks(SDXL)
    assert feature == "output_blocks.1.0" and attention == [f"output_blocks.{i}.1" for i in range(1, 6)]
    feature, attention = injection_blocks(tiny_unet.cfg.arch())
    modules = dict(tiny_unet.named_modules())
    assert f"{feature}.out_layers" in modules and all(f"{b}.transformer_blocks.0.attn1.to_q" in modules
                                                      for b in attention)


def test_style_schedule_counts_the_official_steps():
    from embroidery_core.diffstyler import Schedule

    schedule = Schedule()
    flags = [schedule.style(i, 50) for i in range(50)]
    assert sum(f for f, _ in flags) == 30 and sum(a for _, a in flags) == 25  # first 30 / first 25 of 50
    assert flags[24] == (True, True) and flags[25] == (True, False) and flags[30] == (False, False)
    with pytest.raises(ValueError, match="feature_fraction"):
        Schedule(feature_fraction=1.5)


def _hand_branch(log, name, negative, positive, mask=None):
    from embroidery_core.diffstyler import Branch

    @__import__("contextlib").contextmanager
    def active():
        log.append(f"{name} on")
        yield
        log.append(f"{name} off")

    return Branch(source=lambda x, s: log.append(f"{name} source"), predict=lambda x, s: (negative, positive),
                  mask=mask, active=active)


def test_fused_step_replaces_inside_masks_only_and_skips_idle_source_passes():
    from embroidery_core.diffstyler import Schedule, SourceInjection, fused_step
    from embroidery_core.blocks import SD15

    g = torch.Generator().manual_seed(2)
    base_n, base_p, style_n, style_p = (torch.randn(1, 4, 8, 8, generator=g) for _ in range(4))
    mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    mask[..., :3] = True
    log = []
    branches = [_hand_branch(log, "base", base_n, base_p), _hand_branch(log, "style", style_n, style_p, mask)]
    injection = SourceInjection(SD15, [], None)
    x = torch.zeros(1, 4, 8, 8)
    neg, pos = fused_step(injection, branches, Schedule(), 0, 50, x, x, torch.ones(1), 900.0)
    inside = mask.expand_as(base_p)
    assert torch.equal(pos[~inside], base_p[~inside]) and torch.equal(neg[~inside], base_n[~inside])
    assert torch.equal(pos[inside], style_p[inside]) and torch.equal(neg[inside], style_n[inside])
    assert log == ["base on", "base source", "base off", "style on", "style source", "style off"]
    log.clear()
    fused_step(injection, branches, Schedule(), 40, 50, x, x, torch.ones(1), 100.0)  # past both style fractions
    assert log == ["base on", "base source", "base off", "style on", "style off"]
    with pytest.raises(ValueError, match="first branch must be the base"):
        fused_step(injection, branches[::-1], Schedule(), 0, 50, x, x, torch.ones(1), 900.0)


def test_restyle_with_the_base_branch_alone_replaying_its_own_path_is_plain_ddim(tiny_unet):
    """When the replayed "source" latents are the sampler's own DDIM path (same prompt, CFG 1), the
    base branch injects its own queries, keys and features into itself at every step, so
    DiffStyler's sampler must give plain DDIM's result: step i must replay level i, no other."""
    from embroidery_core.adapters import installed
    from embroidery_core.diffstyler import Branch, Inversion, SourceInjection, injection_blocks, restyle
    from embroidery_core.diffusion import TorchDenoiser

    denoiser = TorchDenoiser(tiny_unet)
    start, cond = _inputs(0)
    model = lambda x, s: denoiser(x, s, cond)  # noqa: E731
    sigmas = ddim_sigmas(denoiser.sigmas, 8)
    path = [start * float(sigmas[0])]
    with torch.no_grad():
        for i in range(len(sigmas) - 1):
            path.append(ddim_sample(model, denoiser.prediction, path[-1], sigmas[i:i + 2]))
    feature, attention = injection_blocks(tiny_unet.cfg.arch())
    injection = SourceInjection(tiny_unet.cfg.arch(), attention, feature)
    base = Branch(source=model, predict=lambda x, s: (model(x, s), model(x, s)))
    timestep = lambda s: float(denoiser.timestep(torch.tensor([s]))[0])  # noqa: E731
    with installed(tiny_unet, injection):
        out = restyle(injection, [base], Inversion(sigmas, torch.stack(path)), denoiser.prediction, 1.0, timestep)
        shifted = Inversion(sigmas, torch.stack(path[1:] + path[-1:]))  # level i + 1 replayed at step i
        off = restyle(injection, [base], shifted, denoiser.prediction, 1.0, timestep)
    assert torch.allclose(out, path[-1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(off, path[-1], atol=1e-2, rtol=1e-2)


def test_inversion_finds_the_level_of_a_sampler_sigma_and_refuses_others():
    from embroidery_core.diffstyler import Inversion

    sigmas = ddim_sigmas(DiscreteSchedule().sigmas(), 10)
    inversion = Inversion(sigmas, torch.zeros(11, 1, 4, 2, 2))
    assert [inversion.level(float(s)) for s in sigmas[:-1]] == list(range(10))
    assert inversion.level(float(sigmas[3]) * (1 + 1e-5)) == 3
    with pytest.raises(ValueError, match="none of the inversion's 10 levels"):
        inversion.level(float(sigmas[3] + sigmas[4]) / 2)


def test_toy_diffstyler_keeps_the_design_better_than_plain_inversion():
    """On the trained toy base, with a LoRA of zeros and the empty prompt (so the style branch is
    the base model), DiffStyler's sampler is inversion + DDIM with the source's features and
    attention injected: it must give each design back at least as closely as plain inversion then
    DDIM (measured at 20 levels on round 11: 0.06 / 0.64 / 0.06 against 0.08 / 0.70 / 0.07 relative
    error; on round 1 0.08 / 0.39 / 0.07 against 0.14 / 0.40 / 0.07)."""
    from embroidery_core.lora_file import lora_from_modules
    from toyworld import demo
    from toyworld.model import from_latent, load_toy_model, to_latent, toy_denoiser
    from toyworld.sample import diffstyled

    unet, encoder = load_toy_model()
    arch = unet.cfg.arch()
    modules = dict(unet.named_modules())
    zero = lora_from_modules(arch.name, {p: (torch.zeros(4, modules[p].in_features),
                                              torch.zeros(modules[p].out_features, 4), 4.0)
                                          for p in arch.attention_modules()})
    designs = torch.cat([t.design for t in demo.new_designs(3, "knot vertical fine metallic")])
    kept = diffstyled(unet, encoder, zero, [""] * 3, designs, 20, 3.0)
    denoiser = toy_denoiser(unet)
    empty = encoder.encode([""] * 3)
    model = lambda x, s: denoiser(x, s, empty)  # noqa: E731
    sigmas = ddim_sigmas(denoiser.sigmas, 20)
    with torch.no_grad():
        inversion = invert(model, denoiser.prediction, to_latent(designs), sigmas, float(denoiser.sigmas[0]))
        plain = from_latent(ddim_sample(model, denoiser.prediction, inversion.noisy, sigmas))
    error = lambda out: [float((o - d).norm() / d.norm()) for o, d in zip(out, designs)]  # noqa: E731
    assert all(k <= p + 1e-3 for k, p in zip(error(kept), error(plain))), (error(kept), error(plain))
    assert sum(error(kept)) < sum(error(plain)) - 0.05
