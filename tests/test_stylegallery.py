"""StyleGallery's matching and losses on hand-made tensors: enclosing circles and their IoU, the
matching score's terms, the regional loss is 0 when content and style are the same region, and
the optimisation loop lowers its loss."""
import math

import pytest
import torch

from embroidery_core import stylegallery as sg


def test_circle_iou_identity_disjoint_nested_and_half_overlap():
    a = (torch.tensor([0.0, 0.0]), 1.0)
    assert sg.circle_iou(a, a) == pytest.approx(1.0)
    assert sg.circle_iou(a, (torch.tensor([3.0, 0.0]), 1.0)) == 0.0
    assert sg.circle_iou(a, (torch.tensor([0.0, 0.0]), 0.5)) == pytest.approx(0.25)
    # two unit discs at distance 1: lens area 2pi/3 - sqrt(3)/2
    lens = 2 * math.pi / 3 - math.sqrt(3) / 2
    assert sg.circle_iou(a, (torch.tensor([1.0, 0.0]), 1.0)) == pytest.approx(lens / (2 * math.pi - lens))


def test_mask_circle_is_the_centroid_and_the_farthest_pixel_normalised_to_the_image():
    mask = torch.zeros(40, 80, dtype=torch.bool)
    mask[10:30, 20:60] = True
    centre, radius = sg.mask_circle(mask)
    assert torch.allclose(centre, torch.tensor([0.5, 0.5]), atol=1e-6)
    corner = math.hypot((20.5 / 80) - 0.5, (10.5 / 40) - 0.5)
    assert radius == pytest.approx(corner, rel=1e-5)
    lopsided = torch.zeros(10, 10, dtype=torch.bool)
    lopsided[0, 0] = lopsided[0, 1] = lopsided[0, 2] = lopsided[9, 9] = True  # the centroid, not the middle
    centre, _ = sg.mask_circle(lopsided)
    assert torch.allclose(centre, torch.tensor([(0.5 + 1.5 + 2.5 + 9.5) / 40, (0.5 * 3 + 9.5) / 40]), atol=1e-6)


def test_stat_encoder_is_fixed_by_its_seed_and_untrained():
    a, b = sg.StatEncoder(16, seed=3), sg.StatEncoder(16, seed=3)
    tokens = torch.randn(30, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a(tokens), b(tokens)) and a(tokens).shape == (30, 16)
    assert len(a.encoder.layers) == 8 and a.encoder.layers[0].self_attn.num_heads == 4
    assert not torch.equal(sg.StatEncoder(16, seed=4)(tokens), a(tokens))
    assert not any(p.requires_grad for p in a.parameters())
    state = torch.get_rng_state()
    sg.StatEncoder(16, seed=5)
    assert torch.equal(state, torch.get_rng_state())  # building it leaves the global generator alone


def test_stat_descriptor_is_the_official_mean_and_variance():
    encoder = sg.StatEncoder(8, seed=0)
    features = torch.randn(8, 4, 4, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:2, :3] = True
    out = encoder(features[:, mask].T)  # [6, 8]
    full = torch.zeros(8, 16)
    full[:, mask.flatten()] = out.T
    expected = torch.cat([out.mean(dim=0), full.var(dim=1) / 6])
    assert torch.allclose(sg.stat_descriptor(encoder, features, mask), expected, atol=1e-6)


def test_masked_mean_keeps_cells_covered_by_more_than_ten_pixels_of_1024():
    features = torch.arange(4.0).reshape(1, 2, 2)  # four 32 x 32 cells of a 64 x 64 mask
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[:32, :32] = True
    mask[40:43, 40:43] = True  # 9 pixels of cell (1, 1): not kept
    assert sg.masked_mean(features, mask).tolist() == [0.0]
    mask[40:44, 40:43] = True  # 12 pixels: kept
    assert sg.masked_mean(features, mask).tolist() == [1.5]


def test_match_takes_the_best_region_over_every_style_image():
    def region(semantic, centre):
        return sg.RegionDescriptor(torch.tensor([1.0, 0.0]), torch.tensor(semantic),
                                   (torch.tensor(centre), 0.2))

    content = [region([1.0, 0.0], [0.2, 0.2]), region([0.0, 1.0], [0.8, 0.8])]
    styles = [[region([0.0, 1.0], [0.2, 0.2])], [region([1.0, 0.1], [0.8, 0.8]), region([0.1, 1.0], [0.8, 0.8])]]
    matches = sg.match_regions(content, styles)
    assert [(i, j) for i, j, _ in matches] == [(1, 0), (1, 1)]
    i, j, score = matches[1]
    expected = 0.25 * 1.0 + 1.0 * float(torch.nn.functional.cosine_similarity(
        torch.tensor([0.0, 1.0]), torch.tensor([0.1, 1.0]), dim=0)) + 0.125 * 1.0
    assert score == pytest.approx(expected)


def test_regional_loss_is_zero_when_content_and_style_are_the_same_region():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16, 8, generator=g) for _ in range(3))
    mask = torch.zeros(16, dtype=torch.bool)
    mask[:6] = True
    m = mask[None, :, None].float()
    # the layer's own output for queries scaled by 1.5 and the masked-out keys/values zeroed
    own = torch.nn.functional.scaled_dot_product_attention(sg._heads(1.5 * q * m, 2), sg._heads(k * m, 2),
                                                           sg._heads(v * m, 2))
    out = own.transpose(1, 2).reshape(1, 16, 8)
    assert float(sg.regional_style_loss(out, q, k, v, mask, mask, heads=2)) == pytest.approx(0.0, abs=1e-6)
    assert float(sg.regional_style_loss(out + 1.0, q, k, v, mask, mask, heads=2)) == pytest.approx(6 / 16)
    removed = torch.nn.functional.scaled_dot_product_attention(  # removing the keys instead is not the same
        sg._heads(1.5 * q * m, 2), sg._heads(k[:, mask], 2), sg._heads(v[:, mask], 2)).transpose(1, 2).reshape(1, 16, 8)
    assert float(sg.regional_style_loss(removed, q, k, v, mask, mask, heads=2)) > 1e-3
    assert float(sg.content_loss(q, q)) == 0.0
    with pytest.raises(ValueError, match="covers no token"):
        sg.regional_style_loss(out, q, k, v, mask, torch.zeros(16, dtype=torch.bool), heads=2)


def test_a_style_region_finer_than_a_layer_adds_nothing_there_and_is_styled_where_it_is_seen():
    """A thin style region (one pixel column of an 8 x 8 mask) keeps tokens in a 4 x 4 layer and
    none in a 2 x 2 one: the coarse layer adds only the content term, the fine one the regional
    loss, and nothing raises (it did: a benchmark run on a satin reference stopped on it)."""
    g = torch.Generator().manual_seed(1)

    def layer(tokens):
        q, k, v, out = (torch.randn(1, tokens, 8, generator=g) for _ in range(4))
        return sg.LayerFeatures(q, k, v, out, heads=2)

    current, content, style = ([layer(16), layer(4)] for _ in range(3))
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[:, 4:] = True
    thin = torch.zeros(8, 8, dtype=torch.bool)
    thin[:, 2] = True  # nearest keeps columns 0, 2, 4, 6 at 4 x 4 and 0, 4 at 2 x 2
    thin_fine, thin_coarse = sg.token_mask(thin, 16), sg.token_mask(thin, 4)
    assert thin_fine.any() and not thin_coarse.any()
    loss = sg.stylize_loss(current, content, [style], [(region, 0, thin)], content_weight=0.26, query_scale=1.5)
    fine = sg.regional_style_loss(current[0].out, current[0].q, style[0].k, style[0].v, sg.token_mask(region, 16),
                                  thin_fine, 2, 1.5)
    content_terms = sum(0.26 * sg.content_loss(now.q, own.q) for now, own in zip(current, content))
    assert float(loss) == pytest.approx(float(fine + content_terms), rel=1e-6)
    assert float(fine) > 0


def test_token_mask_follows_the_layers_grid():
    mask = torch.zeros(64, 128, dtype=torch.bool)
    mask[:, :64] = True
    tokens = sg.token_mask(mask, 8 * 16)
    assert tokens.shape == (128,) and tokens.reshape(8, 16)[:, :8].all() and not tokens.reshape(8, 16)[:, 8:].any()
    with pytest.raises(ValueError, match="do not fit"):
        sg.token_mask(mask, 100)


def test_official_timestep_lists():
    standard = sg.StylizeConfig()
    assert standard.timesteps[:3] == (895, 889, 883) and standard.timesteps[-1] == 1 and standard.iterations == 150
    fast = sg.StylizeConfig.fast()
    assert len(fast.timesteps) == 28 and fast.repeats == 3 and fast.iterations == 84
    assert (fast.learning_rate, fast.content_weight) == (0.25, 0.33)


def test_attention_layers_are_the_decoders_last_six():
    from embroidery_core.blocks import SD15, SDXL

    assert sg.attention_layers(SD15) == [f"output_blocks.{i}.1.transformer_blocks.0.attn1" for i in range(6, 12)]
    assert sg.attention_layers(SDXL) == [f"output_blocks.{b}.1.transformer_blocks.{i}.attn1" for b in (3, 4, 5)
                                         for i in (0, 1)]


def test_stylize_lowers_the_regional_loss_on_the_tiny_unet(tiny_unet):
    """The whole loop on a real UNet: features recorded by forward wrappers with their graph,
    Adam on the latent; the loss falls, the content and style latents are untouched."""
    from embroidery_core.adapters import installed
    from embroidery_core.diffusion import Cond

    arch = tiny_unet.cfg.arch()
    layers = sg.attention_layers(arch, 2)
    modules = dict(tiny_unet.named_modules())
    recorder = sg.AttentionRecorder(layers, {layer: modules[layer].heads for layer in layers})
    tiny_unet.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    content, style = (torch.randn(1, tiny_unet.cfg.in_channels, 8, 8, generator=g) for _ in range(2))
    context = Cond(torch.zeros(1, 4, tiny_unet.cfg.context_dim)).context

    def features(latent, t):
        tiny_unet(latent, torch.tensor([float(t)]), context)
        return recorder.collect()

    left = torch.zeros(8, 8, dtype=torch.bool)
    left[:, :4] = True
    pairs = [(left, 0, ~left), (~left, 0, left)]
    losses = []
    before = style.clone()
    with installed(tiny_unet, recorder):
        out = sg.stylize(sg.standardise_channels(content), features, content, [style], pairs,
                         sg.StylizeConfig(timesteps=(500,) * 30, learning_rate=0.05),
                         on_step=lambda step, loss: losses.append(loss))
    assert len(losses) == 30 and losses[-1] < 0.8 * losses[0], losses
    assert out.shape == content.shape and torch.equal(style, before)
