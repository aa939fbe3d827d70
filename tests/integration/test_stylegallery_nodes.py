"""StyleGallery's nodes in-process on tiny SD1.5 and SDXL checkpoints: regions come out as a mask
batch covering the image once, the stylised latent has the content's shape, with and without a
tiny DINOv2 CLIP vision model and with user masks; mistakes are refused with the fix; the shared
model is untouched."""
import json

import pytest
import torch

from .test_training_nodes import sd15, snapshot  # noqa: F401 (fixture)
from .test_method_nodes import sdxl  # noqa: F401 (fixture)

SIZE = 64


@pytest.fixture(params=["sd15", "sdxl"])
def checkpoint(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def dinov2(comfy, tmp_path_factory):
    """A tiny random DINOv2 built through ComfyUI's own CLIP vision class from a config like the
    shipped dino2 ones (2 layers, width 32; 518 px and patch 14, the 37 x 37 grid ComfyUI's DINOv2
    hard-codes)."""
    import comfy.clip_vision

    config = {"attention_probs_dropout_prob": 0.0, "drop_path_rate": 0.0, "hidden_act": "gelu",
              "hidden_dropout_prob": 0.0, "hidden_size": 32, "image_size": 518, "initializer_range": 0.02,
              "layer_norm_eps": 1e-06, "layerscale_value": 1.0, "mlp_ratio": 4, "model_type": "dinov2",
              "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": 2, "patch_size": 14,
              "qkv_bias": True, "use_swiglu_ffn": False, "image_mean": [0.485, 0.456, 0.406],
              "image_std": [0.229, 0.224, 0.225]}
    path = tmp_path_factory.mktemp("dino") / "tiny_dinov2.json"
    path.write_text(json.dumps(config))
    model = comfy.clip_vision.ClipVisionModel(str(path))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _image(seed, size=SIZE):
    """Three flat bands, colours by seed."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.rand(3, 3, generator=g)
    image = torch.zeros(1, size, size, 3)
    for i in range(3):
        image[:, :, i * size // 3:(i + 1) * size // 3] = colours[i]
    return image


def _empty(family):
    from . import tiny_models

    return tiny_models.tiny_conditioning(family, text_seed=0)


def test_regions_cover_the_image_once(pack, checkpoint):
    model, clip, vae = checkpoint
    before = snapshot(model)
    with torch.inference_mode():
        masks, preview, count = pack["EmbroideryStyleRegions"].execute(model, vae, _image(0), clip=clip).result
    assert masks.shape == (count, SIZE, SIZE) and 1 <= count <= 10
    assert torch.equal(masks.sum(dim=0), torch.ones(SIZE, SIZE))  # every pixel in exactly one region
    assert preview.shape == (1, SIZE, SIZE, 3)
    after = snapshot(model)
    assert after[1] == before[1] and after[2] == before[2] == []
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])


@pytest.mark.parametrize("with_dino", [False, True])
def test_stylegallery_returns_the_contents_latent(pack, checkpoint, dinov2, with_dino):
    model, clip, vae = checkpoint
    styles = torch.cat([_image(1), _image(2)])
    before = snapshot(model)
    with torch.inference_mode():
        latent, matches = pack["EmbroideryStyleGallery"].execute(model, vae, _image(0), styles, "fast", clip=clip,
                                                                  clip_vision=dinov2 if with_dino else None).result
    assert latent["samples"].shape == (1, 4, SIZE // 8, SIZE // 8) and torch.isfinite(latent["samples"]).all()
    assert matches.shape[0] == 1 and matches.shape[-1] == 3 and matches.shape[2] > matches.shape[1] * 2
    after = snapshot(model)
    assert after[1] == before[1] and after[2] == before[2] == []
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])


def test_user_masks_and_mistakes(pack, sd15):
    model, clip, vae = sd15
    content = _image(0)
    left = torch.zeros(1, SIZE, SIZE)
    left[:, :, :32] = 1
    with torch.inference_mode():
        latent, _ = pack["EmbroideryStyleGallery"].execute(model, vae, content, _image(1), "fast", clip=clip,
                                                            content_masks=left).result
    assert latent["samples"].shape == (1, 4, SIZE // 8, SIZE // 8)
    node = pack["EmbroideryStyleGallery"]
    with pytest.raises(ValueError, match="^Embroidery StyleGallery: connect a conditioning"), torch.inference_mode():
        node.execute(model, vae, content, _image(1), "fast")
    with pytest.raises(ValueError, match="content mask 2 is empty"), torch.inference_mode():
        node.execute(model, vae, content, _image(1), "fast", clip=clip,
                     content_masks=torch.cat([left, torch.zeros(1, SIZE, SIZE)]))
    with pytest.raises(ValueError, match="give at least 64 x 64"), torch.inference_mode():
        node.execute(model, vae, content[:, :32, :32], _image(1), "fast", clip=clip)
    with pytest.raises(ValueError, match="preset 'slow' is not one of"), torch.inference_mode():
        node.execute(model, vae, content, _image(1), "slow", clip=clip)
