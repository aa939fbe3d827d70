"""A procedural toy world with ground truth: flat designs and their embroideries."""
from .generator import (
    ATTRIBUTES,
    DESIGN_COLOURS,
    FABRICS,
    HELD_OUT,
    LETTERS,
    NEW_KIND_TECHNIQUES,
    PALETTE,
    REFERENCE_COLOURS,
    SHAPES,
    TECHNIQUES,
    TRAIN_TECHNIQUES,
    TRIGGER,
    VOCAB,
    Design,
    attributes,
    detokenize,
    make_design,
    render_embroidery,
    sample_pair,
    tokenize,
)

__all__ = [
    "ATTRIBUTES", "DESIGN_COLOURS", "FABRICS", "HELD_OUT", "LETTERS", "NEW_KIND_TECHNIQUES", "PALETTE",
    "REFERENCE_COLOURS", "SHAPES", "TECHNIQUES", "TRAIN_TECHNIQUES", "TRIGGER", "VOCAB", "Design",
    "attributes", "detokenize", "make_design", "render_embroidery", "sample_pair", "tokenize",
]
