"""Tests for embroidery_core.images: colour spaces, colour fix, flat-design filter, previews."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from embroidery_core import images
from embroidery_core.images import (
    bar_chart,
    colour_fix,
    flatten_design,
    from_pil,
    lab_to_rgb,
    resize_to_multiple,
    rgb_to_lab,
    side_by_side,
    to_pil,
)


def _rand(*shape: int, seed: int = 0, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(*shape, generator=gen)


def _distinct_colours(img: torch.Tensor) -> int:
    return len(torch.unique(img.reshape(-1, 3), dim=0))


# --- LAB ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rgb, lab, tol",
    [
        ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0), 1e-2),
        ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), 1e-2),
        ((1.0, 0.0, 0.0), (53.24, 80.09, 67.20), 0.05),
        ((0.0, 1.0, 0.0), (87.73, -86.18, 83.18), 0.05),
        ((0.0, 0.0, 1.0), (32.30, 79.19, -107.86), 0.05),
        ((0.5, 0.5, 0.5), (53.39, 0.0, 0.0), 0.05),
    ],
)
def test_rgb_to_lab_reference_values(rgb, lab, tol):
    got = rgb_to_lab(torch.tensor(rgb))
    assert torch.allclose(got, torch.tensor(lab), atol=tol), got


def test_lab_round_trip_on_random_colours_any_leading_shape():
    rgb = _rand(4, 50, 50, 3)
    lab = rgb_to_lab(rgb)
    assert lab.shape == rgb.shape
    assert (lab_to_rgb(lab) - rgb).abs().max() < 1e-3


def test_lab_to_rgb_clamps_out_of_gamut():
    rgb = lab_to_rgb(torch.tensor([[50.0, 200.0, -200.0], [120.0, 0.0, 0.0], [-10.0, 0.0, 0.0]]))
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0


def test_lab_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match="3 channels"):
        rgb_to_lab(torch.rand(2, 2, 4))
    with pytest.raises(ValueError, match="3 channels"):
        lab_to_rgb(torch.rand(2, 2, 2))


# --- colour fix -----------------------------------------------------------------------------------
# Mid-tone, moderately saturated colours: every (L of one, ab of the other) mix stays in gamut,
# so the fix can be checked exactly in LAB.
def _pair(batch: int = 2, size: int = 16):
    output = _rand(batch, size, size, 3, seed=1, lo=0.35, hi=0.65)
    design = _rand(batch, size, size, 3, seed=2, lo=0.35, hi=0.65)
    return output, design


def test_colour_fix_keeps_output_lightness_and_design_chroma():
    output, design = _pair()
    lab = rgb_to_lab(colour_fix(output, design))
    assert torch.allclose(lab[..., 0], rgb_to_lab(output)[..., 0], atol=0.05)
    assert torch.allclose(lab[..., 1:], rgb_to_lab(design)[..., 1:], atol=0.05)


def test_colour_fix_strength_zero_and_mask_zero_leave_output_untouched():
    output, design = _pair()
    assert torch.equal(colour_fix(output, design, strength=0.0), output)
    mask = torch.zeros(2, 16, 16)
    mask[:, :, 8:] = 1.0
    fixed = colour_fix(output, design, mask=mask)
    assert torch.equal(fixed[:, :, :8], output[:, :, :8])
    lab = rgb_to_lab(fixed[:, :, 8:])
    assert torch.allclose(lab[..., 1:], rgb_to_lab(design[:, :, 8:])[..., 1:], atol=0.05)
    assert torch.allclose(lab[..., 0], rgb_to_lab(output[:, :, 8:])[..., 0], atol=0.05)


def test_colour_fix_half_strength_blends_chroma_in_lab():
    output, design = _pair()
    lab = rgb_to_lab(colour_fix(output, design, strength=0.5))
    expected = 0.5 * (rgb_to_lab(output)[..., 1:] + rgb_to_lab(design)[..., 1:])
    assert torch.allclose(lab[..., 1:], expected, atol=0.05)


def test_colour_fix_broadcasts_design_batch_and_resizes_design_and_mask():
    output = _rand(3, 24, 40, 3, seed=3, lo=0.35, hi=0.65)
    design = torch.full((1, 8, 8, 3), 0.5)
    design[..., 0] = 0.6  # one uniform colour, so resizing cannot change it
    mask = torch.ones(12, 20)  # [H,W] at half size
    fixed = colour_fix(output, design, mask=mask)
    assert fixed.shape == (3, 24, 40, 3)
    ab = rgb_to_lab(fixed)[..., 1:]
    expected = rgb_to_lab(design[0, 0, 0])[1:]
    assert torch.allclose(ab, expected.expand_as(ab), atol=0.05)


def test_colour_fix_drops_alpha():
    output, design = _pair(batch=1)
    rgba = torch.cat((output, torch.ones(1, 16, 16, 1)), dim=-1)
    fixed = colour_fix(rgba, design, strength=0.0)
    assert fixed.shape == (1, 16, 16, 3)
    assert torch.equal(fixed, output)


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), "1"])
def test_colour_fix_rejects_bad_strength(strength):
    output, design = _pair()
    with pytest.raises(ValueError, match="strength"):
        colour_fix(output, design, strength=strength)


def test_colour_fix_rejects_bad_shapes():
    output, design = _pair(batch=3)
    with pytest.raises(ValueError, match="batch 2"):
        colour_fix(output, design[:2])
    with pytest.raises(ValueError, match="output"):
        colour_fix(output[0], design)
    with pytest.raises(ValueError, match="mask"):
        colour_fix(output, design, mask=torch.ones(3, 16, 16, 1))
    with pytest.raises(ValueError, match="mask has batch 2"):
        colour_fix(output, design, mask=torch.ones(2, 16, 16))


# --- flatten_design -------------------------------------------------------------------------------
_BACKGROUND = (0.85, 0.80, 0.70)
_CIRCLE = (0.80, 0.20, 0.25)
_SQUARE = (0.20, 0.55, 0.30)


def _embroidery(size: int = 192, seed: int = 0):
    """Three flat colours with diagonal 'stitch' stripes and noise; returns (image, circle mask)."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    circle = (yy - 0.42 * size) ** 2 + (xx - 0.4 * size) ** 2 < (0.28 * size) ** 2
    square = (yy > 0.72 * size) & (yy < 0.92 * size) & (xx > 0.65 * size) & (xx < 0.92 * size)
    img = torch.empty(size, size, 3)
    img[:] = torch.tensor(_BACKGROUND)
    img[circle] = torch.tensor(_CIRCLE)
    img[square] = torch.tensor(_SQUARE)
    stripes = 0.12 * torch.sin((xx + yy) * 1.3)[..., None] * (circle | square)[..., None]
    noise = 0.05 * torch.randn(size, size, 3, generator=torch.Generator().manual_seed(seed))
    return (img + stripes + noise).clamp(0.0, 1.0)[None], circle


@pytest.fixture(scope="module")
def embroidery():
    return _embroidery()


@pytest.mark.parametrize("colours, outline, limit", [(3, 0.0, 3), (8, 0.0, 8), (3, 1.0, 4), (3, 0.5, 6)])
def test_flatten_design_limits_distinct_colours(embroidery, colours, outline, limit):
    img, _ = embroidery
    assert _distinct_colours(img) > 1000
    flat = flatten_design(img, colours=colours, outline=outline)
    assert flat.shape == img.shape and flat.dtype == torch.float32
    assert 1 < _distinct_colours(flat) <= limit


def test_flatten_design_does_not_split_a_noisy_flat_background():
    noise = 0.05 * torch.randn(1, 96, 96, 3, generator=torch.Generator().manual_seed(4))
    img = (torch.tensor(_BACKGROUND) + noise).clamp(0.0, 1.0)
    assert _distinct_colours(flatten_design(img, colours=8, outline=1.0)) == 1


def test_flatten_design_preserves_a_big_shape(embroidery):
    img, circle = embroidery
    flat = flatten_design(img, colours=4, outline=0.0)[0]
    palette = torch.tensor((_BACKGROUND, _CIRCLE, _SQUARE))
    near_circle = torch.cdist(flat.reshape(-1, 3), palette).argmin(1).view(circle.shape) == 1
    iou = (near_circle & circle).sum() / (near_circle | circle).sum()
    assert iou > 0.9, float(iou)


def _near_edge(shape: torch.Tensor, distance: int) -> torch.Tensor:
    """[H,W] bool: pixels within ``distance`` of the border of a bool shape."""
    x = shape[None, None].float()
    grown = F.max_pool2d(x, 2 * distance + 1, 1, distance)
    shrunk = -F.max_pool2d(-x, 2 * distance + 1, 1, distance)
    return (grown != shrunk)[0, 0]


def test_flatten_design_outline_sits_on_region_boundaries(embroidery):
    img, circle = embroidery
    ink_rgb = torch.tensor(images.OUTLINE_RGB)
    plain = flatten_design(img, colours=3, outline=0.0)[0]
    lined = flatten_design(img, colours=3, outline=1.0)[0]
    ink = (lined - ink_rgb).abs().amax(-1) < 1e-6
    assert not ((plain - ink_rgb).abs().amax(-1) < 1e-6).any()
    assert torch.equal(ink, (plain != lined).any(-1))  # lines are the only change
    upper = torch.arange(img.shape[1])[:, None] < 0.7 * img.shape[1]  # the square sits below
    circle_lines = ink & upper
    assert (circle_lines & ~_near_edge(circle, 4)).sum() == 0
    assert (_near_edge(circle, 1) & upper & ~ink).sum() < 0.05 * (_near_edge(circle, 1) & upper).sum()


def test_flatten_design_is_deterministic_and_per_image(embroidery):
    img, _ = embroidery
    other, _ = _embroidery(seed=1)
    batch = flatten_design(torch.cat((other, img)), seed=7)
    assert torch.equal(batch[1:], flatten_design(img, seed=7))
    assert torch.equal(flatten_design(img, seed=7), flatten_design(img, seed=7))


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"colours": 0}, "colours"),
        ({"colours": 2.5}, "colours"),
        ({"smooth_iters": -1}, "smooth_iters"),
        ({"outline": 2.0}, "outline"),
    ],
)
def test_flatten_design_rejects_bad_settings(kwargs, word):
    with pytest.raises(ValueError, match=word):
        flatten_design(torch.rand(1, 8, 8, 3), **kwargs)


# --- previews -------------------------------------------------------------------------------------
def test_side_by_side_scales_to_height_and_puts_white_gaps():
    strip = side_by_side([torch.zeros(2, 32, 64, 3), torch.zeros(1, 64, 64, 4)], height=48, gap=8)
    assert strip.shape == (1, 48, 96 + 8 + 48, 3)
    assert torch.all(strip[:, :, 96:104] == 1.0)
    assert strip[:, :, :96].max() == 0.0 and strip[:, :, 104:].max() == 0.0
    with pytest.raises(ValueError, match="at least one"):
        side_by_side([])


def _has_colour(img: torch.Tensor, rgb: tuple[int, int, int]) -> torch.Tensor:
    """[W] bool: columns of the chart that contain the exact colour."""
    return ((img[0] * 255).round() == torch.tensor(rgb, dtype=torch.float32)).all(-1).any(0)


def test_bar_chart_shape_range_and_highlight():
    labels = ["input_blocks.4.1", "input_blocks.5.1", "output_blocks.1.1"]
    chart = bar_chart(labels, [0.3, 0.9, float("nan")], title="similarity", highlight={"input_blocks.5.1"})
    assert chart.dim() == 4 and chart.shape[0] == 1 and chart.shape[2:] == (images.CHART_WIDTH, 3)
    assert chart.min() >= 0.0 and chart.max() <= 1.0
    assert _has_colour(chart, images.CHART_HIGHLIGHT_RGB).any()
    assert _has_colour(chart, images.CHART_BAR_RGB).any()
    plain = bar_chart(labels, [0.3, 0.9, float("nan")])
    assert not _has_colour(plain, images.CHART_HIGHLIGHT_RGB).any()
    assert plain.shape[1] < chart.shape[1]  # the title takes a row


def test_bar_chart_negative_values_point_left_of_the_zero_line():
    chart = bar_chart(["down", "up"], [-1.0, 2.0])
    axis = _has_colour(chart, images.CHART_AXIS_RGB).nonzero()
    assert len(axis) == 1
    rows = chart.shape[1] // 2  # the first bar lies in the top half, the second in the bottom half
    down = _has_colour(chart[:, :rows], images.CHART_BAR_RGB).nonzero()
    up = _has_colour(chart[:, rows:], images.CHART_BAR_RGB).nonzero()
    assert down.max() <= axis[0] < up.min() + 1
    assert (up.max() - axis[0]) > 1.5 * (axis[0] - down.min())  # lengths follow the values


def test_bar_chart_empty_and_bad_input():
    empty = bar_chart([], [])
    assert empty.shape[0] == 1 and empty.shape[1] > 0 and empty.min() < 0.5  # "no data" is drawn
    with pytest.raises(ValueError, match="2 labels but 1 values"):
        bar_chart(["a", "b"], [1.0])


# --- sizing and PIL -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape, long_side, multiple, expected",
    [
        ((1, 100, 150, 3), 512, 8, (1, 344, 512, 3)),  # upscale: 341.3 -> 344
        ((1, 100, 150, 3), 512, 64, (1, 320, 512, 3)),
        ((2, 1000, 500, 4), 256, 8, (2, 256, 128, 3)),  # downscale, alpha dropped, batch kept
        ((1, 10, 400, 3), 96, 8, (1, 8, 96, 3)),  # the short side never drops below one multiple
    ],
)
def test_resize_to_multiple_shapes(shape, long_side, multiple, expected):
    out = resize_to_multiple(_rand(*shape), long_side, multiple)
    assert out.shape == expected
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("long_side", [32, 512])
def test_resize_to_multiple_keeps_flat_colours_both_ways(long_side):
    img = torch.full((1, 100, 150, 3), 0.3)
    img[..., 2] = 1.0  # at the clamp limit, where bicubic overshoot would show
    out = resize_to_multiple(img, long_side)
    assert torch.allclose(out, torch.tensor([0.3, 0.3, 1.0]).expand_as(out), atol=1e-5)


def test_resize_to_multiple_rejects_bad_sizes():
    with pytest.raises(ValueError, match="long_side"):
        resize_to_multiple(torch.rand(1, 8, 8, 3), 4, 8)


def test_pil_round_trip_is_exact_on_8_bit_values():
    img = torch.randint(0, 256, (2, 12, 20, 3), generator=torch.Generator().manual_seed(5)).float() / 255
    pil = to_pil(img)
    assert pil.mode == "RGB" and pil.size == (20, 12)
    assert torch.equal(from_pil(pil), img[:1])
    assert from_pil(Image.new("RGBA", (5, 4), (255, 0, 0, 10))).shape == (1, 4, 5, 3)
