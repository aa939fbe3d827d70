"""The seed methods' trainers in-process on tiny SD1.5 and SDXL: each recipe trains exactly its
blocks and says so in the file, the file loads in stock LoraLoader and changes the model, mistakes
are refused with the fix, resume continues the step count, Cancel leaves no file."""
import logging
import os
import re

import pytest
import torch

from embroidery_core.lora_file import load_lora, load_optimizer_state, optimizer_path, save_lora

from .test_bad_inputs import _checkpoints
from .test_training_nodes import TRAIN, pair, sd15, stage1  # noqa: F401 (fixtures)

NODE = "Train One-Image LoRA (B-LoRA, DreamBooth)"


def train_lora(pack, model, clip, vae, pair, recipe="b_lora", custom="", prompt="", rank=4, **kw):
    args = {**TRAIN, "iterations": 2, "checkpoint_every": 0, "resume_from": "(none)", **kw}
    with torch.inference_mode():
        return pack["EmbroideryTrainLoRA"].execute(model, clip, vae, pair, recipe, custom, prompt, rank, 0.0,
                                                   **args).result


@pytest.fixture(scope="module")
def sdxl(comfy, tiny_sdxl_ckpt):
    import comfy.sd

    with torch.inference_mode():
        return comfy.sd.load_checkpoint_guess_config(str(tiny_sdxl_ckpt), output_vae=True, output_clip=True)[:3]


@pytest.fixture(params=["sd15", "sdxl"])
def family(request):
    return request.param, request.getfixturevalue(request.param)


def _arch(pack, model):
    import sys

    common = next(m for n, m in sys.modules.items() if n.endswith(".nodes.common"))
    return common.model_family(model, "test")


def test_b_lora_recipe_trains_only_its_two_blocks_and_records_them(pack, family, pair, loras_dir):
    name, (model, clip, vae) = family
    arch = _arch(pack, model)
    lora, patched, losses = train_lora(pack, model, clip, vae, pair)
    content, style = arch.preset("blora_content"), arch.preset("blora_style")
    meta = lora.metadata
    assert sorted(lora.blocks()) == sorted(content + style) and len(losses["loss"]) == 2
    assert meta["embroidery.method"] == "lora" and meta["embroidery.recipe"] == "b_lora"
    assert meta["embroidery.train_prompt"] == "A emb"
    assert meta["embroidery.content_blocks"].split(",") == content
    assert meta["embroidery.style_blocks"].split(",") == style
    assert sorted(meta["embroidery.updated_blocks.reference"].split(",")) == sorted(content + style)
    assert meta["embroidery.rank"] == "4" and meta["embroidery.learning_rate"] == "0.0001"
    assert len(patched.patches) == len(arch.attention_modules(style))  # the model output: W5 only


def test_recipe_defaults_fill_in_zero_inputs(pack, sd15, pair, loras_dir):
    model, clip, vae = sd15
    arch = _arch(pack, model)
    lora, _, _ = train_lora(pack, model, clip, vae, pair, "dreambooth_all_attention", rank=0,
                            **{**TRAIN, "learning_rate": 0.0, "weight_decay": -1.0, "iterations": 1})
    assert lora.rank == 16 and lora.metadata["embroidery.learning_rate"] == "0.0002"
    assert lora.metadata["embroidery.weight_decay"] == "0.01" and lora.metadata["embroidery.alpha"] == "16.0"
    assert sorted(lora.blocks()) == sorted(arch.attention_blocks())
    assert lora.metadata["embroidery.train_prompt"] == "a flower in emb style"


def test_trained_file_loads_in_stock_loraloader_and_changes_the_model(pack, family, pair, loras_dir, caplog):
    import nodes

    from .test_pack_and_loras import _changed_after_patching

    name, (model, clip, vae) = family
    block = _arch(pack, model).preset("blora_style")[0]  # output_blocks.1.1 on SDXL, its analogue on SD1.5
    lora, _, _ = train_lora(pack, model, clip, vae, pair, "custom", custom=block, iterations=3, learning_rate=1e-3)
    save_lora(lora, loras_dir / f"one_image_{name}.safetensors")
    with caplog.at_level(logging.WARNING):
        patched = nodes.LoraLoaderModelOnly().load_lora_model_only(model, f"one_image_{name}.safetensors", 1.0)[0]
    assert "lora key not loaded" not in caplog.text
    assert len(patched.patches) == len(lora.modules) > 0
    changed = _changed_after_patching(patched)
    assert changed and all(k.startswith(block + ".") for k in changed)


def test_mistakes_are_refused_with_the_fix(pack, sd15, pair, loras_dir):
    model, clip, vae = sd15
    with pytest.raises(ValueError, match=rf"^{re.escape(NODE)}: recipe custom trains the blocks in custom_blocks, which is empty"):
        train_lora(pack, model, clip, vae, pair, "custom")
    with pytest.raises(ValueError, match=rf"^{re.escape(NODE)}: recipe 'plain' is not one of"):
        train_lora(pack, model, clip, vae, pair, "plain")
    with pytest.raises(ValueError, match=r"cannot fill in the prompt 'A \{style\}'"):
        train_lora(pack, model, clip, vae, pair, prompt="A {style}")
    with pytest.raises(ValueError, match=rf"^{re.escape(NODE)}: memory_preset 'tiny'"):
        train_lora(pack, model, clip, vae, pair, memory_preset="tiny")
    emolora = stage1(pack, model, clip, vae, pair, iterations=1)[0]
    save_lora(emolora, loras_dir / "emolora.safetensors")
    with pytest.raises(ValueError, match="written by the emolora trainer, not lora; resume it in the trainer"):
        train_lora(pack, model, clip, vae, pair, resume_from="emolora.safetensors")


def test_resume_continues_from_the_checkpoint_metadata(pack, sd15, pair, loras_dir):
    model, clip, vae = sd15
    train_lora(pack, model, clip, vae, pair, checkpoint_every=1)
    (checkpoint,) = (loras_dir / "embroidery_checkpoints").glob("emb_lora1_*.safetensors")
    assert load_lora(checkpoint).metadata["embroidery.step"] == "2"
    state, tag = load_optimizer_state(checkpoint)  # AdamW's state beside it, tied to its step and run
    assert tag["embroidery.step"] == "2" and any(k.endswith(".exp_avg") for k in state)
    renamed = loras_dir / "my_blora.safetensors"
    os.replace(checkpoint, renamed)
    os.replace(optimizer_path(checkpoint), optimizer_path(renamed))
    lora, _, losses = train_lora(pack, model, clip, vae, pair, iterations=4, resume_from=renamed.name)
    assert lora.metadata["embroidery.step"] == "4" and len(losses["loss"]) == 2


@pytest.mark.parametrize("trainer", ["lora", "pair"])
def test_cancel_stops_within_one_step_and_leaves_no_file(pack, sd15, pair, loras_dir, trainer):
    """Cancel pressed before the run: at the latest the first step's progress update raises, before
    that step's checkpoint would be written; no more than the first step's UNet passes ran."""
    import comfy.model_management as mm

    model, clip, vae = sd15
    passes = []
    hook = model.model.diffusion_model.register_forward_pre_hook(lambda module, args: passes.append(1))
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            if trainer == "lora":
                train_lora(pack, model, clip, vae, pair, iterations=5, checkpoint_every=1)
            else:  # step 0: the content step only, over 2 accumulated draws
                train_pair(pack, model, clip, vae, pair, iterations=5, checkpoint_every=1)
    finally:
        mm.interrupt_current_processing(False)
        hook.remove()
    # at most the first step's passes (ComfyUI 0.8 already stops in the VAE/CLIP encoding before it)
    assert len(passes) <= (1 if trainer == "lora" else 2) and _checkpoints(loras_dir) == []


def test_stage2_continues_the_stage1_optimizer_state(pack, sd15, pair, loras_dir):
    """The stage-1 LoRA a Stage 1 node outputs carries its AdamW state, and Stage 2 uses it: the
    same stage 2 from the same weights without that state trains to other weights."""
    import dataclasses

    model, clip, vae = sd15
    lora = stage1(pack, model, clip, vae, pair, iterations=2)[0]
    assert lora.optimizer_state and all(torch.isfinite(v).all() for v in lora.optimizer_state.values())
    results = []
    for connected in (lora, dataclasses.replace(lora, optimizer_state=None)):
        with torch.inference_mode():
            trained = pack["EmbroideryTrainStage2"].execute(
                model, clip, vae, pair, connected, "apple", 0.1, 1e-4, 1.0, 1, 5.0,
                **{**TRAIN, "learning_rate": 1e-3, "iterations": 1, "checkpoint_every": 0,
                   "resume_from": "(none)"}).result[0]
        results.append(trained)
    with_state, fresh = results
    assert any(not torch.equal(with_state.modules[n].up, fresh.modules[n].up) for n in with_state.modules)


PAIR_NODE = "Train Pair Customization (Content + Style LoRAs)"


def train_pair(pack, model, clip, vae, pair, rank=4, resolution=0, flip=True, style_start=1, accumulate=2, **kw):
    args = {**TRAIN, "iterations": 2, "checkpoint_every": 0, "resume_from": "(none)", **kw}
    with torch.inference_mode():
        return pack["EmbroideryTrainPairCustomization"].execute(model, clip, vae, pair, rank, resolution, flip,
                                                                style_start, accumulate, **args).result


def test_pair_customization_trains_two_orthogonal_loras_that_load_in_stock_loraloader(pack, family, pair, loras_dir,
                                                                                       caplog):
    import nodes

    from embroidery_core.adapters import orthonormal_downs

    from .test_pack_and_loras import _changed_after_patching

    name, (model, clip, vae) = family
    arch = _arch(pack, model)
    style, content, losses = train_pair(pack, model, clip, vae, pair)
    assert losses["style"][0] is None and losses["style"][1] is not None and len(losses["content"]) == 2
    assert style.metadata["embroidery.method"] == "pair_customization"
    assert set(style.modules) == set(content.modules) == set(arch.attention_modules())
    for path, module in style.modules.items():
        content_down, style_down = orthonormal_downs(module.down.shape[1], 4)
        assert torch.allclose(module.down, style_down, atol=1e-6) and torch.allclose(
            content.modules[path].down, content_down, atol=1e-6), path
    for lora, label in ((style, "style"), (content, "content")):
        save_lora(lora, loras_dir / f"pair_{label}_{name}.safetensors")
        with caplog.at_level(logging.WARNING):
            patched = nodes.LoraLoaderModelOnly().load_lora_model_only(model, f"pair_{label}_{name}.safetensors", 1.0)[0]
        assert "lora key not loaded" not in caplog.text
        assert len(patched.patches) == len(lora.modules)
        assert _changed_after_patching(patched)  # trained ups: the model's weights move
    guided = pack["EmbroideryStyleGuidance"].execute(model, "(unused)", "all_attention", "", 4.0, 1.0, 0.0, 1.0,
                                                     lora=style).result[0]
    assert guided is not model and guided.model_options.get("sampler_post_cfg_function")


def _relative_distance(a, b) -> float:
    """|ups of a - ups of b| / |ups of b| over all modules. ComfyUI's CPU model is not bitwise
    reproducible from call to call (two unbroken runs: about 1e-4, the largest element 5e-6),
    and AdamW's first steps magnify that noise in gradients near zero, so elementwise atol
    fails on equal runs; a resume without its content LoRA or its AdamW state lands 0.02-0.7
    away (measured on 0.3.64)."""
    num = sum(((a.modules[n].up - b.modules[n].up) ** 2).sum() for n in b.modules)
    return float((num / sum((b.modules[n].up ** 2).sum() for n in b.modules)) ** 0.5)


def test_pair_customization_resumes_with_its_content_lora(pack, sd15, pair, loras_dir):
    """Stopped at step 2 and resumed to 3, it ends where an unbroken 3-step run ends: the content
    LoRA and AdamW's state come from the file beside the checkpoint."""
    model, clip, vae = sd15
    unbroken_style, unbroken_content, _ = train_pair(pack, model, clip, vae, pair, iterations=3)
    train_pair(pack, model, clip, vae, pair, checkpoint_every=1)
    (checkpoint,) = (loras_dir / "embroidery_checkpoints").glob("emb_pair1_*.safetensors")
    assert os.path.isfile(optimizer_path(checkpoint))
    style, content, losses = train_pair(pack, model, clip, vae, pair, iterations=3,
                                        resume_from=f"embroidery_checkpoints/{checkpoint.name}")
    assert style.metadata["embroidery.step"] == "3" and len(losses["content"]) == 1
    for resumed, unbroken in ((style, unbroken_style), (content, unbroken_content)):
        assert _relative_distance(resumed, unbroken) < 1e-3
    os.remove(optimizer_path(checkpoint))
    with pytest.raises(ValueError, match=rf"^{re.escape(PAIR_NODE)}: .* has no training state beside it"):
        train_pair(pack, model, clip, vae, pair, iterations=4, resume_from=f"embroidery_checkpoints/{checkpoint.name}")
    with pytest.raises(ValueError, match="rank <= half the input width"):
        train_pair(pack, model, clip, vae, pair, rank=256)


def test_a_user_s_mistakes_with_files_are_refused_and_runs_keep_their_own_checkpoints(pack, sd15, pair, loras_dir):
    """Resume from a LoRA with NaN weights or of another family is refused before any work, with
    the node's name; two styles with the same trigger word keep their own checkpoint files."""
    from .test_bad_inputs import _pair, write_raw
    from .test_pack_and_loras import make_lora
    from .tiny_models import tiny_patcher

    model, clip, vae = sd15
    lora = train_lora(pack, model, clip, vae, pair, iterations=1)[0]

    def poison(sd):
        next(v for k, v in sd.items() if k.endswith("lora_down.weight"))[0, 0] = float("nan")
    write_raw(lora, loras_dir / "nan.safetensors", poison)
    with pytest.raises(ValueError, match=rf"^{re.escape(NODE)}: nan.safetensors: this LoRA has NaN or inf weights"):
        train_lora(pack, model, clip, vae, pair, iterations=4, resume_from="nan.safetensors")
    _, xl = make_lora(tiny_patcher("sdxl"))
    xl.metadata.update({"embroidery.method": "lora", "embroidery.stage": "1", "embroidery.step": "1"})
    write_raw(xl, loras_dir / "xl.safetensors")
    with pytest.raises(ValueError, match=rf"^{re.escape(NODE)}: xl.safetensors is a LoRA for SDXL"):
        train_lora(pack, model, clip, vae, pair, iterations=4, resume_from="xl.safetensors")
    train_lora(pack, model, clip, vae, pair, checkpoint_every=1)
    train_lora(pack, model, clip, vae, _pair(pack, "knot vertical fine metallic"), checkpoint_every=1)
    names = sorted(n for n in os.listdir(loras_dir / "embroidery_checkpoints") if n.endswith(".safetensors"))
    assert len(names) == 2 and all(n.startswith("emb_lora1_") for n in names), names  # one per style
