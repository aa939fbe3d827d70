"""What every node of the pack shares: custom types, model-family detection, block lists,
LoRA file lookup and error messages that name the node and the fix."""
from __future__ import annotations

import functools
import inspect
import math
import os
import threading

import folder_paths
from comfy_api.latest import io

from ..embroidery_core import blocks as block_map
from ..embroidery_core.lora_file import StyleLoRA, load_lora, require_fit

CATEGORY = "embroidery"

# The in-memory LoRA a trainer produces (embroidery_core.lora_file.StyleLoRA).
StyleLoRAType = io.Custom("EMBROIDERY_STYLE_LORA")
# An image-analogy pair (embroidery_core.pair.AnalogyPair).
AnalogyPairType = io.Custom("EMBROIDERY_ANALOGY_PAIR")

PRESET_CUSTOM = "custom"
BLOCK_PRESETS = block_map.preset_names() + [PRESET_CUSTOM]


class NodeInputError(ValueError):
    """A user-fixable problem; the message starts with the node's name."""

    def __init__(self, node: str, message: str):
        super().__init__(f"{node}: {message}")


def check_finite_inputs(inputs: dict, node) -> None:
    """A NaN or inf sent through the API passes ComfyUI's min/max check (every comparison with
    NaN is false) and would end as a black image; refuse it before any work. ``node``: the
    node's name, or a function returning it."""
    for name, value in inputs.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise NodeInputError(node() if callable(node) else node, f"{name} is {value}; give it a finite number")


def _guarded(execute):
    """``execute`` with its float inputs checked first, and any ValueError from below (the core's
    messages say what is wrong and the fix) prefixed with the node's display name."""

    signature = inspect.signature(execute)
    spread = [p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD]  # e.g. **regions

    @functools.wraps(execute)
    def run(cls, *args, **kwargs):
        # define_schema, not GET_SCHEMA: ComfyUI 0.8 runs a locked clone, on which GET_SCHEMA's
        # caching assignment raises; and only on an error, so a normal run pays nothing
        node = lambda: cls.define_schema().display_name  # noqa: E731
        inputs = dict(signature.bind_partial(cls, *args, **kwargs).arguments)
        for name in spread:
            inputs.update(inputs.pop(name, {}))
        check_finite_inputs(inputs, node)
        try:
            return execute(cls, *args, **kwargs)
        except NodeInputError:
            raise
        except ValueError as e:
            raise NodeInputError(node(), str(e)) from e

    run.embroidery_guarded = True
    return run


class PackNode(io.ComfyNode):
    """Base of every node of the pack: errors name the node everywhere, not case by case."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        execute = cls.__dict__.get("execute")
        # ComfyUI clones node classes per run (shallow_clone_class): wrap once, not per clone
        if isinstance(execute, classmethod) and not getattr(execute.__func__, "embroidery_guarded", False):
            cls.execute = classmethod(_guarded(execute.__func__))


def check_choice(value: str, options: list[str], name: str, node: str) -> str:
    """ComfyUI 0.3.64 does not check V3 combo values (0.8 does, before execute); a value from an
    old workflow must not silently mean something else on the older server."""
    if value not in options:
        raise NodeInputError(node, f"{name} {value!r} is not one of {options}")
    return value


def model_family(model, node: str) -> block_map.Arch:
    """The block layout of a MODEL (SD1.x/2.x -> sd15, SDXL family -> sdxl), read from the
    actual UNet config so tiny or distilled variants map their real blocks."""
    import comfy.model_base

    base = model.model
    config = getattr(base.model_config, "unet_config", {})
    if isinstance(base, comfy.model_base.SDXL):
        family = "sdxl"
    elif type(base) is comfy.model_base.BaseModel and config.get("adm_in_channels") is None and "num_res_blocks" in config:
        family = "sd15"
    else:
        raise NodeInputError(node, f"{type(base).__name__} models are not supported; "
                                   "load an SD1.5/SD2.x or SDXL-family checkpoint")
    try:
        return block_map.arch_from_unet_config(family, config)
    except (KeyError, ValueError) as e:
        raise NodeInputError(node, f"cannot read the UNet layout of this {family} model ({e})") from e


def resolve_blocks(preset: str, custom: str, arch: block_map.Arch, node: str) -> list[str]:
    """A preset name or a custom list (any spelling) -> LDM blocks that exist in this model."""
    if preset not in BLOCK_PRESETS:
        raise NodeInputError(node, f"unknown block preset {preset!r}; choose one of {BLOCK_PRESETS}")
    try:
        chosen = block_map.parse_block_list(custom) if preset == PRESET_CUSTOM else arch.preset(preset)
    except ValueError as e:
        raise NodeInputError(node, str(e)) from e
    if not chosen:
        raise NodeInputError(node, "the custom block list is empty; write blocks like 'output_blocks.1.1, input_blocks.8.1'")
    available = arch.attention_blocks()
    missing = [b for b in chosen if b not in available]
    if missing:
        raise NodeInputError(node, f"this {arch.name} model has no attention block {', '.join(missing)}; "
                                   f"its attention blocks are {', '.join(available)}")
    return chosen


def parse_block_strengths(text: str, node: str, loaded: list[str] | None = None) -> dict[str, float]:
    """'output_blocks.1.1=0.8, input_blocks.8.1=0' -> {block: strength}; with ``loaded``, a block
    that is not among them is an error (it would silently do nothing)."""
    strengths = {}
    for part in text.replace(";", ",").replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError("missing '='")
            strength = float(value)
            if not math.isfinite(strength):
                raise ValueError("not a finite number")
            strengths[block_map.normalize_block(name)] = strength
        except ValueError as e:
            raise NodeInputError(node, f"cannot read block strength {part!r} ({e}); "
                                       "write 'output_blocks.1.1=0.8, input_blocks.8.1=0'") from e
    unknown = [b for b in strengths if loaded is not None and b not in loaded]
    if unknown:
        raise NodeInputError(node, f"block_strengths names {', '.join(unknown)}, which this node does not load; "
                                   f"the loaded blocks are {', '.join(loaded)} (change blocks, or the names)")
    return strengths


# ---------------------------------------------------------------------------- LoRA files

_lora_cache: dict[tuple, StyleLoRA] = {}
_lora_cache_lock = threading.Lock()


def lora_path(name: str, node: str) -> str:
    try:
        return folder_paths.get_full_path_or_raise("loras", name)
    except FileNotFoundError:
        raise NodeInputError(node, f"LoRA file {name!r} is not in any 'loras' folder; "
                                   "put it in models/loras and press R to refresh the list") from None


def file_fingerprint(path: str) -> str:
    stat = os.stat(path)
    return f"{path}:{stat.st_mtime_ns}:{stat.st_size}"


def weight_shapes(model) -> dict[str, tuple[int, ...]]:
    """{UNet module path: weight shape} of a MODEL, what a LoRA must fit."""
    return {k[: -len(".weight")]: tuple(v.shape) for k, v in model.model.diffusion_model.state_dict().items()
            if k.endswith(".weight")}


def load_model_lora(name: str, model, node: str) -> StyleLoRA:
    """A LoRA file checked against ``model`` before anything is patched: its family (metadata),
    every module's shape (another family or width is refused, not half-applied), finite weights."""
    arch = model_family(model, node)
    return require_fit(load_lora_file(name, arch.name, node), weight_shapes(model), arch.name, what=name)


def load_lora_file(name: str, arch: str | None, node: str) -> StyleLoRA:
    """Parse a LoRA from the loras folder once per (file version, family)."""
    path = lora_path(name, node)
    key = (file_fingerprint(path), arch)
    with _lora_cache_lock:
        if key in _lora_cache:
            return _lora_cache[key]
    lora = load_lora(path, arch=arch)  # its ValueErrors reach the user through PackNode, named
    with _lora_cache_lock:
        if len(_lora_cache) > 16:
            _lora_cache.clear()
        _lora_cache[key] = lora
    return lora


def lora_fingerprint(name: str) -> str:
    """For ``fingerprint_inputs``: re-run when the file on disk changes, not only its name."""
    try:
        return file_fingerprint(folder_paths.get_full_path_or_raise("loras", name))
    except (FileNotFoundError, OSError):
        return f"missing:{name}"


def lora_blocks(model, lora_name: str, preset: str, custom: str, node: str) -> tuple[list[str], StyleLoRA]:
    """The chosen blocks of a LoRA file, for this model's family; an error that lists the blocks
    the file does touch when it has none of the chosen ones."""
    chosen = resolve_blocks(preset, custom, model_family(model, node), node)
    lora = load_model_lora(lora_name, model, node)
    selected = lora.filter_blocks(chosen)
    if not selected.modules:
        raise NodeInputError(node, f"{lora_name} has no weights in {', '.join(chosen)}; it touches "
                                   f"{', '.join(lora.blocks()) or 'no UNet block'}. Pick blocks it has "
                                   "(Inspect LoRA Blocks lists them).")
    return chosen, selected


def connected_lora_blocks(model, lora: StyleLoRA, preset: str, custom: str, node: str) -> StyleLoRA:
    """The chosen blocks of a LoRA connected from a trainer node, checked against ``model`` as a
    file would be (family, every module's shape, finite weights)."""
    arch = model_family(model, node)
    chosen = resolve_blocks(preset, custom, arch, node)
    require_fit(lora, weight_shapes(model), arch.name, what="the connected LoRA")
    selected = lora.filter_blocks(chosen)
    if not selected.modules:
        raise NodeInputError(node, f"the connected LoRA has no weights in {', '.join(chosen)}; it touches "
                                   f"{', '.join(lora.blocks()) or 'no UNet block'}. Pick blocks it has.")
    return selected


def apply_lora_patches(model, lora: StyleLoRA, strength: float, node: str):
    """Clone ``model`` and add the LoRA as ordinary weight patches (no sampling overhead)."""
    import comfy.lora
    from ..embroidery_core.lora_file import to_kohya_state_dict

    state = to_kohya_state_dict(lora)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(state, key_map, log_missing=False)
    if len(patches) != len(lora.modules):
        raise NodeInputError(node, f"only {len(patches)} of {len(lora.modules)} LoRA modules match this model's "
                                   "weights; is the LoRA for another model family?")
    patched = model.clone()
    patched.add_patches(patches, strength)
    return patched
