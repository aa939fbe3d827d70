"""The LoRA file format: what we write must be what kohya / ComfyUI read, and what we read must land
on the right LDM modules. Tiny tensors only; names are what matters here."""
import json
import os

import pytest
import safetensors
import safetensors.torch
import torch

from embroidery_core import lora_file
from embroidery_core.blocks import SD15, SDXL, block_of, get_arch, module_to_diffusers
from embroidery_core.lora_file import (
    PACK_VERSION,
    LoRAModule,
    StyleLoRA,
    kohya_metadata,
    load_lora,
    lora_from_modules,
    lora_from_state_dict,
    save_lora,
    to_kohya_state_dict,
)

RANK = 4
DIM = 8

SD15_STYLE = SD15.preset("blora_style")[0]  # output_blocks.4.1 = up_blocks.1.attentions.1
SDXL_STYLE = SDXL.preset("blora_style")[0]  # output_blocks.1.1 = up_blocks.0.attentions.1
SDXL_CONTENT = SDXL.preset("blora_content")[0]  # output_blocks.0.1 = up_blocks.0.attentions.0


def pair(rank=RANK, out=DIM, inp=DIM, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g)


def attention_lora(arch, blocks, rank=RANK, alpha=2.0, metadata=None):
    modules = {}
    for i, path in enumerate(arch.attention_modules(blocks)):
        down, up = pair(rank, seed=i)
        modules[path] = (down, up, alpha)
    return lora_from_modules(arch.name, modules, metadata or {})


def first_layer(block, proj="attn1.to_q"):
    return f"{block}.transformer_blocks.0.{proj}"


def read_raw(path):
    with safetensors.safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def assert_same_deltas(a, b):
    assert set(a.modules) == set(b.modules)
    for path in a.modules:
        torch.testing.assert_close(a.modules[path].delta(), b.modules[path].delta())


# ---------------------------------------------------------------------------- round trips


def test_sd15_round_trip_writes_kohya_diffusers_names(tmp_path):
    lora = attention_lora(SD15, [SD15_STYLE])
    path = save_lora(lora, tmp_path / "style.safetensors")
    sd, _ = read_raw(path)
    prefix = "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn1_to_q"
    assert {prefix + ".lora_down.weight", prefix + ".lora_up.weight", prefix + ".alpha"} <= set(sd)
    assert "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in sd
    assert not any("output_blocks" in k for k in sd)  # kohya writes diffusers names for SD1.x
    assert sd[prefix + ".alpha"].ndim == 0 and sd[prefix + ".alpha"].item() == 2.0
    assert len(sd) == 3 * len(SD15.attention_modules([SD15_STYLE]))
    loaded = load_lora(path)
    assert loaded.arch == "sd15"
    assert_same_deltas(lora, loaded)


def test_sdxl_round_trip_writes_kohya_ldm_names(tmp_path):
    lora = attention_lora(SDXL, [SDXL_STYLE])
    path = save_lora(lora, tmp_path / "style.safetensors")
    sd, _ = read_raw(path)
    assert "lora_unet_output_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in sd
    assert "lora_unet_output_blocks_1_1_transformer_blocks_9_attn2_to_out_0.lora_up.weight" in sd
    assert not any("up_blocks" in k for k in sd)
    assert all(t.is_contiguous() for t in sd.values())
    loaded = load_lora(path)
    assert loaded.arch == "sdxl" and loaded.blocks() == [SDXL_STYLE]
    assert_same_deltas(lora, loaded)


def test_saved_names_follow_the_block_map():
    """Every written SD1.5 key is the diffusers spelling of its module, underscored."""
    lora = attention_lora(SD15, SD15.attention_blocks())
    sd = to_kohya_state_dict(lora)
    expected = {f"lora_unet_{module_to_diffusers(p, SD15).replace('.', '_')}.lora_down.weight" for p in lora.modules}
    assert {k for k in sd if k.endswith(".lora_down.weight")} == expected


def test_metadata_is_complete_and_keeps_trainer_keys(tmp_path):
    modules = {
        first_layer(SDXL_STYLE): (*pair(rank=4), 4.0),
        first_layer(SDXL_CONTENT): (*pair(rank=16), 8.0),
    }
    trainer_keys = {"embroidery.stage": "2", "embroidery.trigger": "sks", "ss_network_dim": "999"}
    lora = lora_from_modules("sdxl", modules, trainer_keys)
    _, meta = read_raw(save_lora(lora, tmp_path / "m.safetensors"))
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "16"  # computed value wins over a stale one
    assert meta["ss_network_alpha"] == "4.0"
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["embroidery.pack_version"] == PACK_VERSION
    assert json.loads(meta["embroidery.blocks"]) == [SDXL_CONTENT, SDXL_STYLE]
    assert meta["embroidery.stage"] == "2" and meta["embroidery.trigger"] == "sks"
    sd15_meta = kohya_metadata(attention_lora(SD15, [SD15_STYLE]))
    assert sd15_meta["ss_base_model_version"] == "sd_v1"
    assert sd15_meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert load_lora(tmp_path / "m.safetensors").metadata["embroidery.trigger"] == "sks"


def test_conv_lora_stays_4d(tmp_path):
    conv = "input_blocks.1.0.in_layers.2"  # down_blocks.0.resnets.0.conv1
    down = torch.randn(RANK, DIM, 3, 3)
    lora = lora_from_modules("sd15", {conv: (down, torch.randn(16, RANK), 1.0)})  # 2-D up: saved as a 1x1 conv
    assert lora.modules[conv].delta().shape == (16, DIM, 3, 3)
    path = save_lora(lora, tmp_path / "conv.safetensors")
    sd, _ = read_raw(path)
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (RANK, DIM, 3, 3)
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (16, RANK, 1, 1)
    loaded = load_lora(path, arch="sd15")
    assert loaded.modules[conv].down.shape == (RANK, DIM, 3, 3)
    assert_same_deltas(lora, loaded)


def test_delta_is_up_down_times_alpha_over_rank():
    down, up = pair()
    module = LoRAModule(down, up, alpha=2.0)
    torch.testing.assert_close(module.delta(), up @ down * (2.0 / RANK))
    assert module.rank == RANK
    assert module.norm() == pytest.approx(module.delta().norm().item(), rel=1e-5)


# ---------------------------------------------------------------------------- other formats


def test_blora_script_file_loads_to_ldm_modules(tmp_path):
    sd = {}
    for block, layer in (("up_blocks.0.attentions.1", 0), ("up_blocks.0.attentions.0", 1)):
        for proj in ("attn1.to_q", "attn2.to_out.0"):
            down, up = pair(seed=layer)
            base = f"unet.{block}.transformer_blocks.{layer}.{proj}"
            sd[base + ".lora.down.weight"], sd[base + ".lora.up.weight"] = down, up
    safetensors.torch.save_file(sd, tmp_path / "blora.safetensors")
    lora = load_lora(tmp_path / "blora.safetensors")  # no metadata: layer index 1 says SDXL
    assert lora.arch == "sdxl"
    assert set(lora.modules) == {
        "output_blocks.1.1.transformer_blocks.0.attn1.to_q",
        "output_blocks.1.1.transformer_blocks.0.attn2.to_out.0",
        "output_blocks.0.1.transformer_blocks.1.attn1.to_q",
        "output_blocks.0.1.transformer_blocks.1.attn2.to_out.0",
    }
    key = "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q"
    module = lora.modules["output_blocks.1.1.transformer_blocks.0.attn1.to_q"]
    assert module.alpha == RANK  # no alpha anywhere: scale 1
    torch.testing.assert_close(module.delta(), sd[key + ".lora.up.weight"] @ sd[key + ".lora.down.weight"])
    assert lora.filter_blocks([SDXL_STYLE]).blocks() == [SDXL_STYLE]


def test_peft_and_processor_formats_load(tmp_path):
    target = "output_blocks.1.1.transformer_blocks.0"
    sd = {}
    attn1 = "up_blocks.0.attentions.1.transformer_blocks.0.attn1"
    variants = {
        f"base_model.model.{attn1}.to_q": (".lora_A.weight", ".lora_B.weight"),  # PEFT
        f"unet.{attn1}.to_k": (".lora_A.default.weight", ".lora_B.default.weight"),  # PEFT, adapter named
        f"{attn1}.to_v": (".lora_A.weight", ".lora_B.weight"),  # diffusers without "unet."
        f"unet.{attn1}.processor.to_out": ("_lora.down.weight", "_lora.up.weight"),  # attention processor
    }
    for i, (base, (a, b)) in enumerate(variants.items()):
        sd[base + a], sd[base + b] = pair(seed=i)
    sd["up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_v.alpha"] = torch.tensor(1.0)
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": RANK, "unet.lora_alpha": 8})}
    safetensors.torch.save_file(sd, tmp_path / "peft.safetensors", metadata=meta)
    lora = load_lora(tmp_path / "peft.safetensors", arch="sdxl")
    assert set(lora.modules) == {f"{target}.attn1.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")}
    assert lora.modules[f"{target}.attn1.to_q"].alpha == 8.0  # PEFT lora_alpha from diffusers' metadata
    assert lora.modules[f"{target}.attn1.to_v"].alpha == 1.0  # an explicit .alpha key wins


def test_trainlora_node_file_loads_and_skips_diffs(tmp_path):
    attn = "output_blocks.4.1.transformer_blocks.0.attn1.to_q"
    conv = "input_blocks.1.0.in_layers.2"
    sd = {
        f"diffusion_model.{attn}.lora_up.weight": torch.randn(DIM, RANK),
        f"diffusion_model.{attn}.lora_down.weight": torch.randn(RANK, DIM),
        f"diffusion_model.{conv}.lora_up.weight": torch.randn(DIM, RANK),
        f"diffusion_model.{conv}.lora_down.weight": torch.randn(RANK, DIM * 9),  # conv flattened to 2-D
        "diffusion_model.input_blocks.1.0.in_layers.0.diff": torch.zeros(DIM),
        "diffusion_model.input_blocks.1.0.in_layers.0.diff_b": torch.zeros(DIM),
        f"diffusion_model.{attn}.diff_b": torch.zeros(DIM),
    }
    safetensors.torch.save_file(sd, tmp_path / "ComfyUI_trained_lora_16_steps_00001_.safetensors")
    lora = load_lora(tmp_path / "ComfyUI_trained_lora_16_steps_00001_.safetensors", arch="sd15")
    assert set(lora.modules) == {attn, conv}
    assert lora.metadata["embroidery.skipped_keys"] == "3"
    assert lora.modules[conv].delta().shape == (DIM, DIM * 9)  # kernel unknown: stays 2-D
    assert lora.modules[attn].scale == 1.0
    resaved = read_raw(save_lora(lora, tmp_path / "resaved.safetensors"))[0]
    assert resaved["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (RANK, DIM * 9)


def test_kohya_sdxl_file_with_text_encoder_keys_loads_unet_only(tmp_path):
    prefix = "lora_unet_output_blocks_1_1_transformer_blocks_0_attn2_to_k"
    down, up = pair(inp=2048)
    sd = {prefix + ".lora_down.weight": down, prefix + ".lora_up.weight": up, prefix + ".alpha": torch.tensor(1.0)}
    sd["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.randn(RANK, DIM)
    sd["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.randn(DIM, RANK)
    safetensors.torch.save_file(sd, tmp_path / "k.safetensors")
    lora = load_lora(tmp_path / "k.safetensors")  # attn2.to_k in-dim 2048 says SDXL
    assert lora.arch == "sdxl"
    assert list(lora.modules) == ["output_blocks.1.1.transformer_blocks.0.attn2.to_k"]
    assert lora.modules["output_blocks.1.1.transformer_blocks.0.attn2.to_k"].scale == pytest.approx(1 / RANK)


def test_sd15_kohya_file_without_metadata_is_guessed_sd15(tmp_path):
    lora = attention_lora(SD15, [SD15_STYLE])
    safetensors.torch.save_file(to_kohya_state_dict(lora), tmp_path / "bare.safetensors")
    loaded = load_lora(tmp_path / "bare.safetensors")
    assert loaded.arch == "sd15" and loaded.blocks() == [SD15_STYLE]


# ---------------------------------------------------------------------------- block operations


def two_block_sd15_lora():
    """output_blocks.1.1 (a valid name, not an SD1.5 attention block) next to output_blocks.10.1."""
    modules = {}
    for i, block in enumerate(("output_blocks.1.1", "output_blocks.10.1", "middle_block.1")):
        for proj in ("attn1.to_q", "attn2.to_v"):
            modules[first_layer(block, proj)] = (*pair(seed=i), float(RANK))
    modules["time_embed.0"] = (*pair(seed=9), float(RANK))
    return lora_from_modules("sd15", modules)


def test_blocks_are_in_execution_order():
    assert two_block_sd15_lora().blocks() == ["middle_block.1", "output_blocks.1.1", "output_blocks.10.1"]


def test_filter_blocks_matches_whole_blocks():
    lora = two_block_sd15_lora()
    one = lora.filter_blocks(["output_blocks.1.1"])
    assert set(one.modules) == {first_layer("output_blocks.1.1", p) for p in ("attn1.to_q", "attn2.to_v")}
    ten = lora.filter_blocks(["up_blocks.3.attentions.1"])  # diffusers spelling of output_blocks.10.1
    assert ten.blocks() == ["output_blocks.10.1"]
    assert lora.filter_blocks("output_blocks.1.1, middle_block.1").blocks() == ["middle_block.1", "output_blocks.1.1"]
    assert len(lora.modules) == 7  # the source is untouched
    with pytest.raises(ValueError, match="not a block name"):
        lora.filter_blocks(["output_blocks.1"])


def test_scaled_folds_strength_per_block():
    lora = two_block_sd15_lora()
    q1, q10 = first_layer("output_blocks.1.1"), first_layer("output_blocks.10.1")
    half = lora.scaled({"output_blocks.1.1": 0.5}, default=1.0)
    torch.testing.assert_close(half.modules[q1].delta(), lora.modules[q1].delta() * 0.5)
    torch.testing.assert_close(half.modules[q10].delta(), lora.modules[q10].delta())
    squared = lora.scaled({"up_blocks.0.attentions.1": 0.5}, default=2.0, alpha_squared=True)
    torch.testing.assert_close(squared.modules[q1].delta(), lora.modules[q1].delta() * 0.25)
    torch.testing.assert_close(squared.modules[q10].delta(), lora.modules[q10].delta() * 4.0)
    torch.testing.assert_close(squared.modules["time_embed.0"].delta(), lora.modules["time_embed.0"].delta() * 4.0)
    assert squared.modules[q1].down is lora.modules[q1].down  # only up changes; the source is untouched
    torch.testing.assert_close(lora.modules[q1].delta(), two_block_sd15_lora().modules[q1].delta())


def test_block_norms():
    lora = two_block_sd15_lora()
    norms = lora.block_norms()
    assert list(norms) == lora.blocks()  # time_embed.0 lies outside every block
    for block, value in norms.items():
        expected = sum(m.delta().norm() ** 2 for p, m in lora.modules.items() if block_of(p) == block) ** 0.5
        assert value == pytest.approx(expected.item(), rel=1e-5)
    zeroed = lora.scaled({"middle_block.1": 0.0})
    assert zeroed.block_norms()["middle_block.1"] == 0.0


def test_invalid_in_memory_lora_is_refused():
    with pytest.raises(ValueError, match="LDM path"):
        lora_from_modules("sd15", {"diffusion_model.output_blocks.4.1.proj_in": (*pair(), 1.0)})
    with pytest.raises(ValueError, match="strings only"):
        lora_from_modules("sd15", {first_layer(SD15_STYLE): (*pair(), 1.0)}, {"embroidery.steps": 100})
    with pytest.raises(ValueError, match="rank mismatch"):
        LoRAModule(torch.randn(4, DIM), torch.randn(DIM, 8), 1.0)
    with pytest.raises(ValueError, match="unknown model family"):
        StyleLoRA("flux", {}, {})


# ---------------------------------------------------------------------------- atomic save


def failing_save(state_dict, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"half a file")
    raise RuntimeError("disk full")


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_lora(attention_lora(SD15, [SD15_STYLE]), tmp_path / "new.safetensors")
    assert os.listdir(tmp_path) == []


def test_failed_save_keeps_existing_file(tmp_path, monkeypatch):
    target = tmp_path / "style.safetensors"
    original = attention_lora(SD15, [SD15_STYLE])
    save_lora(original, target)
    before = target.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(RuntimeError):
        save_lora(attention_lora(SDXL, [SDXL_STYLE]), target)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["style.safetensors"]
    assert_same_deltas(original, load_lora(target))


def test_save_overwrites_and_refuses_other_extensions(tmp_path):
    target = tmp_path / "sub" / "style.safetensors"
    save_lora(attention_lora(SD15, [SD15_STYLE]), target)
    assert save_lora(attention_lora(SD15, ["output_blocks.5.1"]), target) == str(target)
    assert load_lora(target).blocks() == ["output_blocks.5.1"]
    assert os.listdir(target.parent) == ["style.safetensors"]
    with pytest.raises(ValueError, match=r"style\.safetensors"):
        save_lora(attention_lora(SD15, [SD15_STYLE]), tmp_path / "style.ckpt")
    with pytest.raises(ValueError, match="nothing to save"):
        save_lora(StyleLoRA("sd15", {}, {}), tmp_path / "empty.safetensors")


# ---------------------------------------------------------------------------- bad files


@pytest.mark.parametrize("ext", [".ckpt", ".pt", ".pth", ".bin", ".pkl", ".CKPT"])
def test_pickle_files_are_refused_unread(tmp_path, monkeypatch, ext):
    def never(*args, **kwargs):
        raise AssertionError("a pickle file was opened")

    monkeypatch.setattr(torch, "load", never)
    monkeypatch.setattr(safetensors, "safe_open", never)
    path = tmp_path / f"old{ext}"
    path.write_bytes(b"\x80\x04 not really a pickle")
    with pytest.raises(ValueError, match=r"convert it to \.safetensors"):
        load_lora(path)
    with pytest.raises(ValueError, match=r"convert it to \.safetensors"):
        load_lora(tmp_path / f"missing{ext}")


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_lora(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("content", [b"", b"\x00\x01 garbage, no header" * 3, b"\x10\x00\x00\x00\x00\x00\x00\x00{}"])
def test_damaged_files(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a readable .safetensors"):
        load_lora(path)


def test_truncated_file(tmp_path):
    path = save_lora(attention_lora(SD15, [SD15_STYLE]), tmp_path / "cut.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable .safetensors"):
        load_lora(path)


def save_raw(tmp_path, sd, name="raw.safetensors"):
    path = tmp_path / name
    safetensors.torch.save_file(sd, path)
    return path


def kohya_keys(name, down, up):
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}


def test_no_lora_keys(tmp_path):
    path = save_raw(tmp_path, {"model.diffusion_model.out.2.weight": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="no LoRA keys found"):
        load_lora(path, arch="sd15")


def test_text_encoder_only_lora(tmp_path):
    sd = kohya_keys("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", *pair())
    sd.update(kohya_keys("text_encoder_2.text_model.encoder.layers.0.mlp.fc1", *pair()))
    with pytest.raises(ValueError, match="text-encoder-only"):
        load_lora(save_raw(tmp_path, sd))


def test_down_without_up(tmp_path):
    sd = kohya_keys("lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn1_to_q", *pair())
    sd["lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn1_to_k.lora_down.weight"] = torch.randn(RANK, DIM)
    with pytest.raises(ValueError, match=r"unmatched.*attn1_to_k"):
        load_lora(save_raw(tmp_path, sd), arch="sd15")


def test_rank_mismatch(tmp_path):
    name = "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn1_to_q"
    sd = kohya_keys(name, torch.randn(4, DIM), torch.randn(DIM, 8))
    with pytest.raises(ValueError, match=r"attn1_to_q.*rank mismatch"):
        load_lora(save_raw(tmp_path, sd), arch="sd15")


def test_unmappable_keys_are_listed(tmp_path):
    sd = kohya_keys("lora_unet_double_blocks_0_img_attn_qkv", *pair())  # a Flux LoRA
    with pytest.raises(ValueError, match="double_blocks_0_img_attn_qkv"):
        load_lora(save_raw(tmp_path, sd), arch="sdxl")


def test_unsupported_adapter_keys_are_refused():
    sd = kohya_keys("lora_unet_output_blocks_1_1_proj_in", *pair())
    sd["lora_unet_output_blocks_1_1_proj_in.hada_w1_a"] = torch.randn(DIM, RANK)
    with pytest.raises(ValueError, match="hada_w1_a"):
        lora_from_state_dict(sd, "sdxl")


def test_two_keys_for_one_module_are_refused():
    sd = kohya_keys("lora_unet_output_blocks_1_1_proj_in", *pair())
    sd.update(kohya_keys("lora_unet_up_blocks_0_attentions_1_proj_in", *pair()))
    with pytest.raises(ValueError, match="both map"):
        lora_from_state_dict(sd, "sdxl")


def test_module_api_is_stable():
    """Names other modules import."""
    for name in ("PACK_VERSION", "LoRAModule", "StyleLoRA", "to_kohya_state_dict", "kohya_metadata", "save_lora",
                 "load_lora", "lora_from_state_dict", "lora_from_modules"):
        assert hasattr(lora_file, name)
    assert get_arch("sdxl") is SDXL


def test_style_blocks_and_rank_come_from_the_file():
    trained = attention_lora(SDXL, [SDXL_STYLE, SDXL_CONTENT], rank=3,
                             metadata={"embroidery.style_blocks": f"{SDXL_STYLE},"})
    assert trained.style_blocks == [SDXL_STYLE] and trained.rank == 3
    assert attention_lora(SDXL, [SDXL_STYLE]).style_blocks == []  # a file no trainer of ours wrote


# ---------------------------------------------------------------------------- files a user can get wrong

def test_an_alpha_with_two_values_is_named_not_a_raw_runtime_error(tmp_path):
    sd = to_kohya_state_dict(attention_lora(SDXL, [SDXL_STYLE]))
    key = next(k for k in sd if k.endswith(".alpha"))
    sd[key] = torch.tensor([4.0, 4.0])
    safetensors.torch.save_file(sd, str(tmp_path / "two_alphas.safetensors"))
    with pytest.raises(ValueError, match=rf"two_alphas\.safetensors: {key} holds 2 values .*re-export"):
        load_lora(tmp_path / "two_alphas.safetensors", arch="sdxl")
    sd[key] = torch.tensor(float("nan"))
    safetensors.torch.save_file(sd, str(tmp_path / "nan_alpha.safetensors"))
    with pytest.raises(ValueError, match=rf"{key} is nan"):
        load_lora(tmp_path / "nan_alpha.safetensors", arch="sdxl")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_when_read_and_when_written(tmp_path, bad):
    lora = attention_lora(SDXL, [SDXL_STYLE])
    sd = to_kohya_state_dict(lora)
    key = next(k for k in sd if k.endswith(".lora_up.weight"))
    sd[key][0, 0] = bad
    safetensors.torch.save_file(sd, str(tmp_path / "diverged.safetensors"))
    with pytest.raises(ValueError, match=r"diverged\.safetensors: this LoRA has NaN or inf weights in 1 of"):
        load_lora(tmp_path / "diverged.safetensors", arch="sdxl")
    path = next(iter(lora.modules))
    lora.modules[path].down[0, 0] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        save_lora(lora, tmp_path / "never_written.safetensors")
    assert not (tmp_path / "never_written.safetensors").exists()


def test_a_file_of_another_family_is_refused_by_its_metadata(tmp_path):
    path = save_lora(attention_lora(SDXL, [SDXL_STYLE]), tmp_path / "xl.safetensors")
    with pytest.raises(ValueError, match=r"xl\.safetensors is a LoRA for SDXL .* the model is SD1.x/SD2.x"):
        load_lora(path, arch="sd15")
    assert load_lora(path, arch="sdxl").arch == "sdxl"


def test_misfits_name_each_module_that_does_not_fit_the_model():
    lora = attention_lora(SD15, [SD15_STYLE])  # every projection DIM x DIM
    fitting = {p: (DIM, DIM) for p in lora.modules}
    assert lora.misfits(fitting) == []
    assert lora_file.require_fit(lora, fitting, "sd15") is lora
    k_proj = first_layer(SD15_STYLE, "attn2.to_k")
    wider = {**fitting, k_proj: (DIM, 2 * DIM)}  # another context width (SD2.x / SDXL)
    missing = {p: s for p, s in fitting.items() if p != k_proj}
    assert lora.misfits(wider) == [f"{k_proj} (LoRA {DIM}x{DIM}, model {DIM}x{2 * DIM})"]
    assert lora.misfits(missing) == [f"{k_proj} (the model has no such layer)"]
    with pytest.raises(ValueError, match=r"does not fit this SD1.x/SD2.x model: 1 of \d+ modules differ.*another "
                                         r"model family or width"):
        lora_file.require_fit(lora, wider, "sd15")


def test_a_2d_conv_down_compares_flattened():
    conv = "input_blocks.1.1.proj_in"
    lora = StyleLoRA("sd15", {conv: LoRAModule(torch.zeros(RANK, DIM * 9), torch.zeros(DIM, RANK), RANK)})
    assert lora.misfits({conv: (DIM, DIM, 3, 3)}) == []
    assert lora.misfits({conv: (DIM, DIM, 1, 1)}) != []
