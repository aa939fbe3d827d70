"""DiffStyler's inversion node in-process on tiny SD1.5: shapes and levels, the empty prompt from
the clip, mistakes refused with the fix, the shared model untouched."""
import pytest
import torch

from .test_training_nodes import sd15, snapshot  # noqa: F401 (fixture)

NODE = "Embroidery DDIM Inversion"


def _latent(vae):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 64, 64, 3, generator=g)
    with torch.inference_mode():
        return {"samples": vae.encode(image)}


def test_inversion_climbs_the_schedule_and_samples_back(pack, sd15):
    model, clip, vae = sd15
    latent = _latent(vae)
    before = snapshot(model)
    with torch.inference_mode():
        inversion, noisy, back = pack["EmbroideryInvert"].execute(model, latent, 8, clip=clip).result
    assert inversion.latents.shape == (9, *latent["samples"].shape) and inversion.sigmas[-1] == 0
    assert torch.all(inversion.sigmas[:-1] > inversion.sigmas[1:])
    source = model.model.process_latent_in(latent["samples"].float())
    assert torch.allclose(inversion.latents[-1], source)  # the last level is the source itself
    assert noisy["samples"].shape == back["samples"].shape == latent["samples"].shape
    assert torch.isfinite(back["samples"]).all()
    assert noisy["samples"].std() > 3 * latent["samples"].std()  # it climbed to the noisy end
    after = snapshot(model)
    assert after[1] == before[1] and after[2] == before[2] == []
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])


def test_conditioning_or_clip_is_needed(pack, sd15):
    model, clip, vae = sd15
    with pytest.raises(ValueError, match=rf"^{NODE}: connect a conditioning"), torch.inference_mode():
        pack["EmbroideryInvert"].execute(model, _latent(vae), 4)
    with torch.inference_mode():
        tokens = clip.tokenize("")
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        inversion = pack["EmbroideryInvert"].execute(model, _latent(vae), 4, conditioning=[[cond, {"pooled_output": pooled}]]).result[0]
    assert inversion.latents.shape[0] == 5
