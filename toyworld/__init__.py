"""A procedural toy world with ground truth: flat designs and their embroideries."""
from .generator import (
    FABRICS,
    FILL_TECHNIQUES,
    HELD_OUT,
    LETTERS,
    PALETTE,
    SHAPES,
    TECHNIQUES,
    TRAIN_TECHNIQUES,
    TRIGGER,
    VOCAB,
    Design,
    detokenize,
    make_design,
    render_embroidery,
    sample_pair,
    tokenize,
)

__all__ = [
    "FABRICS", "FILL_TECHNIQUES", "HELD_OUT", "LETTERS", "PALETTE", "SHAPES", "TECHNIQUES",
    "TRAIN_TECHNIQUES", "TRIGGER", "VOCAB", "Design", "detokenize", "make_design",
    "render_embroidery", "sample_pair", "tokenize",
]
