import pytest
import torch

from embroidery_core import block_metric
from embroidery_core.adapters import installed
from embroidery_core.diffusion import Cond, TorchDenoiser


def test_centred_cosine_is_the_formula_and_ignores_the_shared_mean():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 64, 8, generator=g), torch.randn(2, 64, 8, generator=g)
    xc, yc = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    want = (xc * yc).sum((1, 2)) / (xc.norm(dim=(1, 2)) * yc.norm(dim=(1, 2)))
    torch.testing.assert_close(block_metric.centred_cosine(x, y), want)
    shared = 20 * torch.randn(1, 1, 8, generator=g)  # the same large per-channel mean in both images
    plain = torch.nn.functional.cosine_similarity((x + shared).flatten(1), (y + shared).flatten(1), dim=1)
    assert plain.min() > 0.95  # what the plain cosine saw: everything alike
    torch.testing.assert_close(block_metric.centred_cosine(x + shared, y + shared), want)  # centred: unchanged
    assert want.abs().max() < 0.3  # independent features are not similar
    torch.testing.assert_close(block_metric.centred_cosine(x, 3 * x + shared), torch.ones(2))


def test_similarity_is_per_block_mean_cosine():
    a = {"output_blocks.1.1.transformer_blocks.0.attn1.to_out.0": [torch.tensor([[[1.0, 0.0]]])],
         "input_blocks.5.1.transformer_blocks.0.attn1.to_out.0": [torch.tensor([[[1.0, 0.0]]])]}
    b = {"output_blocks.1.1.transformer_blocks.0.attn1.to_out.0": [torch.tensor([[[0.0, 1.0]]])],
         "input_blocks.5.1.transformer_blocks.0.attn1.to_out.0": [torch.tensor([[[2.0, 0.0]]])]}
    sim = block_metric.block_similarity(a, b)
    assert sim == {"input_blocks.5.1": pytest.approx(1.0), "output_blocks.1.1": pytest.approx(0.0)}
    assert [blk for blk, _ in block_metric.rank_blocks(sim)] == ["output_blocks.1.1", "input_blocks.5.1"]


def test_measure_finds_the_block_that_sees_the_difference(tiny_unet):
    """A block whose self-attention output differs only for the 'embroidery' ranks first."""
    arch = tiny_unet.cfg.arch()
    recorder = block_metric.FeatureRecorder(arch.attention_modules())
    denoiser = TorchDenoiser(tiny_unet)
    cond = Cond(torch.randn(1, 5, 32))
    design = torch.randn(1, 4, 8, 8)
    embroidery = design.clone()
    target = "output_blocks.4.1.transformer_blocks.0.attn1.to_out.0"
    calls = {"n": 0}

    class Stitches:  # perturbs one block's self-attention output on every second call
        names = [target]

        def wrap(self, name, original):
            def forward(x):
                out = original(x)
                calls["n"] += 1
                return out + 5 * torch.randn_like(out) if calls["n"] % 2 == 0 else out
            return forward

    sigmas = block_metric.evenly_spaced(denoiser.sigmas, 3)
    with torch.no_grad(), installed(tiny_unet, Stitches()), installed(tiny_unet, recorder):
        sim = block_metric.measure(lambda x, s: denoiser(x, s, cond), recorder, design, embroidery, sigmas,
                                   torch.randn_like(design))
    ranking = block_metric.rank_blocks(sim)
    assert ranking[0][0] == "output_blocks.4.1"
    assert set(sim) == set(arch.attention_blocks())


def test_evenly_spaced_sigmas_avoid_the_ends():
    sigmas = torch.linspace(0.1, 10, 1000)
    picked = block_metric.evenly_spaced(sigmas, 10)
    assert len(picked) == 10 and picked[0].item() > 0.1 and picked[-1].item() < 10
    assert all(a.item() < b.item() for a, b in zip(picked, picked[1:]))
