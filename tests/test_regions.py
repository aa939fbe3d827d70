"""StyleGallery's region finder on hand-made tensors: k-means + silhouette recover k on well
separated clusters, merging happens exactly at the threshold, islands are absorbed, the time
weights are the formula."""
import math

import pytest
import torch

from embroidery_core import regions


def _blobs(k, per=40, dim=5, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g) * 4
    x = torch.cat([c + spread * torch.randn(per, dim, generator=g) for c in centres])
    return x, torch.arange(k).repeat_interleave(per)


def _same_partition(a, b):
    pairs = {(int(x), int(y)) for x, y in zip(a, b)}
    return len(pairs) == len(a.unique()) == len(b.unique())


@pytest.mark.parametrize("k", [2, 3, 5, 7])
def test_kmeans_and_silhouette_recover_k_on_separated_clusters(k):
    x, truth = _blobs(k, seed=k)
    chosen, labels, scores = regions.best_k(x, 2, 10, seed=1)
    assert chosen == k, scores
    assert _same_partition(labels, truth)
    assert scores[k] > 0.9


def test_silhouette_matches_its_definition_on_four_points():
    x = torch.tensor([[0.0], [1.0], [5.0], [7.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # a: distance to the other member; b: mean distance to the other cluster
    a = [1, 1, 2, 2]
    b = [(5 + 7) / 2, (4 + 6) / 2, (5 + 4) / 2, (7 + 6) / 2]
    expected = sum((bb - aa) / max(aa, bb) for aa, bb in zip(a, b)) / 4
    assert regions.silhouette(x, labels) == pytest.approx(expected)
    assert regions.silhouette(x, torch.zeros(4, dtype=torch.long)) == -1.0


def test_kmeans_is_seeded():
    x, _ = _blobs(4, seed=3)
    assert torch.equal(regions.kmeans(x, 4, seed=7), regions.kmeans(x, 4, seed=7))


def test_merge_close_merges_exactly_below_the_threshold():
    labels = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    values = torch.zeros(2, 4, 1)
    values[:, 2:] = 0.85
    assert regions.merge_close(labels, values, 0.85).unique().tolist() == [0, 1]  # 0.85 is not < 0.85
    assert regions.merge_close(labels, values, 0.8501).unique().tolist() == [0]
    three = torch.tensor([[0, 1, 2]])
    vals = torch.tensor([[[0.0], [0.5], [3.0]]])
    assert regions.merge_close(three, vals, 0.85).tolist() == [[0, 0, 1]]
    chain = torch.tensor([[0, 1, 2]])  # 0-1 and 1-2 are close, 0-2 is not: single linkage joins all
    assert regions.merge_close(chain, torch.tensor([[[0.0], [0.6], [1.2]]]), 0.85).tolist() == [[0, 0, 0]]


def test_islands_under_the_size_are_absorbed_by_their_surroundings():
    labels = torch.zeros(12, 12, dtype=torch.long)
    labels[:, 6:] = 1
    labels[2:4, 2:4] = 2  # a 4-pixel island inside region 0
    labels[8, 9] = 0  # a 1-pixel speck of region 0 inside region 1
    out = regions.absorb_islands(labels, 20)
    assert out[2:4, 2:4].eq(out[0, 0]).all() and out[8, 9] == out[0, 11]
    assert len(out.unique()) == 2
    kept = regions.absorb_islands(labels, 4)  # the 4-pixel island is not under 4
    assert len(kept.unique()) == 3


def test_components_are_four_connected():
    mask = torch.tensor([[1, 0, 1], [1, 0, 0], [0, 1, 1]], dtype=torch.bool)
    comp = regions.components(mask)
    assert comp.max() == 3 and comp[0, 0] == comp[1, 0] and comp[2, 1] == comp[2, 2] and comp[0, 2] != comp[0, 0]


def test_depth_splits_a_deep_region_and_re_merges_a_shallow_cut():
    labels = torch.zeros(8, 8, dtype=torch.long)
    depth = torch.zeros(8, 8)
    depth[:, 4:] = 1.0
    split = regions.split_by_depth(labels, depth, 0.75)
    assert len(split.unique()) == 2 and split[:, :4].eq(split[0, 0]).all()
    values = torch.zeros(8, 8, 1)
    assert len(regions.merge_by_depth(split, values, depth, 0.35, 0.3).unique()) == 2  # depths differ by 1
    near = depth * 0.2
    assert len(regions.merge_by_depth(split, values, near, 0.35, 0.3).unique()) == 1


def test_time_weights_are_the_logistic_formula_over_the_step_index_normalised():
    w = regions.time_weights(15)
    raw = [1 / (1 + math.exp(5 * (x / 15 - 0.7))) for x in range(15)]
    assert w.tolist() == pytest.approx([r / sum(raw) for r in raw])
    assert w[0] == pytest.approx(0.0936, abs=1e-4) and w[-1] == pytest.approx(0.0229, abs=1e-4)  # official values
    assert all(a > b for a, b in zip(w[:-1], w[1:]))


def test_find_regions_recovers_three_feature_regions():
    g = torch.Generator().manual_seed(0)
    truth = torch.zeros(16, 16, dtype=torch.long)
    truth[:, 6:11] = 1
    truth[:, 11:] = 2
    means = torch.randn(3, 8, generator=g) * 3
    features = (means[truth] + 0.1 * torch.randn(16, 16, 8, generator=g)).permute(2, 0, 1)
    latent = torch.eye(3)[truth].permute(2, 0, 1) * 2  # distinct latents: nothing merges
    labels, scores = regions.find_regions(features, latent, config=regions.RegionConfig(components=8))
    assert _same_partition(labels.flatten(), truth.flatten()), scores


def test_feature_block_is_the_end_of_up_blocks_2_on_sd15():
    from embroidery_core.blocks import SD15, SDXL

    assert regions.feature_block(SD15) == "output_blocks.8.2"  # up_blocks.2's upsampler
    assert regions.feature_block(SDXL) == "output_blocks.5.2"


def test_feature_block_of_another_level_ends_that_level():
    from embroidery_core.blocks import SD15, SDXL

    assert regions.feature_block(SD15, 2) == regions.feature_block(SD15)
    assert regions.feature_block(SD15, 1) == "output_blocks.5.2"  # up_blocks.1's upsampler
    assert regions.feature_block(SD15, 3) == "output_blocks.11.1"  # the last level: its last attention block
    assert regions.feature_block(SDXL, 2) == "output_blocks.8.0"  # SDXL's last level has no attention
    with pytest.raises(ValueError, match="levels 0..3"):
        regions.feature_block(SD15, 4)
