"""Issues 2 and 3 through a real ComfyUI server (main.py --cpu) with the pack in custom_nodes:
the training graph pair -> stage 1 -> stage 2 -> save -> stock LoraLoader -> KSampler, our
style-blocks loader in an API prompt, and Cancel in the middle of training."""
import json
import os
import time

import pytest

from embroidery_core import blocks as block_map
from embroidery_core.lora_file import load_lora

from .comfy_env import comfy_version, version_tuple
from .server import PromptFailed, PromptRejected, comfy_server
from .tiny_models import write_tiny_loras

pytestmark = pytest.mark.slow

PACK_LINK = "embroidery-style-lora"
REFERENCE = "embroidery_reference.png"


def _write_reference(path):
    import numpy as np
    from PIL import Image

    from toyworld.generator import make_design, render_embroidery

    image, _ = render_embroidery(make_design(3, size=128), "satin horizontal fine matte", 3)
    Image.fromarray((np.clip(image, 0, 1) * 255).astype("uint8")).save(path)


@pytest.fixture(scope="module")
def server(tiny_ckpt_dir, tiny_sdxl_ckpt, pack_dir):
    with comfy_server(custom_nodes=[(PACK_LINK, pack_dir)], models_dir=tiny_ckpt_dir) as srv:
        _write_reference(os.path.join(srv.base_dir, "input", REFERENCE))
        loras = os.path.join(srv.base_dir, "models", "loras")
        write_tiny_loras(tiny_ckpt_dir / "checkpoints" / "tiny_sd15.safetensors", loras, ["it_sd15.safetensors"],
                         family="sd15")
        write_tiny_loras(tiny_sdxl_ckpt, loras, ["it_sdxl.safetensors"])
        yield srv


def training_graph(ckpt, prefix, style_blocks="emolora_style", stage1=3, stage2=2):
    trainer = {"learning_rate": 1e-4, "weight_decay": 1e-2, "seed": 42, "precision": "auto",
               "memory_preset": "balanced", "checkpoint_every": 0, "resume_from": "(none)", "preview_every": 1}
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "LoadImage", "inputs": {"image": REFERENCE}},
        "3": {"class_type": "EmbroideryAnalogyPair", "inputs": {
            "reference": ["2", 0], "subject": "flower", "trigger": "emb", "resolution": 64, "colours": 6}},
        "4": {"class_type": "EmbroideryTrainStage1", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "pair": ["3", 0], "style_blocks": style_blocks,
            "rank": 4, "alpha": 4.0, "iterations": stage1, **trainer}},
        "5": {"class_type": "EmbroideryTrainStage2", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "pair": ["3", 0], "lora": ["4", 0],
            "subjects": "red apple\nblue bird", "generated_weight": 0.1, "contrastive_weight": 1e-4, "tau": 1.0,
            "sample_steps": 2, "cfg": 5.0, "iterations": stage2, **trainer}},
        "6": {"class_type": "EmbroiderySaveStyleLoRA", "inputs": {
            "lora": ["5", 0], "filename_prefix": prefix, "style_blocks_only": False}},
        "7": {"class_type": "LossGraphNode", "inputs": {"loss": ["5", 2], "filename_prefix": "embroidery_loss"}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "a flower in emb style", "clip": ["1", 1]}},
        "9": {"class_type": "CLIPTextEncode", "inputs": {"text": "lowres", "clip": ["1", 1]}},
        "10": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "11": {"class_type": "KSampler", "inputs": {
            "model": ["5", 1], "positive": ["8", 0], "negative": ["9", 0], "latent_image": ["10", 0],
            "seed": 1, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["1", 2]}},
        "13": {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": "embroidery_it"}},
    }


def sampling_graph(ckpt, loader):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": loader,
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat in emb style", "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "lowres", "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "seed": 3, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "embroidery_load"}},
    }


def assert_loss_graph_shown(server, history, node="7"):
    """Stock LossGraphNode drew our LOSS_MAP. Up to 0.3.x it writes ``<prefix>_<date>.png`` into
    the temp folder itself; from 0.8 it returns a PreviewImage (ComfyUI's own temp name) instead.
    Either way the picture must exist."""
    (graph,) = history["outputs"][node]["images"]
    assert os.path.isfile(os.path.join(server.base_dir, graph["type"], graph.get("subfolder") or "", graph["filename"]))
    if version_tuple(comfy_version()) < (0, 8):
        assert graph["type"] == "temp" and graph["filename"].startswith("embroidery_loss_")
    else:
        assert graph["type"] == "temp" and not graph["filename"].startswith("embroidery_loss_")


def test_pack_nodes_in_object_info_without_import_errors(server):
    info = server.object_info()
    for node_id in ("EmbroideryStyleBlocksLoader", "EmbroiderySaveStyleLoRA", "EmbroideryLoRABlockInspector",
                    "EmbroideryAnalogyPair", "EmbroideryFindStyleBlocks", "EmbroideryTrainStage1",
                    "EmbroideryTrainStage2"):
        assert node_id in info, node_id
    ours = [line for line in server.log_text().splitlines() if PACK_LINK in line]
    assert ours, "the server log does not mention the pack at all"
    assert not [line for line in ours if "IMPORT FAILED" in line or "Cannot import" in line], ours


def _saved_lora_path(server, history):
    name = next(o["text"][0] for o in history["outputs"].values() if "text" in o).removeprefix("saved ")
    roots = [os.path.join(server.base_dir, "models", "loras")]
    return name, next(os.path.join(r, name) for r in roots if os.path.isfile(os.path.join(r, name)))


@pytest.mark.parametrize("family,ckpt", [("sd15", "tiny_sd15.safetensors"), ("sdxl", "tiny_sdxl.safetensors")])
def test_training_graph_then_stock_loraloader(server, family, ckpt):
    history = server.run(training_graph(ckpt, f"embroidery/it_{family}"), timeout=900)
    images = server.output_images(history)
    assert any("embroidery_it" in p for p in images)
    assert_loss_graph_shown(server, history)
    name, path = _saved_lora_path(server, history)

    lora = load_lora(path)
    meta = lora.metadata
    style = block_map.get_arch(family).preset("emolora_style")
    assert lora.arch == family
    assert (meta["embroidery.stage"], meta["embroidery.step"]) == ("2", "5")
    assert meta["embroidery.updated_blocks.embroidery"].split(",") == style  # embroidery steps: style blocks only
    assert len(meta["embroidery.updated_blocks.design"].split(",")) > len(style)
    assert meta["embroidery.trigger"] == "emb" and meta["ss_network_dim"] == "4"

    server.free()
    before = len(server.log_text())
    stock = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": name,
                                                    "strength_model": 1.0, "strength_clip": 1.0}}
    server.run(sampling_graph(ckpt, stock), timeout=300)
    assert "lora key not loaded" not in server.log_text()[before:]


def test_api_prompt_with_style_blocks_loader(server):
    history = server.run(training_graph("tiny_sd15.safetensors", "embroidery/for_loader", stage1=1, stage2=2),
                         timeout=600)
    name, _ = _saved_lora_path(server, history)
    loader = {"class_type": "EmbroideryStyleBlocksLoader", "inputs": {
        "model": ["1", 0], "lora_name": name, "blocks": "emolora_style", "custom_blocks": "", "strength": 1.0}}
    result = server.run(sampling_graph("tiny_sd15.safetensors", loader), timeout=300)
    assert len(server.output_images(result)) == 1

    bad = json.loads(json.dumps(sampling_graph("tiny_sd15.safetensors", loader)))
    bad["2"]["inputs"]["blocks"] = "custom"
    bad["2"]["inputs"]["custom_blocks"] = "output_blocks.0.1"  # SD1.5 has no attention there
    with pytest.raises(PromptFailed, match="Load Style Blocks of a LoRA: this sd15 model has no attention block"):
        server.run(bad, timeout=120)


def test_cancel_stops_training_and_leaves_no_file(server):
    loras = os.path.join(server.base_dir, "models", "loras")
    before = {os.path.join(d, f) for d, _, files in os.walk(loras) for f in files}
    graph = training_graph("tiny_sd15.safetensors", "embroidery/cancelled", stage1=400)
    graph["4"]["inputs"]["preview_every"] = 1
    prompt_id = server.post_prompt(graph)
    deadline = time.time() + 300
    while "embroidery training step 2/400" not in server.log_text():
        assert time.time() < deadline, server.log_tail()
        time.sleep(0.2)
    server.request("/interrupt", {})
    with pytest.raises(PromptFailed, match="interrupted"):
        server.wait(prompt_id, timeout=120)
    after = {os.path.join(d, f) for d, _, files in os.walk(loras) for f in files}
    assert after == before  # no LoRA, no checkpoint (checkpoint_every 0), no temp file


def test_templates_and_their_thumbnails_are_served(server, pack_dir):
    """What the template browser asks for (Workflow > Browse Templates on 0.3.x, Templates >
    Extensions on 0.8): the list, each template, and the <name>.jpg of its card."""
    listed = server.request("/api/workflow_templates")[PACK_LINK]
    on_disk = sorted(p.stem for p in (pack_dir / "workflows").glob("*.json"))
    assert sorted(listed) == on_disk
    for name in listed:
        assert server.request(f"/api/workflow_templates/{PACK_LINK}/{name}.json")["nodes"]
        assert server.request(f"/api/workflow_templates/{PACK_LINK}/{name}.jpg", raw=True)[:3] == b"\xff\xd8\xff"


def _loader(lora_name, strength=1.0):
    return {"class_type": "EmbroideryStyleBlocksLoader", "inputs": {
        "model": ["1", 0], "lora_name": lora_name, "blocks": "emolora_style", "custom_blocks": "",
        "strength": strength}}


def test_api_mistakes_are_refused_with_the_node_and_the_fix(server):
    """A NaN sent through the API passes the server's min/max check; an SDXL LoRA on SD1.5 used to
    "succeed" half-applied with the log full of shape errors."""
    server.free()
    before = len(server.log_text())
    with pytest.raises((PromptFailed, PromptRejected), match="strength"):
        server.run(sampling_graph("tiny_sd15.safetensors", _loader("it_sd15.safetensors", float("nan"))))
    with pytest.raises(PromptFailed, match=r"Load Style Blocks of a LoRA: it_sdxl.safetensors is a LoRA for SDXL"):
        server.run(sampling_graph("tiny_sd15.safetensors", _loader("it_sdxl.safetensors")))
    assert "ERROR lora" not in server.log_text()[before:]  # nothing was half-applied
    result = server.run(sampling_graph("tiny_sd15.safetensors", _loader("it_sd15.safetensors")))
    assert len(server.output_images(result)) == 1
