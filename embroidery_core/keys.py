"""Every ``embroidery.*`` metadata key a LoRA file of this pack carries, in one place.

Settings and training state live in a file's metadata, never in its name: what was trained
(method, phase, step), on what (prompts, blocks, resolution) and with which settings. A trainer
writes them, and resume, the loaders and B-LoRA Mix read them back. The method's own defaults are
written as ``embroidery.<field>`` by :func:`config_key`.
"""
from __future__ import annotations

PREFIX = "embroidery."


def config_key(field: str) -> str:
    """The key of one field of a method's config dataclass (``rank`` -> ``embroidery.rank``)."""
    return PREFIX + field


# --- training state: which method wrote the file, how far it got
METHOD = PREFIX + "method"          # the Method's name ("emolora", "lora", ...)
STAGE = PREFIX + "stage"            # the phase number within the method (EmoLoRA's stage 1 / 2)
STEP = PREFIX + "step"              # global iterations done, over all phases
RUN_ID = PREFIX + "run_id"          # trainer.run_identity: tells one run's checkpoints from another's
UPDATED_BLOCKS = PREFIX + "updated_blocks."  # + a group label: the blocks that received gradients

# --- what it was trained on
ARCH = PREFIX + "arch"
TRIGGER = PREFIX + "trigger"
SUBJECT = PREFIX + "subject"
DESIGN_PROMPT = PREFIX + "design_prompt"
EMBROIDERY_PROMPT = PREFIX + "embroidery_prompt"
RESOLUTION = PREFIX + "resolution"
STYLE_BLOCKS = PREFIX + "style_blocks"
CONTENT_BLOCKS = PREFIX + "content_blocks"
TRAIN_PROMPT = PREFIX + "train_prompt"  # the prompt a one-prompt method trained with
RECIPE = PREFIX + "recipe"              # the one-image LoRA recipe (methods.LORA_RECIPES)
PAIR_GROUP = PREFIX + "pair_group"      # Pair Customization: "content" or "style" LoRA of the pair
PRECISION = PREFIX + "precision"
MEMORY_PRESET = PREFIX + "memory_preset"

# --- EmoLoRA stage 2: where it starts and from what
STAGE2_START = PREFIX + "stage2_start"
STAGE2_SUBJECTS = PREFIX + "stage2_subjects"
STAGE1_RUN_ID = PREFIX + "stage1_run_id"

# --- written by the file layer and the mixers
PACK_VERSION = PREFIX + "pack_version"
BLOCKS = PREFIX + "blocks"
SKIPPED_KEYS = PREFIX + "skipped_keys"
MIX_BLOCKS = PREFIX + "mix_blocks"


def updated_blocks_key(label: str) -> str:
    return UPDATED_BLOCKS + label
