"""The procedural toy world: determinism, distinct techniques, ground truth and vocabulary."""
import itertools
import time

import numpy as np
import pytest

from toyworld import generator as gen
from toyworld import (
    ATTRIBUTES,
    DESIGN_COLOURS,
    HELD_OUT,
    NEW_KIND_TECHNIQUES,
    REFERENCE_COLOURS,
    TECHNIQUES,
    TRAIN_TECHNIQUES,
    TRIGGER,
    VOCAB,
    attributes,
    detokenize,
    make_design,
    render_embroidery,
    sample_pair,
    tokenize,
)

SEEDS = range(6)
RENDER_BUDGET_S = 0.05  # one 128 px render


def _shade(technique, size=64):
    """The renderer's shading alone (no colour, no per-stitch jitter, no lustre), on the image grid."""
    kind, direction, spacing, _ = attributes(technique)
    period = gen.SPACINGS[spacing] * size / gen.BASE_SIDE
    return gen._RENDERERS[kind](gen._cells((size, size), direction, period)).shade


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
        assert not np.array_equal(a, c), technique  # the per-stitch and fibre variation


def test_render_output_format():
    d = make_design(0, 128)
    for technique in TECHNIQUES:
        img, mask = render_embroidery(d, technique, 0)
        assert img.shape == (128, 128, 3) and img.dtype == np.float32
        assert mask.shape == (128, 128) and mask.dtype == bool
        assert 0.0 <= img.min() and img.max() <= 1.0


@pytest.mark.parametrize("bad", ["applique", "knot diagonal fine matte", "knot vertical fine",
                                 "satin fine horizontal matte", "knot vertical fine matte shiny"])
def test_unknown_technique_is_rejected(bad):
    with pytest.raises(ValueError, match=f"unknown technique '{bad}'"):
        render_embroidery(make_design(0), bad, 0)


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
def test_embroidery_adds_texture_inside_every_region(size):
    """The design is flat per region; every technique adds shading inside each region."""
    for seed in SEEDS[:3]:
        d = make_design(seed, size)
        for technique in TECHNIQUES:
            img, _ = render_embroidery(d, technique, seed)
            for k in range(1, d.labels.max() + 1):
                region = d.labels == k
                relative = img[region].mean(axis=-1) / max(d.region_rgb[k].mean(), 1e-3)
                assert relative.std() > 0.08, (seed, technique, k)


@pytest.mark.parametrize("size", [64, 128])
def test_techniques_differ_from_each_other(size):
    for seed in SEEDS[:3]:
        d = make_design(seed, size)
        renders = {t: render_embroidery(d, t, seed)[0] for t in TECHNIQUES}
        for a, b in itertools.combinations(TECHNIQUES, 2):
            assert np.abs(renders[a] - renders[b])[d.labels > 0].mean() > 0.03, (seed, a, b)


def test_every_kind_covers_the_design_exactly():
    for seed in SEEDS:
        d = make_design(seed)
        for technique in TECHNIQUES:
            _, mask = render_embroidery(d, technique, seed)
            np.testing.assert_array_equal(mask, d.labels > 0)


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_each_attribute_is_one_operation_on_the_cell(technique):
    """One stitch per cell, aligned with the image (so a 4 x 4 latent fold sees the same code at
    every position of a fine fill); "vertical" is "horizontal" turned by 90 degrees and "coarse"
    is "fine" at twice the size, for every kind, and each shows."""
    kind, direction, spacing, sheen = attributes(technique)
    shade = _shade(technique)
    step = gen.SPACINGS[spacing]
    np.testing.assert_allclose(shade, np.roll(shade, step, axis=0))
    np.testing.assert_allclose(shade, np.roll(shade, step, axis=1))
    if direction == "horizontal":  # P(x, y) -> P(y, 1 - x): a quarter turn of every cell
        turned = _shade(f"{kind} vertical {spacing} {sheen}")
        np.testing.assert_allclose(np.rot90(shade, -1), turned, atol=1e-9)
        assert np.abs(shade - turned).mean() > 0.05, technique  # every kind shows its direction
    if spacing == "fine":  # a coarse cell at 64 px is a fine one at 128 px
        coarse = _shade(f"{kind} {direction} coarse {sheen}")
        np.testing.assert_allclose(coarse, _shade(technique, size=128)[:64, :64], atol=1e-9)
        assert np.abs(coarse - shade).mean() > 0.05, technique


def test_metallic_is_the_same_stitches_under_a_broad_lustre():
    d = make_design(2)
    mask = d.labels > 0
    for kind in gen.KINDS:
        matte, _ = render_embroidery(d, f"{kind} horizontal fine matte", 0)
        metallic, _ = render_embroidery(d, f"{kind} horizontal fine metallic", 0)
        ratio = (metallic.mean(-1) / np.maximum(matte.mean(-1), 1e-3))[mask]
        lustre = gen._lustre(mask.shape, 1.0)[mask]
        assert np.corrcoef(ratio, lustre)[0, 1] > 0.8, kind  # brighter where the lustre is
        assert ratio.std() > 0.1, kind


def test_satin_and_knots_have_specular_highlights():
    d = make_design(1, 128)
    for technique in ("satin horizontal coarse matte", "knot horizontal coarse matte"):
        img, mask = render_embroidery(d, technique, 0)
        above = img - d.region_rgb[d.labels]
        shiny = (above.min(axis=-1) > 0.1) & mask
        assert shiny.mean() > 0.005, technique


def test_technique_split():
    assert set(TRAIN_TECHNIQUES) | set(HELD_OUT) | set(NEW_KIND_TECHNIQUES) == set(TECHNIQUES)
    assert len(TRAIN_TECHNIQUES) + len(HELD_OUT) + len(NEW_KIND_TECHNIQUES) == len(TECHNIQUES) == 40
    assert len(HELD_OUT) >= 3
    seen = {word for t in TRAIN_TECHNIQUES for word in t.split()}
    for technique in HELD_OUT:  # an unseen combination of words the base model knows ...
        assert set(technique.split()) <= seen, technique
        words = attributes(technique)
        for i, values in enumerate(ATTRIBUTES[1:], 1):  # ... with every neighbour one word away trained
            for value in values:
                if value != words[i]:
                    neighbour = " ".join(words[:i] + (value,) + words[i + 1:])
                    assert neighbour in TRAIN_TECHNIQUES, (technique, neighbour)
    for i in range(1, len(ATTRIBUTES)):  # each direction, spacing and sheen is held out as often
        counts = [sum(attributes(t)[i] == v for t in HELD_OUT) for v in ATTRIBUTES[i]]
        assert len(set(counts)) == 1, (i, counts)
    assert gen.NEW_KIND not in seen and all(t.split()[0] == gen.NEW_KIND for t in NEW_KIND_TECHNIQUES)


def test_attributes_parse_a_technique():
    assert attributes("knot vertical fine metallic") == ("knot", "vertical", "fine", "metallic")
    assert TECHNIQUES == tuple(" ".join(a) for a in itertools.product(*ATTRIBUTES))


def test_reference_colours_are_kept_out_of_new_designs():
    assert not set(REFERENCE_COLOURS) & set(DESIGN_COLOURS)
    assert set(REFERENCE_COLOURS) | set(DESIGN_COLOURS) == set(gen.PALETTE)
    for seed in range(30):
        for colours in (REFERENCE_COLOURS, DESIGN_COLOURS):
            d = make_design(seed, colours=colours)
            threads = {tuple(rgb) for rgb in d.region_rgb[1:]}
            allowed = {tuple(np.float32(gen.PALETTE[c])) for c in colours}
            assert threads <= allowed and len(threads) >= 2, (seed, colours)
    with pytest.raises(ValueError, match="unknown thread colours"):
        make_design(0, colours=("gold",))


# --- words -----------------------------------------------------------------------------------

def test_tokenize_round_trip():
    text = f"a red circle blue star in {TRIGGER} style"
    ids = tokenize(text)
    assert len(ids) == gen.PROMPT_LENGTH and detokenize(ids) == text
    assert tokenize("a red heart", length=5)[3:] == [VOCAB.index("<pad>")] * 2


def test_tokenize_tells_letter_from_article():
    ids = tokenize("a A Red")
    assert VOCAB[ids[0]] == "a" and VOCAB[ids[1]] == "A" and VOCAB[ids[2]] == "red"


def test_tokenize_rejects_unknown_word_and_overflow():
    with pytest.raises(ValueError, match="'teapot'"):
        tokenize("a red teapot")
    with pytest.raises(ValueError, match="9 words but length is 8"):
        tokenize("a red circle blue star in <trigger> style design", length=8)


def test_vocab_covers_the_world():
    for word in [*gen.PALETTE, *gen.SHAPES, *gen.LETTERS, *sum(ATTRIBUTES, ()), "design", "embroidery"]:
        assert word in VOCAB
    assert len(set(VOCAB)) == len(VOCAB)


def test_sample_pair_prompts_fit_and_match():
    for seed in range(20):
        pair = sample_pair(seed, "satin horizontal fine matte")
        assert pair["design"].shape == pair["embroidery"].shape == (64, 64, 3)
        assert pair["embroidery_prompt"] == pair["design_prompt"] + f" in {TRIGGER} style"
        assert pair["design_prompt"].split()[1:] == pair["words"]
        tokenize(pair["embroidery_prompt"])  # fits the default length
        tokenize(pair["design_prompt"] + " in " + TECHNIQUES[-1] + " style")  # so does the longest technique
    pair = sample_pair(7, "knot vertical fine metallic", size=32)
    assert pair["mask"].shape == (32, 32)

