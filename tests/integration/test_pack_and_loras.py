"""Issue 2 in real ComfyUI, in-process: the pack loads through ComfyUI's own loader, its LoRA
files load in stock LoraLoader with every key mapped, foreign formats load restricted to one
block, and the block map agrees with ComfyUI's own unet_to_diffusers."""
import logging

import pytest
import torch

from embroidery_core import blocks as block_map
from embroidery_core.lora_file import lora_from_modules, save_lora

PACK_NODE_IDS = {"EmbroideryStyleBlocksLoader", "EmbroiderySaveStyleLoRA", "EmbroideryLoRABlockInspector",
                 "EmbroideryAnalogyPair", "EmbroideryFindStyleBlocks", "EmbroideryTrainStage1",
                 "EmbroideryTrainStage2"}


def test_pack_registers_every_node_with_a_valid_schema(pack):
    assert PACK_NODE_IDS <= set(pack)
    for node_id, cls in pack.items():
        schema = cls.GET_SCHEMA()
        assert schema.node_id == node_id and schema.category.startswith("embroidery")
        inputs = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, spec in inputs.get(section, {}).items():
                options = spec[1] if len(spec) > 1 else {}
                assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"


def _arch(patcher):
    import sys

    common = next(m for name, m in sys.modules.items() if name.endswith(".nodes.common") and hasattr(m, "model_family"))
    return common.model_family(patcher, "test")


def make_lora(patcher, blocks=None, rank=4, seed=0):
    arch = _arch(patcher)
    modules = dict(patcher.model.diffusion_model.named_modules())
    g = torch.Generator().manual_seed(seed)
    entries = {}
    for name in arch.attention_modules(blocks):
        m = modules[name]
        entries[name] = (torch.randn(rank, m.in_features, generator=g), torch.randn(m.out_features, rank, generator=g), rank)
    return arch, lora_from_modules(arch.name, entries, {"embroidery.style_blocks": ",".join(blocks or [])})


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_saved_lora_loads_in_stock_loraloader_with_every_key_mapped(pack, loras_dir, family, caplog):
    import nodes

    from .tiny_models import tiny_patcher

    patcher = tiny_patcher(family)
    arch, lora = make_lora(patcher)
    save_lora(lora, loras_dir / f"ours_{family}.safetensors")
    with caplog.at_level(logging.WARNING):
        patched = nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, f"ours_{family}.safetensors", 1.0)[0]
    assert "lora key not loaded" not in caplog.text
    assert len(patched.patches) == len(lora.modules) == len(arch.attention_modules())


def _weights(patcher):
    return {k: v.detach().clone() for k, v in patcher.model.diffusion_model.state_dict().items()}


def _changed_after_patching(patched):
    import comfy.model_management as mm

    before = _weights(patched)
    mm.load_models_gpu([patched], force_full_load=True)
    try:
        after = _weights(patched)
    finally:
        mm.unload_all_models()
    return {k for k in before if not torch.equal(before[k], after[k])}


def _blora_diffusers_file(lora, arch, path):
    """The official B-LoRA script's layout: unet.<diffusers path>.lora.down/up.weight."""
    from safetensors.torch import save_file

    sd = {}
    for name, m in lora.modules.items():
        key = "unet." + block_map.module_to_diffusers(name, arch)
        sd[f"{key}.lora.down.weight"] = m.down.contiguous()
        sd[f"{key}.lora.up.weight"] = m.up.contiguous()
    save_file(sd, str(path))
    return sd


@pytest.mark.parametrize("fmt", ["blora_diffusers", "kohya"])
def test_loader_restricted_to_one_block_changes_only_that_block(pack, loras_dir, fmt):
    import comfy.lora

    from .tiny_models import tiny_patcher

    patcher = tiny_patcher("sdxl")
    arch, lora = make_lora(patcher, ["output_blocks.0.1", "output_blocks.1.1", "input_blocks.8.1"])
    name = f"{fmt}.safetensors"
    if fmt == "blora_diffusers":
        sd = _blora_diffusers_file(lora, arch, loras_dir / name)
        # stock ComfyUI maps none of these keys (the reason this loader exists)
        stock = comfy.lora.load_lora(sd, comfy.lora.model_lora_keys_unet(patcher.model, {}), log_missing=False)
        assert len(stock) == 0
    else:
        save_lora(lora, loras_dir / name)
    loader = pack["EmbroideryStyleBlocksLoader"]
    out = loader.execute(patcher, name, "blora_style", "", 1.0).result[0]
    assert out is not patcher and not patcher.patches
    changed = _changed_after_patching(out)
    expected = {f"{m}.weight" for m in arch.attention_modules(["output_blocks.1.1"])}
    assert changed == expected
    assert not _changed_after_patching(patcher.clone())  # the input model was not touched


def test_loader_errors_name_the_node_and_the_fix(pack, loras_dir):
    from .tiny_models import tiny_patcher

    patcher = tiny_patcher("sdxl")
    arch, lora = make_lora(patcher, ["output_blocks.0.1"])
    save_lora(lora, loras_dir / "content_only.safetensors")
    loader = pack["EmbroideryStyleBlocksLoader"]
    with pytest.raises(ValueError, match=r"Load Style Blocks of a LoRA: .*no weights in output_blocks\.1\.1.*output_blocks\.0\.1"):
        loader.execute(patcher, "content_only.safetensors", "blora_style", "", 1.0)
    with pytest.raises(ValueError, match="has no attention block output_blocks.11.1"):
        loader.execute(patcher, "content_only.safetensors", "custom", "output_blocks.11.1", 1.0)
    with pytest.raises(ValueError, match="not in any 'loras' folder"):
        loader.execute(patcher, "missing.safetensors", "blora_style", "", 1.0)


def test_per_block_strength_and_alpha_squared(pack, loras_dir):
    from .tiny_models import tiny_patcher

    patcher = tiny_patcher("sdxl")
    arch, lora = make_lora(patcher, ["output_blocks.1.1"])
    save_lora(lora, loras_dir / "s.safetensors")
    loader = pack["EmbroideryStyleBlocksLoader"]
    key = "diffusion_model.output_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"

    def delta(out):
        import comfy.lora
        weight = patcher.model.state_dict()[key].float()
        return comfy.lora.calculate_weight(out.patches[key], weight.clone(), key) - weight

    one = delta(loader.execute(patcher, "s.safetensors", "blora_style", "", 1.0).result[0])
    half = delta(loader.execute(patcher, "s.safetensors", "blora_style", "", 1.0, "output_blocks.1.1=0.5").result[0])
    squared = delta(loader.execute(patcher, "s.safetensors", "blora_style", "", 0.5, "", True).result[0])
    assert torch.allclose(half, 0.5 * one, atol=1e-5)
    assert torch.allclose(squared, 0.25 * one, atol=1e-5)


def test_save_node_writes_into_loras_and_inspector_reads_it(pack, loras_dir):
    from .tiny_models import tiny_patcher

    patcher = tiny_patcher("sd15")
    arch, lora = make_lora(patcher)
    lora.metadata["embroidery.style_blocks"] = ",".join(arch.preset("emolora_style"))
    out = pack["EmbroiderySaveStyleLoRA"].execute(lora, "embroidery/test", True)
    name = out.result[0]
    assert name == "embroidery/test_00001.safetensors" and (loras_dir / name).is_file()
    again = pack["EmbroiderySaveStyleLoRA"].execute(lora, "embroidery/test", True).result[0]
    assert again == "embroidery/test_00002.safetensors"
    report, chart = pack["EmbroideryLoRABlockInspector"].execute(name, "auto").result
    assert [line.split()[0] for line in report.splitlines()[2:6]] == arch.preset("emolora_style")
    assert chart.ndim == 4 and chart.shape[-1] == 3
    with pytest.raises(ValueError, match="relative name inside the loras folder"):
        pack["EmbroiderySaveStyleLoRA"].execute(lora, "../escape", False)


REAL_CONFIGS = {
    "sd15": {"num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
             "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
             "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "transformer_depth_middle": 1},
    "sdxl": {"num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
             "transformer_depth": [0, 0, 2, 2, 10, 10],
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10},
}


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_block_map_agrees_with_comfy_unet_to_diffusers(comfy, family):
    import comfy.utils

    config = REAL_CONFIGS[family]
    arch = block_map.arch_from_unet_config(family, config)
    assert arch == block_map.get_arch(family)  # the hand-written family layout is the real one
    mapping = comfy.utils.unet_to_diffusers(config)
    checked = 0
    for diffusers_key, ldm_key in mapping.items():
        if diffusers_key.startswith("class_embedding") or diffusers_key.startswith("add_embedding") and family == "sd15":
            continue
        module, _, _ = diffusers_key.rpartition(".")
        assert block_map.module_to_ldm(module, arch) == ldm_key.rpartition(".")[0], diffusers_key
        assert block_map.module_to_diffusers(ldm_key.rpartition(".")[0], arch) == module, ldm_key
        checked += 1
    assert checked > 300
    attention = {k.split(".transformer_blocks")[0] for k in mapping.values() if ".transformer_blocks." in k}
    assert set(arch.attention_blocks()) == attention
    for name in arch.attention_modules():
        assert f"{name}.weight" in mapping.values()


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_family_detection_reads_the_actual_layout(pack, family):
    from .tiny_models import tiny_patcher

    arch = _arch(tiny_patcher(family))
    names = dict(tiny_patcher(family).model.diffusion_model.named_modules())
    assert arch.name == family
    assert all(n in names for n in arch.attention_modules())
