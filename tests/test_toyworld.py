"""The procedural toy world: determinism, distinct techniques, ground truth and vocabulary."""
import itertools
import time

import numpy as np
import pytest

from embroidery_core.metrics import content_iou, high_frequency_ratio
from toyworld import generator as gen
from toyworld import (
    FILL_TECHNIQUES,
    HELD_OUT,
    TECHNIQUES,
    TRAIN_TECHNIQUES,
    TRIGGER,
    VOCAB,
    detokenize,
    make_design,
    render_embroidery,
    sample_pair,
    tokenize,
)

SEEDS = range(6)
RENDER_BUDGET_S = 0.05  # one 128 px render


def _luma(img):
    return img @ np.array([0.299, 0.587, 0.114])


def _coherence(img, labels):
    """Area-weighted mean over regions of the gradient structure tensor's coherence (0..1)."""
    gy, gx = np.gradient(_luma(img))
    values, weights = [], []
    for k in range(1, labels.max() + 1):
        m = labels == k
        jxx, jyy, jxy = (gx * gx)[m].sum(), (gy * gy)[m].sum(), (gx * gy)[m].sum()
        values.append(np.hypot(jxx - jyy, 2 * jxy) / (jxx + jyy))
        weights.append(m.sum())
    return float(np.average(values, weights=weights))


def _texture_stats(img, mask, labels):
    """A small texture fingerprint: HFR at two cutoffs, coverage of the design, directionality."""
    return np.array([high_frequency_ratio(img, 0.25), high_frequency_ratio(img, 0.5),
                     mask.sum() / (labels > 0).sum(), _coherence(img, labels)])


# --- designs ---------------------------------------------------------------------------------

def test_design_is_deterministic_and_seed_dependent():
    a, b, c = make_design(3), make_design(3), make_design(4)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)
    assert a.words == b.words
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("size", [64, 128])
def test_design_is_flat_and_labelled(size):
    for seed in SEEDS:
        d = make_design(seed, size)
        assert d.image.shape == (size, size, 3) and d.image.dtype == np.float32
        assert d.labels.shape == (size, size)
        np.testing.assert_array_equal(d.image, d.region_rgb[d.labels])  # one flat colour per region
        np.testing.assert_array_equal(d.region_rgb[0], d.fabric_rgb)
        regions = np.unique(d.labels)
        assert regions[0] == 0 and 3 <= len(regions) <= 5  # fabric + 2..4 thread colours
        assert len(np.unique(d.region_rgb, axis=0)) == len(d.region_rgb)
        for colour, motif in zip(d.words[::2], d.words[1::2]):
            assert colour in gen.PALETTE and (motif in gen.SHAPES or motif in gen.LETTERS)


def test_design_rejects_tiny_size():
    with pytest.raises(ValueError, match="too small"):
        make_design(0, size=8)


# --- embroidery ------------------------------------------------------------------------------

def test_render_is_deterministic_and_seed_dependent():
    d = make_design(5)
    for technique in TECHNIQUES:
        a, ma = render_embroidery(d, technique, 1)
        b, mb = render_embroidery(d, technique, 1)
        c, _ = render_embroidery(d, technique, 2)
        assert np.array_equal(a, b) and np.array_equal(ma, mb), technique
        assert not np.array_equal(a, c), technique


def test_render_output_format():
    d = make_design(0, 128)
    for technique in TECHNIQUES:
        img, mask = render_embroidery(d, technique, 0)
        assert img.shape == (128, 128, 3) and img.dtype == np.float32
        assert mask.shape == (128, 128) and mask.dtype == bool
        assert 0.0 <= img.min() and img.max() <= 1.0


def test_unknown_technique_is_rejected():
    with pytest.raises(ValueError, match="unknown technique 'applique'"):
        render_embroidery(make_design(0), "applique", 0)


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_render_is_fast(technique):
    d = make_design(0, 128)
    render_embroidery(d, technique, 0)  # warm up
    best = float("inf")
    for seed in range(3):
        start = time.perf_counter()
        render_embroidery(d, technique, seed)
        best = min(best, time.perf_counter() - start)
    assert best < RENDER_BUDGET_S, f"{technique}: {best * 1000:.1f} ms"


@pytest.mark.parametrize("size", [64, 128])
def test_embroidery_has_more_high_frequency_than_design(size):
    for seed in SEEDS:
        d = make_design(seed, size)
        flat = high_frequency_ratio(d.image)
        for technique in TECHNIQUES:
            img, _ = render_embroidery(d, technique, seed)
            assert high_frequency_ratio(img) > flat, (seed, technique)


@pytest.mark.parametrize("size", [64, 128])
def test_techniques_differ_from_each_other(size):
    for seed in SEEDS:
        d = make_design(seed, size)
        renders = {t: render_embroidery(d, t, seed) for t in TECHNIQUES}
        stats = {t: _texture_stats(img, mask, d.labels) for t, (img, mask) in renders.items()}
        for a, b in itertools.combinations(TECHNIQUES, 2):
            pixels = np.abs(renders[a][0] - renders[b][0])[d.labels > 0].mean()
            assert pixels > 0.05, (seed, a, b)
            assert np.abs(stats[a] - stats[b]).max() > 0.005, (seed, a, b)


@pytest.mark.parametrize("size", [64, 128])
def test_mask_follows_design(size):
    for seed in SEEDS:
        d = make_design(seed, size)
        inside = d.labels > 0
        for technique in TECHNIQUES:
            _, mask = render_embroidery(d, technique, seed)
            iou = content_iou(mask, inside)
            if technique in FILL_TECHNIQUES:
                assert iou > 0.7, (seed, technique, iou)
            elif technique == "cross_stitch":  # snapped to a 4 px grid with fabric between X's
                assert iou > 0.5, (seed, technique, iou)
            else:  # running stitch: dashed outlines inside the shapes
                assert not (mask & ~inside).any() and 0.05 < mask.sum() / inside.sum() < 0.7


def test_running_stitch_stays_on_outlines():
    d = make_design(11, 128)
    _, mask = render_embroidery(d, "running", 0)
    interior = gen._region_distance(d.labels, 8, lower_only=True) > 6  # 6 px inside every edge
    assert interior.any() and not (mask & interior).any()


def test_satin_is_the_most_directional():
    mean = {t: np.mean([_coherence(render_embroidery(make_design(s, 128), t, s)[0],
                                   make_design(s, 128).labels) for s in SEEDS]) for t in TECHNIQUES}
    assert max(mean, key=mean.get) == "satin", mean


@pytest.mark.parametrize("technique", ["french_knot", "sequin"])
def test_knots_and_sequins_have_specular_highlights(technique):
    d = make_design(1, 128)
    img, mask = render_embroidery(d, technique, 0)
    above = img - d.region_rgb[d.labels]
    shiny = (above.min(axis=-1) > 0.15) & mask & (d.labels > 0)
    assert shiny.mean() > 0.005


def test_cross_stitch_repeats_on_its_grid():
    d = make_design(12, 128)  # one large circle
    _, mask = render_embroidery(d, "cross_stitch", 0)
    cell = int(gen.CROSS_CELL * 128 / gen.BASE_SIDE)
    core = gen._region_distance(d.labels, 3 * cell) > 2 * cell
    same_on_grid = (mask[core] == np.roll(mask, -cell, axis=1)[core]).mean()
    same_off_grid = (mask[core] == np.roll(mask, -cell // 2, axis=1)[core]).mean()
    assert mask[core].mean() < 0.95  # fabric shows between the X's
    assert same_on_grid > 0.95 and same_off_grid < 0.8


def test_technique_split():
    assert set(HELD_OUT) == {"french_knot", "sequin", "chain"}
    assert set(TRAIN_TECHNIQUES) | set(HELD_OUT) == set(TECHNIQUES)
    assert not set(TRAIN_TECHNIQUES) & set(HELD_OUT)
    assert len(TECHNIQUES) >= 7


# --- words -----------------------------------------------------------------------------------

def test_tokenize_round_trip():
    text = f"a red circle blue star in {TRIGGER} style"
    ids = tokenize(text)
    assert len(ids) == 8 and detokenize(ids) == text
    assert tokenize("a red heart", length=5)[3:] == [VOCAB.index("<pad>")] * 2


def test_tokenize_tells_letter_from_article():
    ids = tokenize("a A Red")
    assert VOCAB[ids[0]] == "a" and VOCAB[ids[1]] == "A" and VOCAB[ids[2]] == "red"


def test_tokenize_rejects_unknown_word_and_overflow():
    with pytest.raises(ValueError, match="'teapot'"):
        tokenize("a red teapot")
    with pytest.raises(ValueError, match="9 words but length is 8"):
        tokenize("a red circle blue star in <trigger> style design")


def test_vocab_covers_the_world():
    for word in [*gen.PALETTE, *gen.SHAPES, *gen.LETTERS, *TECHNIQUES, "design", "embroidery"]:
        assert word in VOCAB
    assert len(set(VOCAB)) == len(VOCAB)


def test_sample_pair_prompts_fit_and_match():
    for seed in range(20):
        pair = sample_pair(seed, "satin")
        assert pair["design"].shape == pair["embroidery"].shape == (64, 64, 3)
        assert pair["embroidery_prompt"] == pair["design_prompt"] + f" in {TRIGGER} style"
        assert pair["design_prompt"].split()[1:] == pair["words"]
        tokenize(pair["embroidery_prompt"])  # fits the default length
    pair = sample_pair(7, "sequin", size=32)
    assert pair["mask"].shape == (32, 32)

