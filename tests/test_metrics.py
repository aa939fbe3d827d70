"""Evaluation metrics against hand-made inputs with known answers, and on toy-world renders."""
import numpy as np
import pytest
import torch

from embroidery_core.metrics import (
    colour_histogram,
    content_iou,
    estimate_fabric_rgb,
    hfrd,
    high_frequency_ratio,
    hist_design_distance,
    hist_ref_similarity,
    histogram_distance,
    stitched_mask,
)
from toyworld import TECHNIQUES, make_design, render_embroidery

N = 64
RED, BLUE = (0.9, 0.1, 0.1), (0.1, 0.1, 0.9)


def _solid(rgb, h=N, w=N):
    return np.broadcast_to(np.asarray(rgb, np.float32), (h, w, 3)).copy()


def _checkerboard(n=N):
    c = np.indices((n, n)).sum(0) % 2
    return np.repeat(c[..., None], 3, axis=-1).astype(np.float32)


def _gradient(n=N):
    return np.repeat(np.linspace(0, 1, n)[None, :, None], n, 0).repeat(3, -1).astype(np.float32)


def _half(left, right):
    img = _solid(left)
    img[:, N // 2:] = right
    return img


# --- high-frequency ratio ------------------------------------------------------------------------

def test_hfr_known_images():
    assert high_frequency_ratio(_solid((0.3, 0.5, 0.7))) == 0.0
    assert high_frequency_ratio(_checkerboard()) > 0.99
    assert high_frequency_ratio(_gradient()) < 0.01
    assert high_frequency_ratio(np.indices((N, N))[1] % 2 * 1.0) > 0.99  # grey (H, W) input


def test_hfr_falls_with_cutoff_and_is_a_ratio():
    img, _ = render_embroidery(make_design(0), "satin horizontal fine matte", 0)
    values = [high_frequency_ratio(img, c) for c in (0.0, 0.1, 0.25, 0.5, 1.0, 1.5)]
    assert values[0] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[-1] == 0.0  # nothing lies beyond the corner frequency sqrt(2)


def test_hfr_accepts_comfy_batches():
    img, _ = render_embroidery(make_design(1), "tatami vertical fine matte", 1)
    single = high_frequency_ratio(img)
    batch = torch.from_numpy(np.stack([img, _checkerboard()]))
    assert high_frequency_ratio(torch.from_numpy(img)[None]) == pytest.approx(single)
    assert high_frequency_ratio(batch) == pytest.approx((single + 1.0) / 2, abs=1e-3)


def test_bad_image_shape_is_rejected():
    with pytest.raises(ValueError, match=r"got shape \(8, 8, 4\)"):
        high_frequency_ratio(np.zeros((8, 8, 4)))


def test_hfrd():
    a, b = _checkerboard(), _gradient()
    assert hfrd(a, a) == 0.0
    assert hfrd(a, b) == pytest.approx(hfrd(b, a))
    expected = abs(high_frequency_ratio(a) - high_frequency_ratio(b)) * 100
    assert hfrd(a, b) == pytest.approx(expected) and hfrd(a, b) > 98  # percentage points


# --- colour histograms ---------------------------------------------------------------------------

def test_colour_histogram():
    hist = colour_histogram(_half(RED, BLUE))
    assert hist.shape == (16, 16, 16) and hist.sum() == pytest.approx(1.0)
    assert hist[14, 1, 1] == pytest.approx(0.5) and hist[1, 1, 14] == pytest.approx(0.5)
    assert colour_histogram(_solid((1.0, 1.0, 1.0)), bins=4)[3, 3, 3] == 1.0  # 1.0 -> last bin


@pytest.mark.parametrize("kind,disjoint", [("chi2", 1.0), ("intersection", 1.0), ("l1", 2.0)])
def test_histogram_distance_extremes(kind, disjoint):
    img = _half(RED, BLUE)
    assert histogram_distance(img, img.copy(), kind=kind) == pytest.approx(0.0)
    assert histogram_distance(_solid(RED), _solid(BLUE), kind=kind) == pytest.approx(disjoint)


def test_histogram_distance_known_values():
    half, red = _half(RED, BLUE), _solid(RED)  # p = (.5, .5), q = (1, 0)
    assert histogram_distance(half, red, kind="chi2") == pytest.approx(0.5 * (0.25 / 1.5 + 0.25 / 0.5))
    assert histogram_distance(half, red, kind="intersection") == pytest.approx(0.5)
    assert histogram_distance(half, red, kind="l1") == pytest.approx(1.0)
    hists = colour_histogram(half), colour_histogram(red)  # precomputed histograms work too
    assert histogram_distance(*hists, kind="chi2") == histogram_distance(half, red, kind="chi2")


def test_histogram_distance_rejects_unknown_kind():
    with pytest.raises(ValueError, match="'emd'"):
        histogram_distance(_solid(RED), _solid(BLUE), kind="emd")


def test_paper_histogram_scores():
    half, red, blue = _half(RED, BLUE), _solid(RED), _solid(BLUE)
    assert hist_design_distance(half, half) == 0.0 and hist_design_distance(red, blue) == 100.0
    assert hist_ref_similarity(half, half) == pytest.approx(100.0)
    assert hist_ref_similarity(red, blue) == 0.0
    assert hist_ref_similarity(half, red) == pytest.approx(50.0)


def test_histograms_rank_toy_outputs_sensibly():
    d = make_design(4)
    emb, _ = render_embroidery(d, "satin horizontal fine matte", 0)
    other, _ = render_embroidery(make_design(9), "satin horizontal fine matte", 0)
    assert hist_design_distance(emb, d.image) < hist_design_distance(other, d.image)
    assert hist_ref_similarity(render_embroidery(d, "satin horizontal fine matte", 1)[0], emb) > hist_ref_similarity(other, emb)


# --- content ---------------------------------------------------------------------------------

def test_content_iou_known_values():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[:, :6] = True  # 60 px
    b[:, 4:] = True  # 60 px, 20 shared
    assert content_iou(a, b) == pytest.approx(20 / 100)
    assert content_iou(a, a) == 1.0 and content_iou(a, ~a) == 0.0
    assert content_iou(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0
    assert content_iou(torch.from_numpy(a), b) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="differ"):
        content_iou(a, b[:5])


def test_stitched_mask_hand_made():
    fabric = (0.8, 0.75, 0.6)
    img = _solid(fabric)
    img[10:20, 10:20] = RED
    img[30:40, 30:40] += 0.05  # fabric texture within tolerance
    mask = stitched_mask(img, fabric)
    assert mask.sum() == 100 and mask[10:20, 10:20].all()
    assert stitched_mask(np.stack([img, img]), fabric).shape == (2, N, N)


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_stitched_mask_recovers_render_mask(technique):
    for seed in range(4):
        d = make_design(seed, 128)
        img, true_mask = render_embroidery(d, technique, seed)
        assert content_iou(stitched_mask(img, d.fabric_rgb), true_mask) > 0.8, seed
        assert np.abs(estimate_fabric_rgb(img) - d.fabric_rgb).max() < 0.05

