"""Average toy base models tensor by tensor (a "model soup"):

    python -m toyworld.average r8.safetensors r10.safetensors --out soup.safetensors

Rounds continued from one another sit in one basin of the loss, so their mean is a base model
too, and a start for a further round (docs/FIDELITY.md: the mean of rounds 8 and 10 reads like
round 8 on the gate and better than round 10). The inputs must share the
architecture, the prediction and the toy VAE; the output is a base model file like train_base's,
recording its sources by name and digest, so ``train_base --init`` can continue from it and the
chain rebuilds to the same tensors (the mean is taken in float64, in the inputs' order; the
file's bytes differ run to run, as train_base's do, because safetensors writes the metadata in
hash order).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from toyworld.model import load_toy_model, read_metadata, save_toy_model
from toyworld.train_base import init_digest

SCRIPT_VERSION = 1
_SHARED = ("config", "vae_sha256", "prediction")  # what every input must agree on


def average_bases(paths: list[str], out: str) -> str:
    """Write the tensor-wise mean of the base model files ``paths`` (two or more) to ``out``."""
    if len(paths) < 2:
        raise ValueError("give two or more base model files to average")
    metas = [read_metadata(p) for p in paths]
    models = [load_toy_model(p) for p in paths]  # refuses a file that is not a toy base, or one of another VAE
    for key in _SHARED:
        values = {m.get(key) for m in metas}
        if len(values) > 1:
            raise ValueError(f"the files disagree on {key} ({sorted(map(str, values))}); "
                             "only rounds of one base model can be averaged")
    unet, encoder = models[0]
    for i, network in enumerate((unet, encoder)):
        states = [model[i].state_dict() for model in models]
        network.load_state_dict({k: (sum(s[k].double() for s in states) / len(states)).float() for k in states[0]})
    total = lambda key, fallback: max(float(m.get(key, m.get(fallback, 0))) for m in metas)  # noqa: E731
    meta = {"script": "toyworld.average", "script_version": SCRIPT_VERSION, "prediction": metas[0]["prediction"],
            "torch": torch.__version__,
            "sources": ", ".join(f"{os.path.basename(p)} ({init_digest(p)})" for p in paths),
            # the longest chain among the sources (rounds continued from one another share their start)
            "total_steps": int(total("total_steps", "steps")),
            "total_train_minutes": f"{total('total_train_minutes', 'train_minutes'):.1f}"}
    return save_toy_model(out, unet, encoder, meta)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toyworld.average", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help="two or more toy base model files (rounds of one base)")
    parser.add_argument("--out", required=True, help="where to write the averaged base model")
    args = parser.parse_args(argv)
    for p in args.inputs:
        if not os.path.isfile(p):
            parser.error(f"{p}: no such file")
    if any(os.path.abspath(p) == os.path.abspath(args.out) for p in args.inputs):
        parser.error("--out must differ from the inputs")
    try:
        average_bases(args.inputs, args.out)
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {args.out}: the mean of {len(args.inputs)} base models")
    return 0


if __name__ == "__main__":
    sys.exit(main())
