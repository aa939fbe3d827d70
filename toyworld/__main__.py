"""Command line of the toy world: ``python -m toyworld demo [--out DIR] [--quick]``.

``demo`` runs EmoLoRA end to end on CPU in the procedural toy world (toyworld.demo)
and writes a contact sheet and a metrics JSON; ``--quick`` is the short CI version.
"""
from __future__ import annotations

import argparse
import logging
import sys

from .generator import HELD_OUT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m toyworld", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="one-shot EmoLoRA on the toy model, CPU (under 5 min; --quick about 15 s)")
    demo.add_argument("--out", default="./embroidery_demo", help="folder for contact_sheet.png and metrics.json")
    demo.add_argument("--quick", action="store_true", help="a few iterations only (CI smoke run)")
    demo.add_argument("--technique", default=HELD_OUT[0],
                      help="held-out technique of the reference, in quotes: " + ", ".join(f"'{t}'" for t in HELD_OUT))
    demo.add_argument("--threads", type=int, default=1,
                      help="torch CPU threads (0 = torch's default); the toy model is too small to gain from more")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    import torch

    from .demo import run_demo

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        result = run_demo(args.out, quick=args.quick, technique=args.technique)
    except (ValueError, OSError) as e:  # a bad --technique, missing weights, an unwritable --out
        parser.error(str(e))
    emo = result["metrics"]["emolora"]
    logging.info("wrote %s/contact_sheet.png and metrics.json in %.0f s; EmoLoRA: %s", args.out,
                 result["timings"]["total_s"], ", ".join(f"{k} {v:.3g}" for k, v in emo.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
