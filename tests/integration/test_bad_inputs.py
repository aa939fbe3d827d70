"""Issue 10: what an artist can get wrong, in real ComfyUI, in-process. Each case used to succeed
silently, lose work or raise a raw error; now it is refused before any work with a message that
starts with the node's name and says the fix, and nothing is patched or overwritten."""
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from embroidery_core.files import PARTIAL_MARK
from embroidery_core.lora_file import kohya_metadata, load_lora, to_kohya_state_dict

from .test_pack_and_loras import make_lora
from .test_training_nodes import TRAIN, pair, sd15, stage1  # noqa: F401 (fixtures)

LOADER = "Load Style Blocks of a LoRA"


def node_error(node):
    """pytest.raises for a ValueError whose message starts with the node's display name."""
    return pytest.raises(ValueError, match=rf"^{re.escape(node)}: ")


def write_raw(lora, path, edit=None, metadata=True):
    """``lora`` as a kohya file, optionally edited first (the damage a user's file may have)."""
    sd = to_kohya_state_dict(lora)
    if edit is not None:
        edit(sd)
    save_file(sd, str(path), metadata=kohya_metadata(lora) if metadata else None)
    return path.name


@pytest.fixture(scope="module")
def models(comfy):
    from .tiny_models import tiny_patcher

    return {"sd15": tiny_patcher("sd15"), "sdxl": tiny_patcher("sdxl")}


def readers(pack, model, name):
    """Every node that reads a LoRA file from a model's point of view, reading ``name``."""
    from .tiny_models import tiny_conditioning

    cond = tiny_conditioning("sd15")
    mask = torch.ones(1, 8, 8)
    return {
        LOADER: lambda: pack["EmbroideryStyleBlocksLoader"].execute(model, name, "all_attention", "", 1.0),
        "Embroidery Style Guidance": lambda: pack["EmbroideryStyleGuidance"].execute(
            model, name, "all_attention", "", 4.0, 1.0, 0.0, 1.0),
        "Embroidery Masked Style": lambda: pack["EmbroideryMaskedStyle"].execute(  # strength 0 is checked too
            model, cond, cond, "all_attention", "", lora_1=name, strength_1=0.0, mask_1=mask),
        "B-LoRA Mix (Content + Style)": lambda: pack["EmbroideryBLoRAMix"].execute(
            model, name, "blora_content", 1.0, name, "blora_style", 1.0, False),
    }


def test_a_lora_of_another_family_or_width_is_refused_by_every_reader(pack, loras_dir, models):
    small = models["sd15"]
    _, xl = make_lora(models["sdxl"])
    names = [write_raw(xl, loras_dir / "xl.safetensors"),
             write_raw(xl, loras_dir / "xl_no_metadata.safetensors", metadata=False)]

    _, sd2 = make_lora(small)  # SD1.5 blocks, but SD2's 1024-wide text context in every attn2.to_k/to_v

    def widen(sd):
        for key in [k for k in sd if re.search(r"attn2_to_[kv]\.lora_down", k)]:
            sd[key] = torch.randn(sd[key].shape[0], 1024)
    names.append(write_raw(sd2, loras_dir / "sd2_width.safetensors", widen))

    for name in names:
        for node, call in readers(pack, small, name).items():
            with pytest.raises(ValueError, match=rf"^{re.escape(node)}: {name}.*(is a LoRA for SDXL|does not fit "
                                                 r"this SD1.x/SD2.x model|name no SD1.x/SD2.x UNet module)"):
                call()
    assert not small.patches and not small.object_patches and not small.weight_wrapper_patches


def test_non_finite_weights_and_strengths_are_refused(pack, loras_dir, models):
    sdxl = models["sdxl"]
    _, lora = make_lora(sdxl, ["output_blocks.1.1"])

    def poison(sd):
        next(v for k, v in sd.items() if k.endswith("lora_up.weight"))[0, 0] = float("nan")
    name = write_raw(lora, loras_dir / "diverged.safetensors", poison)
    for node, call in readers(pack, sdxl, name).items():
        with pytest.raises(ValueError, match=rf"^{re.escape(node)}: diverged.safetensors: this LoRA has NaN or inf"):
            call()
    with node_error("Inspect LoRA Blocks"):
        pack["EmbroideryLoRABlockInspector"].execute(name, "auto")

    good = write_raw(lora, loras_dir / "good.safetensors")
    loader = pack["EmbroideryStyleBlocksLoader"]
    with pytest.raises(ValueError, match=rf"^{LOADER}: strength is nan; give it a finite number"):
        loader.execute(sdxl, good, "blora_style", "", float("nan"))
    with pytest.raises(ValueError, match=r"^B-LoRA Mix \(Content \+ Style\): style_strength is inf"):
        pack["EmbroideryBLoRAMix"].execute(sdxl, good, "blora_content", 1.0, good, "blora_style", float("inf"), False)
    from .tiny_models import tiny_conditioning

    cond = tiny_conditioning("sdxl")
    with pytest.raises(ValueError, match=r"^Embroidery Masked Style: strength_1 is nan"):
        pack["EmbroideryMaskedStyle"].execute(sdxl, cond, cond, "all_attention", "", lora_1=good,
                                              strength_1=float("nan"), mask_1=torch.ones(1, 8, 8))
    with pytest.raises(ValueError, match=rf"^{LOADER}: cannot read block strength 'output_blocks.1.1=nan'"):
        loader.execute(sdxl, good, "blora_style", "", 1.0, "output_blocks.1.1=nan")
    assert not sdxl.patches


def test_a_malformed_alpha_is_named_with_the_node_and_the_file(pack, loras_dir, models):
    _, lora = make_lora(models["sdxl"], ["output_blocks.1.1"])
    key = {}

    def two_values(sd):
        key["alpha"] = next(k for k in sd if k.endswith(".alpha"))
        sd[key["alpha"]] = torch.tensor([4.0, 4.0])
    name = write_raw(lora, loras_dir / "two_alphas.safetensors", two_values)
    with pytest.raises(ValueError, match=rf"^{LOADER}: two_alphas.safetensors: {key['alpha']} holds 2 values"):
        pack["EmbroideryStyleBlocksLoader"].execute(models["sdxl"], name, "blora_style", "", 1.0)


def test_block_strengths_for_a_block_that_is_not_loaded_are_refused(pack, loras_dir, models):
    _, lora = make_lora(models["sdxl"], ["output_blocks.0.1", "output_blocks.1.1"])
    name = write_raw(lora, loras_dir / "two_blocks.safetensors")
    loader = pack["EmbroideryStyleBlocksLoader"]
    with pytest.raises(ValueError, match=rf"^{LOADER}: block_strengths names output_blocks.0.1, which this node does "
                                         r"not load; the loaded blocks are output_blocks.1.1"):
        loader.execute(models["sdxl"], name, "blora_style", "", 1.0, "up_blocks.0.attentions.0=0.5")
    assert loader.execute(models["sdxl"], name, "blora_style", "", 1.0, "output_blocks.1.1=0.5").result[0].patches


def test_save_refuses_names_windows_cannot_hold(pack, loras_dir, models):
    _, lora = make_lora(models["sd15"], ["output_blocks.4.1"])
    save = pack["EmbroiderySaveStyleLoRA"]
    for prefix in ("D:evil", "C:\\loras\\x", "emb/<x>", "CON", "\\\\server\\share\\x"):
        with pytest.raises(ValueError, match=r"^Save Style LoRA: filename_prefix: .*every OS accepts"):
            save.execute(lora, prefix, False)
    assert save.execute(lora, "embroidery\\win_style", False).result[0] == "embroidery/win_style_00001.safetensors"
    assert sorted(os.listdir(loras_dir)) == ["embroidery"]


# ---------------------------------------------------------------------------- trainers


def _checkpoints(loras_dir):
    folder = loras_dir / "embroidery_checkpoints"
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def _pair(pack, technique, trigger="emb", subject="flower"):
    import numpy as np

    from toyworld.generator import make_design, render_embroidery

    image, _ = render_embroidery(make_design(7, size=128), technique, 7)
    tensor = torch.from_numpy(np.clip(image, 0, 1).astype(np.float32))[None]
    with torch.inference_mode():
        return pack["EmbroideryAnalogyPair"].execute(tensor, subject, trigger, 64, 6).result[0]


def test_two_styles_with_the_default_trigger_keep_their_own_checkpoints(pack, sd15, pair, loras_dir):
    model, clip, vae = sd15
    folder = loras_dir / "embroidery_checkpoints"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = folder / f"emb_stage1_0000aaaa.safetensors{PARTIAL_MARK}{dead.pid}-0123abcd"
    stale.write_text("left by a server killed mid-write")
    foreign = folder / "someone_elses.safetensors.tmp-1-00000000"
    foreign.write_text("not ours")

    stage1(pack, model, clip, vae, pair, iterations=1, checkpoint_every=1)
    rose = _pair(pack, "chain horizontal fine matte", subject="red rose")
    stage1(pack, model, clip, vae, rose, iterations=1, checkpoint_every=1)
    saved = [n for n in _checkpoints(loras_dir) if n.endswith(".safetensors")]
    assert len(saved) == 2 and all(re.fullmatch(r"emb_stage1_[0-9a-f]{8}\.safetensors", n) for n in saved)
    subjects = {load_lora(folder / n).metadata["embroidery.subject"] for n in saved}
    assert subjects == {"flower", "red rose"}  # the first run's checkpoint survived the second
    assert not stale.exists() and foreign.exists()  # only our own stale temp file is cleaned up

    stage1(pack, model, clip, vae, pair, iterations=1, checkpoint_every=1)  # the same run again: its own file
    assert [n for n in _checkpoints(loras_dir) if n.endswith(".safetensors")] == saved
    flower = next(n for n in saved if load_lora(folder / n).metadata["embroidery.subject"] == "flower")
    stage1(pack, model, clip, vae, pair, iterations=2, checkpoint_every=1,
           resume_from=f"embroidery_checkpoints/{flower}")  # resumed further: still its own file
    assert [n for n in _checkpoints(loras_dir) if n.endswith(".safetensors")] == saved
    assert load_lora(folder / flower).metadata["embroidery.step"] == "2"

    odd = _pair(pack, "satin horizontal fine matte", trigger="<emb>")
    stage1(pack, model, clip, vae, odd, iterations=1, checkpoint_every=1)
    assert any(re.fullmatch(r"_emb__stage1_[0-9a-f]{8}\.safetensors", n) for n in _checkpoints(loras_dir))


def _one_checkpoint(loras_dir):
    (name,) = [n for n in _checkpoints(loras_dir) if n.endswith(".safetensors")]
    return loras_dir / "embroidery_checkpoints" / name


def test_resume_from_a_wrong_file_is_refused_before_any_work(pack, sd15, pair, loras_dir, models):
    import folder_paths

    model, clip, vae = sd15
    node = r"^Train Embroidery LoRA \(Stage 1\): "
    stage1(pack, model, clip, vae, pair, iterations=2, checkpoint_every=2)
    done = _one_checkpoint(loras_dir)
    os.replace(done, loras_dir / "done.safetensors")
    folder_paths.filename_list_cache.pop("loras", None)
    with pytest.raises(ValueError, match=node + r"done.safetensors is already at step 2, and this run stops at step "
                                               r"2: nothing is left to train. Raise iterations"):
        stage1(pack, model, clip, vae, pair, iterations=2, resume_from="done.safetensors")

    lora = load_lora(loras_dir / "done.safetensors")

    def poison(sd):
        next(v for k, v in sd.items() if k.endswith("lora_down.weight"))[0, 0] = float("nan")
    write_raw(lora, loras_dir / "nan.safetensors", poison)
    with pytest.raises(ValueError, match=node + "nan.safetensors: this LoRA has NaN or inf weights"):
        stage1(pack, model, clip, vae, pair, iterations=4, resume_from="nan.safetensors")

    _, xl = make_lora(models["sdxl"])
    xl.metadata.update({"embroidery.stage": "1", "embroidery.step": "1"})
    write_raw(xl, loras_dir / "xl_ckpt.safetensors")
    with pytest.raises(ValueError, match=node + r"xl_ckpt.safetensors is a LoRA for SDXL .* the model is SD1.x/SD2.x; "
                                               r"pick a LoRA trained on SD1.x/SD2.x, or load a SDXL checkpoint"):
        stage1(pack, model, clip, vae, pair, iterations=4, resume_from="xl_ckpt.safetensors")


# ---------------------------------------------------------------------------- Cancel


@pytest.fixture
def interrupt_after_first_pass():
    """A model whose first UNet pass presses Cancel (ComfyUI's own interrupt flag); counts passes."""
    import comfy.model_management as mm

    passes = []

    def install(model):
        counted = model.clone()

        def wrapper(apply, args):
            passes.append(1)
            mm.interrupt_current_processing(True)
            return apply(args["input"], args["timestep"], **args["c"])

        counted.set_model_unet_function_wrapper(wrapper)
        return counted

    yield install, passes
    mm.interrupt_current_processing(False)


def test_cancel_stops_stage2_pair_generation_within_one_step(pack, sd15, pair, loras_dir,
                                                             interrupt_after_first_pass):
    import comfy.model_management as mm

    model, clip, vae = sd15
    lora = stage1(pack, model, clip, vae, pair, iterations=1)[0]
    install, passes = interrupt_after_first_pass
    with pytest.raises(mm.InterruptProcessingException), torch.inference_mode():
        pack["EmbroideryTrainStage2"].execute(install(model), clip, vae, pair, lora, "red apple\nblue bird", 0.1, 1e-4,
                                              1.0, 30, 5.0, iterations=2, checkpoint_every=0, resume_from="(none)",
                                              **TRAIN)
    assert len(passes) == 1  # the second of 30 sampling steps never started
    assert _checkpoints(loras_dir) == []


def test_cancel_stops_find_style_blocks_before_its_next_pass(pack, sd15, pair):
    import comfy.model_management as mm

    model, clip, vae = sd15
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException), torch.inference_mode():
            pack["EmbroideryFindStyleBlocks"].execute(model, clip, vae, pair, "paper preset", 4, 10, 0)
    finally:
        mm.interrupt_current_processing(False)
