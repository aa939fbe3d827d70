"""Region masks for localized styles: they must tile the image exactly, with the base model
taking whatever the regions leave uncovered."""
import pytest
import torch

from embroidery_core.masks import as_mask_batch, partition_masks


def halves(h=4, w=6):
    left = torch.zeros(1, h, w)
    left[..., : w // 2] = 1.0
    return left, 1.0 - left


def test_one_region_gets_its_mask_and_the_base_the_rest():
    mask = torch.rand(1, 5, 7, generator=torch.Generator().manual_seed(0))
    (region,), base = partition_masks([mask])
    assert torch.equal(region, mask)
    torch.testing.assert_close(base, 1.0 - mask)


def test_overlapping_regions_are_shared_and_everything_sums_to_one():
    a = torch.full((1, 3, 3), 0.8)
    b = torch.full((1, 3, 3), 0.4)
    b[..., 0] = 0.1  # first column: 0.9 in total, so the base keeps 0.1 there
    (ra, rb), base = partition_masks([a, b])
    torch.testing.assert_close(ra[..., 1:], torch.full((1, 3, 2), 0.8 / 1.2))
    torch.testing.assert_close(rb[..., 1:], torch.full((1, 3, 2), 0.4 / 1.2))
    torch.testing.assert_close(ra[..., 0], a[..., 0])
    torch.testing.assert_close(base[..., 0], torch.full((1, 3), 0.1))
    assert not base[..., 1:].any()
    torch.testing.assert_close(ra + rb + base, torch.ones(1, 3, 3))


def test_regions_that_cover_the_image_need_no_base():
    left, right = halves()
    regions, base = partition_masks([left, right])
    assert base is None
    assert torch.equal(regions[0], left) and torch.equal(regions[1], right)


def test_2d_masks_and_batch_one_broadcast():
    left, _ = halves()
    batch = torch.zeros(3, 4, 6)
    batch[1] = 1.0
    (r1, r2), base = partition_masks([left[0], batch])
    assert r1.shape == r2.shape == base.shape == (3, 4, 6)
    torch.testing.assert_close(r1 + r2 + base, torch.ones(3, 4, 6))


def test_values_are_clamped_to_0_1():
    mask = torch.tensor([[[2.0, -1.0]]])
    (region,), base = partition_masks([mask])
    assert region.tolist() == [[[1.0, 0.0]]] and base.tolist() == [[[0.0, 1.0]]]


def test_errors_name_the_mask_and_the_fix():
    left, _ = halves()
    with pytest.raises(ValueError, match=r"different sizes \(mask_1: 6x4, mask_2: 4x4\)"):
        partition_masks([left, torch.ones(1, 4, 4)], ["mask_1", "mask_2"])
    with pytest.raises(ValueError, match="mask_2 is empty"):
        partition_masks([left, torch.zeros(1, 4, 6)], ["mask_1", "mask_2"])
    with pytest.raises(ValueError, match="different batch sizes"):
        partition_masks([torch.ones(2, 4, 6), torch.ones(3, 4, 6)])
    with pytest.raises(ValueError, match="at least one"):
        partition_masks([])
    with pytest.raises(ValueError, match="NaN"):
        as_mask_batch(torch.full((1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match=r"\[B,H,W\]"):
        as_mask_batch(torch.ones(1, 1, 2, 2))
