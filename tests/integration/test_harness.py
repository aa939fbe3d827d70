"""Self-tests of the integration infrastructure: tiny models, the server, the UI runner.

Each test fails if the piece it covers breaks, so a failure elsewhere in tests/integration
can be told apart from a broken harness."""
import json
import struct

import pytest

from .comfy_env import require_comfy

require_comfy()

from . import tiny_models  # noqa: E402
from .server import PromptFailed, PromptRejected, comfy_server  # noqa: E402
from .ui import run_ui_workflow, ui_unavailable_reason  # noqa: E402

# attention blocks each tiny family must have (ComfyUI / SGM names), and some it must not
BLOCKS = {
    "sd15": (["input_blocks.{}.1".format(i) for i in (1, 2, 4, 5, 7, 8)] + ["middle_block.1"]
             + ["output_blocks.{}.1".format(i) for i in range(3, 12)],
             ["input_blocks.10.1", "output_blocks.0.1", "output_blocks.2.1"]),
    "sdxl": (["input_blocks.{}.1".format(i) for i in (4, 5, 7, 8)] + ["middle_block.1"]
             + ["output_blocks.{}.1".format(i) for i in range(6)],
             ["input_blocks.1.1", "output_blocks.6.1", "output_blocks.8.1"]),
}

TXT2IMG_API = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "3": {"class_type": "KSampler", "inputs": {
        "seed": 1, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "harness_api", "images": ["8", 0]}},
}


def _ui_node(node_id, node_type, pos, inputs=(), outputs=(), widgets=None):
    """One node of a UI-format graph. inputs: (name, type, link id); outputs: (name, type, [link ids])."""
    return {"id": node_id, "type": node_type, "pos": list(pos), "size": [300, 120], "flags": {}, "order": node_id,
            "mode": 0, "properties": {"Node name for S&R": node_type},
            "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
            "outputs": [{"name": n, "type": t, "links": links} for n, t, links in outputs],
            "widgets_values": widgets if widgets is not None else []}


# the TXT2IMG_API graph as the frontend stores it (another seed, so the sampler runs again;
# "randomize" so the runner has a seed control to pin)
TXT2IMG_UI = {
    "last_node_id": 7, "last_link_id": 9, "version": 0.4, "groups": [], "config": {}, "extra": {},
    "nodes": [
        _ui_node(1, "CheckpointLoaderSimple", (0, 0), outputs=[("MODEL", "MODEL", [1]), ("CLIP", "CLIP", [2, 3]),
                                                               ("VAE", "VAE", [8])],
                 widgets=["tiny_sd15.safetensors"]),
        _ui_node(2, "CLIPTextEncode", (350, 0), inputs=[("clip", "CLIP", 2)],
                 outputs=[("CONDITIONING", "CONDITIONING", [4])], widgets=["a red cube"]),
        _ui_node(3, "CLIPTextEncode", (350, 200), inputs=[("clip", "CLIP", 3)],
                 outputs=[("CONDITIONING", "CONDITIONING", [5])], widgets=["blurry"]),
        _ui_node(4, "EmptyLatentImage", (350, 400), outputs=[("LATENT", "LATENT", [6])], widgets=[64, 64, 1]),
        _ui_node(5, "KSampler", (700, 0),
                 inputs=[("model", "MODEL", 1), ("positive", "CONDITIONING", 4), ("negative", "CONDITIONING", 5),
                         ("latent_image", "LATENT", 6)],
                 outputs=[("LATENT", "LATENT", [7])], widgets=[7, "randomize", 2, 5.0, "euler", "normal", 1.0]),
        _ui_node(6, "VAEDecode", (1050, 0), inputs=[("samples", "LATENT", 7), ("vae", "VAE", 8)],
                 outputs=[("IMAGE", "IMAGE", [9])]),
        _ui_node(7, "SaveImage", (1400, 0), inputs=[("images", "IMAGE", 9)], widgets=["harness_ui"]),
    ],
    # [link id, from node, from slot, to node, to slot, type]
    "links": [[1, 1, 0, 5, 0, "MODEL"], [2, 1, 1, 2, 0, "CLIP"], [3, 1, 1, 3, 0, "CLIP"],
              [4, 2, 0, 5, 1, "CONDITIONING"], [5, 3, 0, 5, 2, "CONDITIONING"], [6, 4, 0, 5, 3, "LATENT"],
              [7, 5, 0, 6, 0, "LATENT"], [8, 1, 2, 6, 1, "VAE"], [9, 6, 0, 7, 0, "IMAGE"]],
}

FAILING_PACK = '''
class HarnessAlwaysFails:
    """Raises on purpose: checks that custom packs load and execution errors come back."""
    CATEGORY = "testing"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    def run(self, image):
        raise ValueError("harness node asked to fail")


NODE_CLASS_MAPPINGS = {"HarnessAlwaysFails": HarnessAlwaysFails}
'''


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "{} is not a PNG".format(path)
    return struct.unpack(">II", head[16:24])


# ---------------------------------------------------------------- in-process

@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_tiny_patcher_layout_and_one_step(comfy, family):
    import torch
    import comfy.supported_models
    registered = list(comfy.supported_models.models)
    patcher = tiny_models.tiny_patcher(family)
    assert comfy.supported_models.models == registered, "tiny_patcher changed the detection list"
    model = patcher.model
    assert type(model).__name__ == {"sd15": "BaseModel", "sdxl": "SDXL"}[family]
    names = {k.rsplit(".transformer_blocks.", 1)[0] for k in model.diffusion_model.state_dict() if ".transformer_blocks." in k}
    present, absent = BLOCKS[family]
    assert set(present) == names and not names & set(absent)

    cond = tiny_models.tiny_conditioning(family, batch=2)
    x, sigma = torch.randn(2, 4, 16, 16), torch.tensor([1.0, 5.0])
    kwargs = {}
    if family == "sdxl":
        kwargs["y"] = model.encode_adm(pooled_output=cond[0][1]["pooled_output"], width=128, height=128)
        assert kwargs["y"].shape == (2, 2816)
    with torch.inference_mode():
        out = model.apply_model(x, sigma, c_crossattn=cond[0][0], **kwargs)
        again = tiny_models.tiny_patcher(family).model.apply_model(x, sigma, c_crossattn=cond[0][0], **kwargs)
        other = tiny_models.tiny_patcher(family, seed=1).model.apply_model(x, sigma, c_crossattn=cond[0][0], **kwargs)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(out, again), "same seed must give the same weights"
    assert not torch.allclose(out, other), "another seed must give other weights"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_tiny_patcher_samples_with_comfy_sampler(comfy, family):
    import torch
    import comfy.sample
    patcher = tiny_models.tiny_patcher(family)
    latent = torch.zeros(1, 4, 16, 16)
    noise = comfy.sample.prepare_noise(latent, 0)
    with torch.inference_mode():
        out = comfy.sample.sample(patcher, noise, 2, 3.0, "euler", "normal",
                                  tiny_models.tiny_conditioning(family, 0), tiny_models.tiny_conditioning(family, 1),
                                  latent, disable_pbar=True, seed=0)
    assert out.shape == latent.shape and torch.isfinite(out).all()


def test_conditioning_shapes(comfy):
    (cond, extra), = tiny_models.tiny_conditioning("sd15", batch=2, tokens=10)
    assert tuple(cond.shape) == (2, 10, 768) and extra == {}
    (cond, extra), = tiny_models.tiny_conditioning("sdxl")
    assert tuple(cond.shape) == (1, 77, 2048) and tuple(extra["pooled_output"].shape) == (1, 1280)
    with pytest.raises(ValueError, match="family"):
        tiny_models.tiny_conditioning("flux")


def test_sd15_checkpoint_detected_with_vae_and_clip(comfy, tiny_ckpt_dir):
    import os
    import torch
    import comfy.controlnet
    import comfy.sd
    ckpt = tiny_ckpt_dir / "checkpoints" / "tiny_sd15.safetensors"
    assert tiny_models.verify_checkpoint(ckpt) == "SD15"

    mtime = os.path.getmtime(ckpt)
    tiny_models.write_tiny_checkpoint("sd15", os.path.realpath(ckpt))  # current: kept as is
    assert os.path.getmtime(ckpt) == mtime

    _, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt))
    assert type(vae.first_stage_model).__name__ == "TAESD"
    with torch.inference_mode():
        cond = clip.encode_from_tokens(clip.tokenize("a red cube"))
        image = vae.decode(torch.zeros(1, 4, 8, 8))
    assert tuple(cond.shape) == (1, 77, 768)
    assert tuple(image.shape) == (1, 64, 64, 3)
    assert comfy.controlnet.load_controlnet(str(tiny_ckpt_dir / "controlnet" / "tiny_sd15_controlnet.safetensors"))


def test_stale_cache_is_rewritten(comfy, tmp_path):
    import torch
    from safetensors.torch import save_file
    path = str(tmp_path / "old.safetensors")
    save_file({"x": torch.zeros(1)}, path, metadata={tiny_models.METADATA_KEY: json.dumps({"format_version": 0})})
    assert not tiny_models._is_current(path, tiny_models._stamp("controlnet", "sd15"))
    tiny_models.write_tiny_controlnet("sd15", path)
    assert tiny_models._is_current(path, tiny_models._stamp("controlnet", "sd15"))


# ---------------------------------------------------------------- server and UI

@pytest.fixture(scope="module")
def bare_server(tiny_ckpt_dir):
    """ComfyUI with no custom node pack at all."""
    with comfy_server(custom_nodes=[], models_dir=tiny_ckpt_dir) as srv:
        yield srv


@pytest.mark.slow
def test_server_runs_api_prompt(bare_server):
    info = bare_server.object_info()
    assert "KSampler" in info and "tiny_sd15.safetensors" in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    history = bare_server.run(TXT2IMG_API, timeout=180)
    images = bare_server.output_images(history)
    assert len(images) == 1 and png_size(images[0]) == (64, 64)

    bad = json.loads(json.dumps(TXT2IMG_API))
    bad["3"]["inputs"]["sampler_name"] = "no_such_sampler"
    with pytest.raises(PromptRejected, match="value_not_in_list"):
        bare_server.post_prompt(bad)


@pytest.mark.slow
@pytest.mark.ui
def test_ui_runner_runs_ui_workflow(bare_server, tmp_path):
    reason = ui_unavailable_reason()
    if reason:
        pytest.skip(reason)
    wf = tmp_path / "txt2img_ui.json"
    wf.write_text(json.dumps(TXT2IMG_UI))
    report = run_ui_workflow(bare_server, wf, tmp_path / "ui", timeout=240)
    assert report["ok"], json.dumps(report, indent=1)[:4000]
    assert report["missing_nodes"] == [] and report["page_errors"] == [] and report["dialogs"] == []
    assert report["blocked_requests"] == [] and report["seed_controls_fixed"] == 1
    assert (tmp_path / "ui" / "ui_screenshot.png").stat().st_size > 10000

    # what the frontend queued is the API graph, with the UI file's widget values
    entry = bare_server.request("/history/" + report["prompt_id"])[report["prompt_id"]]
    prompt = entry["prompt"][2]
    assert sorted(n["class_type"] for n in prompt.values()) == sorted(n["class_type"] for n in TXT2IMG_API.values())
    sampler = next(n["inputs"] for n in prompt.values() if n["class_type"] == "KSampler")
    assert (sampler["seed"], sampler["steps"], sampler["cfg"], sampler["sampler_name"]) == (7, 2, 5.0, "euler")
    images = bare_server.output_images(entry)
    assert len(images) == 1 and png_size(images[0]) == (64, 64) and "harness_ui" in images[0]


@pytest.mark.slow
def test_server_loads_a_pack_and_reports_node_errors(tmp_path):
    pack = tmp_path / "harness_failing_pack"
    pack.mkdir()
    (pack / "__init__.py").write_text(FAILING_PACK)
    graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
             "2": {"class_type": "HarnessAlwaysFails", "inputs": {"image": ["1", 0]}},
             "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    with comfy_server(custom_nodes=[pack]) as srv:
        assert "HarnessAlwaysFails" in srv.object_info()
        with pytest.raises(PromptFailed, match=r"(?s)HarnessAlwaysFails.*harness node asked to fail"):
            srv.run(graph, timeout=60)
        assert "IMPORT FAILED" not in "\n".join(l for l in srv.log_text().splitlines() if "harness_failing_pack" in l)
