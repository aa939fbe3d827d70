"""Every template in workflows/ loads in the real ComfyUI frontend (headless Chromium) with no
missing node, queues, and runs to a saved image on tiny random-weight models. The public model
names in the files are mapped to the tiny ones, and sizes/steps are shrunk for CPU."""
import copy
import glob
import json
import os
import re

import pytest

from embroidery_core.lora_file import load_lora
from tests.workflow_format import SUPPORTED_VERSIONS, load_snapshot, set_widget, widget_slots

from .server import comfy_server
from .tiny_models import write_tiny_loras
from .test_server_training import PACK_LINK, _write_reference
from .ui import run_ui_workflow, ui_unavailable_reason

pytestmark = [pytest.mark.slow, pytest.mark.ui]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))
REFERENCE = "embroidery_reference.png"
TINY = {"sd15": {"ckpt": "tiny_sd15.safetensors", "controlnet": "tiny_sd15_controlnet.safetensors"},
        "sdxl": {"ckpt": "tiny_sdxl.safetensors", "controlnet": "tiny_sdxl_controlnet.safetensors"}}
# (node type, widget) -> value small enough for a CPU run
SHRINK = {
    ("EmbroideryAnalogyPair", "resolution"): 64, ("EmbroideryFindStyleBlocks", "timesteps"): 2,
    ("EmbroideryTrainStage1", "iterations"): 2, ("EmbroideryTrainStage1", "rank"): 4,
    ("EmbroideryTrainStage1", "alpha"): 4.0, ("EmbroideryTrainStage1", "checkpoint_every"): 1,
    ("EmbroideryTrainStage1", "preview_every"): 1,
    ("EmbroideryTrainStage2", "iterations"): 2, ("EmbroideryTrainStage2", "sample_steps"): 2,
    ("EmbroideryTrainStage2", "subjects"): "red apple\nblue bird", ("EmbroideryTrainStage2", "checkpoint_every"): 0,
    ("KSampler", "steps"): 2, ("EmptyLatentImage", "width"): 64, ("EmptyLatentImage", "height"): 64,
    ("ImageScaleToTotalPixels", "megapixels"): 0.01,
    ("EmbroideryTrainPairCustomization", "iterations"): 2, ("EmbroideryTrainPairCustomization", "rank"): 4,
    ("EmbroideryTrainPairCustomization", "resolution"): 64, ("EmbroideryTrainPairCustomization", "style_start"): 1,
    ("EmbroideryTrainPairCustomization", "accumulate"): 1, ("EmbroideryTrainPairCustomization", "checkpoint_every"): 1,
    ("EmbroideryTrainLoRA", "iterations"): 2, ("EmbroideryTrainLoRA", "rank"): 4,
    ("EmbroideryTrainLoRA", "checkpoint_every"): 1,
    ("EmbroideryInvert", "steps"): 3, ("ImageScale", "width"): 64, ("ImageScale", "height"): 64,
    ("EmbroideryStyleGallery", "preset"): "fast",
}
SCALE = 1 / 16  # mask canvases shrink with the 1024 px images (1024 -> 64)


# LoRA names the style templates use; the test writes tiny SDXL-family LoRAs under them, and
# SD1.5 ones under sd15/<name> for the templates that also run on SD1.5.
TEMPLATE_LORAS = ("embroidery/emolora_00001.safetensors", "embroidery/emolora_00002.safetensors",
                  "blora_content.safetensors")
SD15_LORAS = "sd15"


@pytest.fixture(scope="module")
def server(tiny_ckpt_dir, tiny_sdxl_ckpt, pack_dir):
    reason = ui_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with comfy_server(custom_nodes=[(PACK_LINK, pack_dir)], models_dir=tiny_ckpt_dir) as srv:
        _write_reference(os.path.join(srv.base_dir, "input", REFERENCE))
        write_tiny_loras(tiny_sdxl_ckpt, os.path.join(srv.base_dir, "models", "loras"), TEMPLATE_LORAS)
        write_tiny_loras(tiny_ckpt_dir / "checkpoints" / TINY["sd15"]["ckpt"],
                         os.path.join(srv.base_dir, "models", "loras", SD15_LORAS), TEMPLATE_LORAS, family="sd15")
        yield srv


def retarget(workflow, family, info):
    wf = copy.deepcopy(workflow)
    for node in wf["nodes"]:
        slots = widget_slots(info, node["type"]) if node["type"] in info else []
        for (kind, name), value in SHRINK.items():
            if node["type"] == kind and name in slots:
                set_widget(node, name, value, info)
        if "ckpt_name" in slots:
            set_widget(node, "ckpt_name", TINY[family]["ckpt"], info)
        if "control_net_name" in slots:
            set_widget(node, "control_net_name", TINY[family]["controlnet"], info)
        if node["type"] == "SolidMask":
            for name in ("width", "height"):
                set_widget(node, name, int(node["widgets_values"][slots.index(name)] * SCALE), info)
        if node["type"] == "LoadImage":
            set_widget(node, "image", REFERENCE, info)
        if family == "sd15" and isinstance(node.get("widgets_values"), list):
            node["widgets_values"] = [f"{SD15_LORAS}/{v}" if v in TEMPLATE_LORAS else v for v in node["widgets_values"]]
    return wf


def test_snapshot_matches_the_live_server(server):
    """tests/data/object_info_<version>.json (what CI validates against) is this ComfyUI + pack:
    one snapshot per supported version, and the pack's own nodes the same in all of them."""
    version = server.request("/system_stats")["system"]["comfyui_version"]
    assert version in SUPPORTED_VERSIONS, (f"ComfyUI {version} has no object_info snapshot; record one with "
                                           "scripts/build_workflows.py and add it to SUPPORTED_VERSIONS")
    live, stored = server.object_info(), load_snapshot(version)
    for node_type, spec in load_snapshot().items():  # the pack's nodes look the same on every version
        if node_type.startswith("Embroidery"):
            assert {k: stored[node_type].get(k) for k in spec} == spec, node_type
    for node_type, spec in stored.items():
        assert node_type in live, node_type
        assert live[node_type]["input_order"] == spec["input_order"], node_type
        assert live[node_type]["output"] == spec["output"], node_type
        for section in ("required", "optional"):
            for name, want in spec["input"].get(section, {}).items():
                got = live[node_type]["input"][section][name]
                assert (got[0] if isinstance(got[0], str) else "list") == (want[0] if isinstance(want[0], str) else "list")


# The templates are SDXL (the paper's base); the training ones are also run on SD1.5, and so is
# DiffStyler and StyleGallery (SD1.5 methods whose templates load an SD1.5 checkpoint).
TRAINING = ("train_one_shot", "pair_customization", "blora_train", "diffstyler", "stylegallery")
CASES = [(path, "sdxl") for path in WORKFLOWS] + [(p, "sd15") for p in WORKFLOWS if any(t in p for t in TRAINING)]


def _newest(folder: str, prefix: str) -> str:
    files = [os.path.join(folder, f) for f in os.listdir(folder) if f.startswith(prefix)]
    return max(files, key=os.path.getmtime)


@pytest.mark.parametrize("path,family", CASES, ids=lambda v: os.path.basename(v) if os.path.sep in str(v) else v)
def test_template_runs_in_the_frontend(server, path, family, tmp_path):
    info = load_snapshot()
    with open(path) as f:
        wf = retarget(json.load(f), family, info)
    target = tmp_path / os.path.basename(path)
    target.write_text(json.dumps(wf))
    report = run_ui_workflow(server, target, tmp_path / "ui", timeout=900)
    assert report["ok"], json.dumps(report, indent=1)[:4000]
    assert report["missing_nodes"] == [] and report["page_errors"] == [] and report["dialogs"] == []
    saved = [i for i in report["images"] if i.get("type") == "output"]
    assert saved, "the template saved no image"
    keep = os.environ.get("EMBROIDERY_SCREENSHOTS")  # pictures of the graphs for the README
    if keep and family == "sdxl":
        from PIL import Image

        picture = Image.open(report["screenshot"]).convert("RGB")
        picture.thumbnail((1280, 720))
        os.makedirs(keep, exist_ok=True)
        picture.save(os.path.join(keep, os.path.basename(path).replace(".json", ".png")), optimize=True)
    if "train_one_shot" in path:
        loras = os.path.join(server.base_dir, "models", "loras", "embroidery")
        newest = max((os.path.join(loras, f) for f in os.listdir(loras)), key=os.path.getmtime)
        lora = load_lora(newest)
        assert lora.arch == family and lora.metadata["embroidery.stage"] == "2"
        style = lora.metadata["embroidery.style_blocks"].split(",")
        assert lora.metadata["embroidery.updated_blocks.embroidery"].split(",") == style
        checkpoints = os.listdir(os.path.join(server.base_dir, "models", "loras", "embroidery_checkpoints"))
        assert any(re.fullmatch(r"emb_stage1_[0-9a-f]{8}\.safetensors", name) for name in checkpoints), checkpoints
    loras = os.path.join(server.base_dir, "models", "loras", "embroidery")
    if "pair_customization" in path:
        style, content = (load_lora(_newest(loras, f"pair_{group}")) for group in ("style", "content"))
        assert style.arch == content.arch == family
        assert style.metadata["embroidery.method"] == "pair_customization"
        assert (style.metadata["embroidery.pair_group"], content.metadata["embroidery.pair_group"]) == ("style",
                                                                                                       "content")
    if "blora_train" in path:
        for part in ("content", "style"):
            lora = load_lora(_newest(loras, f"blora_{part}"))
            assert lora.arch == family and lora.metadata["embroidery.recipe"] == "b_lora"
            assert lora.metadata["embroidery.content_blocks"] and lora.metadata["embroidery.style_blocks"]
