"""One map of UNet block names, used by every node and test.

Three spellings name the same attention block:

- diffusers / PEFT:  ``up_blocks.0.attentions.1``
- ComfyUI / LDM:     ``output_blocks.1.1``   (what ComfyUI's ``diffusion_model`` uses)
- kohya:             ``lora_unet_output_blocks_1_1`` (SDXL) or ``lora_unet_up_blocks_0_attentions_1`` (SD1.x)

Inside the pack a block is always written in the LDM spelling, and a module is an LDM path
relative to ``diffusion_model`` (``output_blocks.1.1.transformer_blocks.0.attn1.to_q``).
Everything else is converted at the edges by the functions here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

NUM_RES_BLOCKS = 2  # both SD1.x and SDXL use two resnets per down level, three per up level

# ResBlock submodule names: LDM -> diffusers.
_RESNET_LDM_TO_DIFFUSERS = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RESNET_DIFFUSERS_TO_LDM = {v: k for k, v in _RESNET_LDM_TO_DIFFUSERS.items()}

# Top-level modules outside the blocks: LDM -> diffusers.
_BASIC_LDM_TO_DIFFUSERS = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}
_BASIC_DIFFUSERS_TO_LDM = {v: k for k, v in _BASIC_LDM_TO_DIFFUSERS.items()}
_BASIC_DIFFUSERS_TO_LDM["class_embedding.linear_1"] = "label_emb.0.0"
_BASIC_DIFFUSERS_TO_LDM["class_embedding.linear_2"] = "label_emb.0.2"

# The projections that "LoRA on a block" means (METHODS.md section 0).
ATTENTION_PROJECTIONS = tuple(
    f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")
)


@dataclass(frozen=True)
class Arch:
    """The block layout of one UNet family, as far as names are concerned.

    ``down_attention`` / ``up_attention`` give the transformer depth of each down level and
    each up level (diffusers order: up level 0 is the one next to the middle block).
    """

    name: str
    down_attention: tuple[int, ...]
    up_attention: tuple[int, ...]
    middle_attention: int = 1
    presets: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False)

    @property
    def levels(self) -> int:
        return len(self.down_attention)

    def attention_blocks(self) -> list[str]:
        """Every attention block, LDM spelling, in execution order (down, middle, up)."""
        blocks = []
        for level, depth in enumerate(self.down_attention):
            if depth:
                blocks += [f"input_blocks.{1 + level * (NUM_RES_BLOCKS + 1) + i}.1" for i in range(NUM_RES_BLOCKS)]
        if self.middle_attention:
            blocks.append("middle_block.1")
        for level, depth in enumerate(self.up_attention):
            if depth:
                blocks += [f"output_blocks.{level * (NUM_RES_BLOCKS + 1) + i}.1" for i in range(NUM_RES_BLOCKS + 1)]
        return blocks

    def transformer_depth(self, block: str) -> int:
        """How many transformer layers sit in an attention block (0 if it is not one)."""
        if block not in self.attention_blocks():
            return 0
        if block == "middle_block.1":
            return self.middle_attention
        kind, index = block.split(".")[:2]
        if kind == "input_blocks":
            return self.down_attention[(int(index) - 1) // (NUM_RES_BLOCKS + 1)]
        return self.up_attention[int(index) // (NUM_RES_BLOCKS + 1)]

    def attention_modules(self, blocks: list[str] | None = None) -> list[str]:
        """The LoRA target modules (q, k, v, out of attn1 and attn2) of the given blocks."""
        names = []
        for block in blocks if blocks is not None else self.attention_blocks():
            for layer in range(self.transformer_depth(block)):
                names += [f"{block}.transformer_blocks.{layer}.{p}" for p in ATTENTION_PROJECTIONS]
        return names

    def preset(self, name: str) -> list[str]:
        if name == "all_attention":
            return self.attention_blocks()
        if name not in self.presets:
            raise ValueError(f"unknown block preset {name!r} for {self.name}; choose one of {preset_names()}")
        return list(self.presets[name])


# SDXL choices come from the papers (METHODS.md sections 1 and 5).
SDXL = Arch(
    name="sdxl",
    down_attention=(0, 2, 10),
    up_attention=(10, 2, 0),
    middle_attention=10,
    presets={
        "blora_style": ("output_blocks.1.1",),
        "blora_content": ("output_blocks.0.1",),
        "emolora_style": ("input_blocks.5.1", "input_blocks.7.1", "output_blocks.1.1", "output_blocks.2.1"),
        "instantstyle_style": ("output_blocks.1.1",),
        "instantstyle_layout": ("input_blocks.8.1",),
    },
)

# SD1.x has no attention in up_blocks.0 (output_blocks.0-2), where SDXL keeps its style blocks.
# We take the structural analogue: the first decoder level that has attention, counted from the
# middle block, is up_blocks.1 (output_blocks.3-5, 1280 channels at 1/32 of the image, the same
# place in the U as SDXL's up_blocks.0). So B-LoRA's content/style pair W4/W5 becomes
# output_blocks.3.1 / 4.1, and EmoLoRA's two decoder blocks become 4.1 and 5.1. Its two encoder
# blocks and InstantStyle's layout block keep their diffusers names (down_blocks.1.attentions.1,
# down_blocks.2.attentions.0/1), which exist in SD1.x too. None of the papers tested SD1.x:
# run EmbroideryFindStyleBlocks on your own reference when in doubt.
SD15 = Arch(
    name="sd15",
    down_attention=(1, 1, 1, 0),
    up_attention=(0, 1, 1, 1),
    middle_attention=1,
    presets={
        "blora_style": ("output_blocks.4.1",),
        "blora_content": ("output_blocks.3.1",),
        "emolora_style": ("input_blocks.5.1", "input_blocks.7.1", "output_blocks.4.1", "output_blocks.5.1"),
        "instantstyle_style": ("output_blocks.4.1",),
        "instantstyle_layout": ("input_blocks.8.1",),
    },
)

ARCHS = {"sd15": SD15, "sdxl": SDXL}


def preset_names() -> list[str]:
    return sorted(set(SDXL.presets) | set(SD15.presets) | {"all_attention"})


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ValueError(f"unknown model family {name!r}; supported: {sorted(ARCHS)}")
    return ARCHS[name]


def arch_from_unet_config(family: str, unet_config: dict) -> Arch:
    """The Arch of an actual model, from ComfyUI's ``unet_config`` (depths may differ from the
    full-size family, e.g. in tiny test models or distilled SDXL variants)."""
    base = get_arch(family)
    depth = list(unet_config["transformer_depth"])
    out = list(unet_config["transformer_depth_output"])
    res = unet_config["num_res_blocks"]
    levels = len(unet_config["channel_mult"])
    if any(r != NUM_RES_BLOCKS for r in res):
        raise ValueError(f"num_res_blocks {res} is not supported (the block map assumes {NUM_RES_BLOCKS} per level)")
    down = tuple(depth[NUM_RES_BLOCKS * i] for i in range(levels))
    # transformer_depth_output is stored from the last output block backwards.
    out = list(reversed(out))
    up = tuple(out[(NUM_RES_BLOCKS + 1) * i] for i in range(levels))
    middle = unet_config.get("transformer_depth_middle", 1)
    middle = 0 if middle is None or middle < 0 else middle
    return Arch(base.name, down, up, middle, presets=base.presets)


# ---------------------------------------------------------------------------- block parsing

_LDM_BLOCK = re.compile(r"^(input_blocks\.\d+\.\d+|middle_block\.\d+|output_blocks\.\d+\.\d+)(?:\.|$)")
_DIFFUSERS_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(attentions|resnets)\.(\d+)(?:\.|$)")


def block_of(module: str) -> str | None:
    """The LDM block a module path lies in, matched whole (``output_blocks.1.1`` never
    matches ``output_blocks.10.1``); None for modules outside the blocks (time_embed...)."""
    m = _LDM_BLOCK.match(module)
    return m.group(1) if m else None


def in_blocks(module: str, blocks) -> bool:
    return block_of(module) in set(blocks)


def normalize_block(name: str) -> str:
    """Any spelling of a block (LDM, diffusers, kohya, with or without a model prefix) -> LDM."""
    text = name.strip()
    for prefix in ("diffusion_model.", "model.diffusion_model.", "unet.", "lora_unet_"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    if "." not in text:
        text = underscores_to_dots(text)
    text = text.rstrip(".")
    if _DIFFUSERS_BLOCK.match(text + "."):
        kind, level, sub, index = _DIFFUSERS_BLOCK.match(text + ".").groups()
        level, index = int(level), int(index)
        part = 1 if sub == "attentions" else 0
        if kind == "down_blocks":
            return f"input_blocks.{1 + level * (NUM_RES_BLOCKS + 1) + index}.{part}"
        return f"output_blocks.{level * (NUM_RES_BLOCKS + 1) + index}.{part}"
    if text in ("mid_block.attentions.0", "mid_block"):
        return "middle_block.1"
    block = block_of(text)
    if block is None or block != text:
        raise ValueError(
            f"{name!r} is not a block name; write blocks like 'output_blocks.1.1', "
            f"'up_blocks.0.attentions.1' or 'lora_unet_output_blocks_1_1'"
        )
    return block


def parse_block_list(text: str) -> list[str]:
    """Comma/space/newline separated block names in any spelling -> unique LDM names, in order."""
    blocks = []
    for part in re.split(r"[\s,;]+", text.strip()):
        if part:
            block = normalize_block(part)
            if block not in blocks:
                blocks.append(block)
    return blocks


_BLOCK_KIND_ORDER = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}


def block_sort_key(block: str) -> tuple[int, ...]:
    """Sort key for LDM blocks in execution order: input, middle, output, numeric within each
    (so ``output_blocks.2.1`` comes before ``output_blocks.10.1``)."""
    kind, *numbers = block.split(".")
    return (_BLOCK_KIND_ORDER[kind], *map(int, numbers))


def block_spellings(block: str, arch: Arch) -> dict[str, str]:
    """The three spellings of one LDM block, as used in files of that family."""
    diffusers = module_to_diffusers(block, arch)
    kohya_source = block if arch.name == "sdxl" else diffusers
    return {"ldm": block, "diffusers": diffusers, "kohya": "lora_unet_" + kohya_source.replace(".", "_")}


# ---------------------------------------------------------------------------- module paths

# Multi-word tokens of module paths; kohya joins path parts with "_" so these must be kept whole.
_TOKENS = (
    "transformer_blocks", "input_blocks", "output_blocks", "middle_block", "down_blocks", "up_blocks",
    "mid_block", "time_embed", "label_emb", "in_layers", "out_layers", "emb_layers", "skip_connection",
    "proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out", "time_emb_proj", "conv_shortcut",
    "conv_in", "conv_out", "conv_norm_out", "time_embedding", "add_embedding", "class_embedding",
    "linear_1", "linear_2",
)
_TOKEN_RE = re.compile("|".join(sorted(map(re.escape, _TOKENS), key=len, reverse=True)))


def underscores_to_dots(name: str) -> str:
    """``output_blocks_1_1_transformer_blocks_0_attn1_to_out_0`` -> dotted module path."""
    kept = []

    def keep(match):
        kept.append(match.group(0))
        return f"\0{len(kept) - 1}\0"

    parts = _TOKEN_RE.sub(keep, name).split("_")
    return ".".join(re.sub(r"\0(\d+)\0", lambda m: kept[int(m.group(1))], p) for p in parts)


def _upsampler_part(up_level: int, arch: Arch) -> int:
    return 2 if arch.up_attention[up_level] else 1


def module_to_ldm(path: str, arch: Arch) -> str:
    """A diffusers module path (``up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q``)
    -> LDM path. LDM paths are returned unchanged."""
    if block_of(path) or path.split(".")[0] in ("time_embed", "label_emb", "out"):
        return path
    for diffusers, ldm in _BASIC_DIFFUSERS_TO_LDM.items():
        if path == diffusers:
            return ldm
    m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.(attentions|resnets)\.(\d+)\.(.+)$", path)
    if m:
        kind, level, sub, index, rest = m.groups()
        block = normalize_block(f"{kind}.{level}.{sub}.{index}")
        if sub == "resnets":
            rest = _resnet_to_ldm(rest, path)
        return f"{block}.{rest}"
    m = re.match(r"^mid_block\.(attentions\.0|resnets\.([01]))\.(.+)$", path)
    if m:
        sub, res, rest = m.groups()
        if res is None:
            return f"middle_block.1.{rest}"
        return f"middle_block.{0 if res == '0' else 2}.{_resnet_to_ldm(rest, path)}"
    m = re.match(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv$", path)
    if m:
        return f"input_blocks.{(int(m.group(1)) + 1) * (NUM_RES_BLOCKS + 1)}.0.op"
    m = re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv$", path)
    if m:
        level = int(m.group(1))
        return f"output_blocks.{level * (NUM_RES_BLOCKS + 1) + NUM_RES_BLOCKS}.{_upsampler_part(level, arch)}.conv"
    raise ValueError(f"cannot map module {path!r} to a {arch.name} UNet module")


def _resnet_to_ldm(rest: str, path: str) -> str:
    if rest not in _RESNET_DIFFUSERS_TO_LDM:
        raise ValueError(f"unknown resnet module in {path!r}")
    return _RESNET_DIFFUSERS_TO_LDM[rest]


def module_to_diffusers(path: str, arch: Arch) -> str:
    """An LDM module (or block) path -> diffusers path; inverse of :func:`module_to_ldm`."""
    if path in _BASIC_LDM_TO_DIFFUSERS:
        return _BASIC_LDM_TO_DIFFUSERS[path]
    block = block_of(path)
    if block is None:
        raise ValueError(f"cannot map module {path!r} to a diffusers name")
    rest = path[len(block) + 1:]
    if block.startswith("middle_block"):
        part = int(block.split(".")[1])
        if part == 1:
            head = "mid_block.attentions.0"
        else:
            head = f"mid_block.resnets.{part // 2}"
            rest = _RESNET_LDM_TO_DIFFUSERS.get(rest, rest) if rest else rest
        return head + ("." + rest if rest else "")
    kind, index, part = block.split(".")
    index, part = int(index), int(part)
    if kind == "input_blocks":
        level, offset = divmod(index - 1, NUM_RES_BLOCKS + 1)
        if offset == NUM_RES_BLOCKS:  # the downsampler of the previous level
            return f"down_blocks.{level}.downsamplers.0.conv"
        sub = "attentions" if part == 1 else "resnets"
        head = f"down_blocks.{level}.{sub}.{offset}"
    else:
        level, offset = divmod(index, NUM_RES_BLOCKS + 1)
        if part == 2 or (part == 1 and rest == "conv"):
            return f"up_blocks.{level}.upsamplers.0.conv"
        sub = "attentions" if part == 1 else "resnets"
        head = f"up_blocks.{level}.{sub}.{offset}"
    if sub == "resnets" and rest:
        rest = _RESNET_LDM_TO_DIFFUSERS.get(rest, rest)
    return head + ("." + rest if rest else "")


KOHYA_UNET_PREFIX = "lora_unet_"


def module_to_kohya(path: str, arch: Arch) -> str:
    """An LDM module path -> the kohya LoRA name kohya's own trainer writes for that family:
    LDM names for SDXL, diffusers names for SD1.x (both load in ComfyUI, A1111 and Forge)."""
    source = path if arch.name == "sdxl" else module_to_diffusers(path, arch)
    return KOHYA_UNET_PREFIX + source.replace(".", "_")
