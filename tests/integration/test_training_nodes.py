"""The trainer nodes in-process, inside torch.inference_mode() as ComfyUI runs nodes: resume
continues the step count from the file's metadata, mistakes are refused with the fix, and the
shared model is exactly as before (weights, parameter objects, module forwards)."""
import os

import pytest
import torch

from embroidery_core.lora_file import load_lora

from .test_server_training import _write_reference


@pytest.fixture(scope="module")
def sd15(comfy, tiny_ckpt_dir):
    import comfy.sd

    with torch.inference_mode():
        out = comfy.sd.load_checkpoint_guess_config(str(tiny_ckpt_dir / "checkpoints" / "tiny_sd15.safetensors"),
                                                    output_vae=True, output_clip=True)
    return out[:3]


@pytest.fixture(scope="module")
def pair(pack, tmp_path_factory):
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("ref") / "ref.png"
    _write_reference(path)
    image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255)[None]
    with torch.inference_mode():
        return pack["EmbroideryAnalogyPair"].execute(image, "flower", "emb", 64, 6).result[0]


TRAIN = dict(learning_rate=1e-4, weight_decay=1e-2, seed=1, precision="auto", memory_preset="balanced",
             preview_every=1)


def stage1(pack, model, clip, vae, pair, **kw):
    args = {**TRAIN, "iterations": 2, "checkpoint_every": 0, "resume_from": "(none)", **kw}
    with torch.inference_mode():
        return pack["EmbroideryTrainStage1"].execute(model, clip, vae, pair, "emolora_style", 4, 4.0, **args).result


def snapshot(model):
    dm = model.model.diffusion_model
    return ({k: v.clone() for k, v in dm.state_dict().items()}, {k: id(p) for k, p in dm.named_parameters()},
            [n for n, m in dm.named_modules() if "forward" in m.__dict__])


def test_training_leaves_the_shared_model_exactly_as_it_was(pack, sd15, pair, loras_dir):
    model, clip, vae = sd15
    weights, ids, patched = snapshot(model)
    lora, trained, losses = stage1(pack, model, clip, vae, pair)
    after_weights, after_ids, after_patched = snapshot(model)
    assert after_ids == ids and after_patched == patched == []
    assert all(torch.equal(weights[k], after_weights[k]) for k in weights)
    assert trained is not model and len(losses["loss"]) == 2
    assert all(p.is_inference() for p in model.model.diffusion_model.parameters())  # untouched originals


def test_resume_continues_from_the_checkpoint_metadata(pack, sd15, pair, loras_dir):
    model, clip, vae = sd15
    stage1(pack, model, clip, vae, pair, checkpoint_every=1)
    (checkpoint,) = (loras_dir / "embroidery_checkpoints").glob("emb_stage1_*.safetensors")  # <trigger>_stage1_<run>
    assert load_lora(checkpoint).metadata["embroidery.step"] == "2"
    renamed = loras_dir / "any_name_at_all.safetensors"  # the name carries no step count
    os.replace(checkpoint, renamed)
    lora, _, losses = stage1(pack, model, clip, vae, pair, iterations=3, resume_from=renamed.name)
    assert lora.metadata["embroidery.step"] == "3" and len(losses["loss"]) == 1


def test_mistakes_are_refused_with_the_fix(pack, sd15, pair, loras_dir):
    model, clip, vae = sd15
    lora, _, _ = stage1(pack, model, clip, vae, pair, iterations=1)
    with pytest.raises(ValueError, match="Train Embroidery LoRA \\(Stage 1\\): precision 'fp8'"):
        stage1(pack, model, clip, vae, pair, precision="fp8")
    with pytest.raises(ValueError, match="connect the stage-1 LoRA"):
        fake = type(lora)(lora.arch, lora.modules, {**lora.metadata, "embroidery.stage": "2"})
        with torch.inference_mode():
            pack["EmbroideryTrainStage2"].execute(model, clip, vae, pair, fake, "apple", 0.1, 1e-4, 1.0, 1, 5.0,
                                                  iterations=1, checkpoint_every=0, resume_from="(none)", **TRAIN)
    with pytest.raises(ValueError, match="has no attention block output_blocks.0.1"):
        with torch.inference_mode():
            pack["EmbroideryTrainStage1"].execute(model, clip, vae, pair, "output_blocks.0.1", 4, 4.0, iterations=1,
                                                  checkpoint_every=0, resume_from="(none)", **TRAIN)


def test_progress_shows_a_preview_even_without_a_server_preview_method(pack, sd15):
    import sys
    from types import SimpleNamespace

    bridge = next(m for n, m in sys.modules.items() if n.endswith(".nodes.comfy_training"))
    model = sd15[0]
    seen = []
    trainer = SimpleNamespace(last_x0=torch.randn(1, 4, 8, 8))
    progress = bridge.Progress(None, 0, 2, 1, model, trainer)
    progress.bar.hook = lambda value, total, preview, node_id=None: seen.append((value, total, preview))
    progress(1, 2, {"design": torch.tensor(0.5)})
    assert seen and seen[0][:2] == (1, 2)
    kind, image, _ = seen[0][2]
    assert kind == "JPEG" and image.size == (8, 8)  # Latent2RGB: one pixel per latent


def _with_sampling(model, prediction, base="ModelSamplingDiscrete", sigma_data=None):
    """``model`` with its model_sampling replaced the way ComfyUI's ModelSampling* nodes do it."""
    import comfy.model_sampling as ms

    sampling_class = type("Sampling", (getattr(ms, base), getattr(ms, prediction)), {})
    sampling = sampling_class(model.model.model_config)
    if sigma_data is not None:
        sampling.set_parameters(0.002, 120.0, sigma_data)
    patched = model.clone()
    patched.add_object_patch("model_sampling", sampling)
    return patched


@pytest.mark.parametrize("prediction, base, sigma_data, message", [
    ("X0", "ModelSamplingDiscrete", None, "samples with X0 prediction"),
    ("IMG_TO_IMG", "ModelSamplingDiscrete", None, "samples with X0 prediction"),
    ("EDM", "ModelSamplingContinuousEDM", 0.5, "samples with EDM prediction"),
    ("V_PREDICTION", "ModelSamplingContinuousEDM", 0.5, "sigma_data 0.5"),
])
def test_parameterisations_the_trainers_do_not_implement_are_refused(pack, sd15, pair, prediction, base, sigma_data,
                                                                      message):
    """EDM subclasses V_PREDICTION and X0 subclasses EPS in ComfyUI: without the check they
    would train against the v or eps target, silently wrong."""
    model, clip, vae = sd15
    patched = _with_sampling(model, prediction, base, sigma_data)
    with pytest.raises(ValueError, match=f"Train Embroidery LoRA \\(Stage 1\\): the model.*{message}.*ModelSampling"):
        stage1(pack, patched, clip, vae, pair, iterations=1)
    with pytest.raises(ValueError, match=f"Find Style Blocks: .*{message}"):
        with torch.inference_mode():
            pack["EmbroideryFindStyleBlocks"].execute(patched, clip, vae, pair, "paper preset", 2, 2, 0)


def test_a_v_prediction_model_trains_against_the_v_target(pack, sd15, pair, loras_dir):
    import sys

    bridge = next(m for n, m in sys.modules.items() if n.endswith(".nodes.comfy_training"))
    model, clip, vae = sd15
    v_model = _with_sampling(model, "V_PREDICTION")
    assert bridge.prediction_type(v_model) == "v" and bridge.prediction_type(model) == "eps"
    _, _, losses = stage1(pack, v_model, clip, vae, pair, iterations=1)
    assert len(losses["loss"]) == 1
