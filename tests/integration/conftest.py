"""Fixtures for the integration tests. Imports nothing from ComfyUI at collection time.

Tiny model files are written once into a cache ($COMFY_IT_MODEL_CACHE, default
<tempdir>/comfy-it-models) and rewritten only when tiny_models.FORMAT_VERSION changes;
each session gets its own models dir that links to them, so tests may add files
(LoRAs, ...) to it without touching the cache.
"""
import asyncio
import os
import pathlib
import tempfile

import pytest

from .comfy_env import comfy_path, import_comfy, require_comfy


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts a ComfyUI server (seconds); deselect with -m 'not slow'")
    config.addinivalue_line("markers", "ui: drives the web frontend in headless Chromium")


def _cache_dir():
    return pathlib.Path(os.environ.get("COMFY_IT_MODEL_CACHE") or os.path.join(tempfile.gettempdir(), "comfy-it-models"))


def _link(models, rel, cached):
    dest = models / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        dest.symlink_to(cached)
    return dest


@pytest.fixture(scope="session")
def comfy():
    """The ComfyUI tree, importable in-process in CPU mode (skips without COMFYUI_PATH)."""
    require_comfy()
    import_comfy()
    return comfy_path()


@pytest.fixture(scope="session")
def tiny_ckpt_dir(comfy, tmp_path_factory):
    """A models dir: checkpoints/tiny_sd15.safetensors (detected as SD15),
    controlnet/tiny_sd15_controlnet.safetensors and an empty loras/."""
    from . import tiny_models
    cache = _cache_dir()
    models = tmp_path_factory.mktemp("models")
    _link(models, "checkpoints/tiny_sd15.safetensors",
          tiny_models.write_tiny_checkpoint("sd15", cache / "tiny_sd15.safetensors"))
    _link(models, "controlnet/tiny_sd15_controlnet.safetensors",
          tiny_models.write_tiny_controlnet("sd15", cache / "tiny_sd15_controlnet.safetensors"))
    (models / "loras").mkdir()
    return models


@pytest.fixture(scope="session")
def tiny_sdxl_ckpt(tiny_ckpt_dir):
    """Adds checkpoints/tiny_sdxl.safetensors (Segmind_Vega, ~1.9 GB, ~20 s the first time)
    and controlnet/tiny_sdxl_controlnet.safetensors to tiny_ckpt_dir; the checkpoint path."""
    from . import tiny_models
    cache = _cache_dir()
    _link(tiny_ckpt_dir, "controlnet/tiny_sdxl_controlnet.safetensors",
          tiny_models.write_tiny_controlnet("sdxl", cache / "tiny_sdxl_controlnet.safetensors"))
    return _link(tiny_ckpt_dir, "checkpoints/tiny_sdxl.safetensors",
                 tiny_models.write_tiny_checkpoint("sdxl", cache / "tiny_sdxl.safetensors"))


@pytest.fixture(scope="session")
def pack_dir():
    """The node pack's root folder (the repository root)."""
    return pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def pack(comfy, pack_dir):
    """The pack loaded through ComfyUI's own loader; its node classes by id."""
    import sys

    import nodes

    if str(pack_dir).replace(".", "_x_") not in sys.modules:
        assert asyncio.run(nodes.load_custom_node(str(pack_dir))), "ComfyUI could not load the pack"
    return {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("Embroidery")}


@pytest.fixture
def loras_dir(comfy, tmp_path):
    import folder_paths

    folder_paths.add_model_folder_path("loras", str(tmp_path), is_default=True)
    folder_paths.filename_list_cache.pop("loras", None)
    yield tmp_path
    folder_paths.folder_names_and_paths["loras"][0].remove(str(tmp_path))
    folder_paths.filename_list_cache.pop("loras", None)
