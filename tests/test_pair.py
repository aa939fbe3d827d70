import pytest
import torch

from embroidery_core.pair import LATENT_MULTIPLE, build_pair, check_words


def test_prompts_follow_the_paper():
    pair = build_pair(torch.rand(1, 100, 80, 3), subject="red  rose", trigger="emb", resolution=128)
    assert pair.design_prompt == "a red rose"
    assert pair.embroidery_prompt == "a red rose in emb style"


def test_both_images_share_a_latent_friendly_size():
    pair = build_pair(torch.rand(2, 300, 200, 4), subject="cat", trigger="sks", resolution=256)
    assert pair.embroidery.shape == pair.design.shape
    b, h, w, c = pair.embroidery.shape
    assert (b, c) == (1, 3) and max(h, w) == 256 and h % LATENT_MULTIPLE == 0 and w % LATENT_MULTIPLE == 0
    assert pair.design_generated


def test_user_design_is_resized_onto_the_reference_grid():
    design = torch.zeros(1, 50, 50, 3)
    design[..., 0] = 1
    pair = build_pair(torch.rand(1, 128, 64, 3), design=design, subject="cat", trigger="emb", resolution=128)
    assert pair.design.shape == pair.embroidery.shape and not pair.design_generated
    assert torch.allclose(pair.design[..., 0], torch.ones(1, 128, 64))


def test_mask_is_resized_and_clamped():
    mask = torch.ones(1, 10, 10) * 2
    pair = build_pair(torch.rand(1, 64, 64, 3), mask=mask, subject="cat", trigger="emb", resolution=64)
    assert pair.mask.shape == (1, 64, 64) and pair.mask.max() == 1


@pytest.mark.parametrize("subject,trigger,message", [
    ("", "emb", "subject is empty"),
    ("cat", "two words", "one word"),
    ("cat", "", "one word"),
])
def test_bad_words_are_refused_with_the_fix(subject, trigger, message):
    with pytest.raises(ValueError, match=message):
        check_words(subject, trigger)


def test_bad_resolution_and_image_are_refused():
    with pytest.raises(ValueError, match="multiple of 64"):
        build_pair(torch.rand(1, 64, 64, 3), subject="cat", trigger="emb", resolution=100)
    with pytest.raises(ValueError, match="IMAGE"):
        build_pair(torch.rand(64, 64, 3), subject="cat", trigger="emb", resolution=64)
