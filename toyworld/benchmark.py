"""One-shot fidelity benchmark in the toy world: EmoLoRA against its ablation and two baselines.

    python -m toyworld.benchmark [--refs K] [--designs M] [--seeds S] [--doc docs/FIDELITY.md]

For each held-out technique (never seen by the base model), K references (renders of unseen
designs) x S seeds, every method learns the style from the one reference and turns the same M
new designs into embroideries (img2img from the design, prompt "a <subject> in <trigger> style",
identical for every method). Methods:

- ``emolora``: stage 1 + stage 2, inference with the four style blocks (ToyRunConfig defaults).
- ``emolora_stage1``: the same run's stage-1 LoRA (the "no stage 2" ablation).
- ``blora``: B-LoRA, the toy analogues of output_blocks.0.1 + 1.1 trained jointly on the reference
  with one prompt for as many iterations as EmoLoRA's two stages; inference with its style
  block (output_blocks.1.1), as B-LoRA stylises.
- ``full_lora``: one LoRA on every attention block, one prompt, same iterations (DreamBooth-LoRA).
- ``no_lora``: the base model with the untrained trigger word.
- ``ground_truth``: the generator's own render of each new design in the technique (a ceiling).

Metrics (embroidery_core.metrics, toy ground truth; see demo.evaluate): HFRD to the reference
(lower is better), Hist(ref) similarity (higher), Hist(design) distance to the new design (lower),
content IoU of the stitched pixels with the new design's motif mask (higher), technique accuracy
by the classifier (higher), and against the ground-truth render of each new design HFRD(gt)
(lower) and Hist(gt) (higher). Each run's value is the mean over its M designs; tables give mean
and standard deviation over runs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import time

import numpy as np
import torch

from embroidery_core import metrics
from embroidery_core.adapters import AdapterSet, installed, linear_targets
from embroidery_core.files import write_text
from embroidery_core.lora_file import StyleLoRA
from embroidery_core.pair import embroidery_prompt
from embroidery_core.provenance import git_commit
from embroidery_core.trainer import PairLatents, Trainer, single_prompt_iteration
from . import demo
from .classifier import load_classifier, technique_accuracy
from .demo import ARCH, METRIC_KEYS, STAGE2_SUBJECTS, ToyRunConfig
from .generator import HELD_OUT, TECHNIQUES
from .model import load_toy_model, toy_denoiser
from .sample import generate

BENCH_REFERENCE_SEED = 4_000_000  # + 1000 x technique index + reference index
BENCH_DESIGN_SEED = 4_500_000
METHODS = ("emolora", "emolora_stage1", "blora", "full_lora", "no_lora", "ground_truth")
LABELS = {"emolora": "EmoLoRA (stage 1 + 2)", "emolora_stage1": "EmoLoRA, no stage 2",
          "blora": "B-LoRA (out 0.1 + 1.1)", "full_lora": "Full LoRA (all attention)", "no_lora": "No LoRA",
          "ground_truth": "Ground-truth render"}
COLUMNS = (("hfrd", "HFRD ↓"), ("hist_ref", "Hist(ref) ↑"), ("hist_design", "Hist(design) ↓"),
           ("content_iou", "IoU ↑"), ("technique_accuracy", "Technique acc. ↑"), ("hfrd_gt", "HFRD(gt) ↓"),
           ("hist_gt", "Hist(gt) ↑"))
ROUND_TRIP_STRENGTHS = (0.1, 0.2, 0.45)  # --base-check --round-trip: little, some and much of the render kept
RESULTS_START, RESULTS_END = "<!-- results:start -->", "<!-- results:end -->"
log = logging.getLogger("toyworld.benchmark")


# --- single-prompt baselines -----------------------------------------------------------------

def train_single_prompt(unet, pair: PairLatents, blocks: list[str], iterations: int,
                        config: ToyRunConfig) -> StyleLoRA:
    """DreamBooth-style LoRA on ``blocks``: the plain diffusion loss on the reference with its
    embroidery prompt everywhere (no design step, no router), through the same Trainer."""
    emo = config.emolora()
    arch = unet.cfg.arch(ARCH)
    adapters = AdapterSet(linear_targets(unet, arch.attention_modules(blocks)), blocks, emo.rank, emo.alpha,
                          seed=emo.seed)
    trainer = Trainer(toy_denoiser(unet), adapters, emo)
    with installed(unet, adapters):
        while trainer.step < iterations:
            single_prompt_iteration(trainer, pair.embroidery, pair.embroidery_cond)
    return adapters.to_style_lora(ARCH, {"embroidery.method": "single_prompt", "embroidery.step": str(trainer.step)})


# --- one run ---------------------------------------------------------------------------------

def run_one(unet, encoder, classifier, technique: str, reference_seed: int, seed: int,
            targets: list[demo.Example], config: ToyRunConfig) -> dict[str, dict[str, float]]:
    """Every method on one reference with one seed; metrics per method (means over the designs)."""
    config = ToyRunConfig(**{**config.__dict__, "seed": seed})
    reference = demo.make_example(technique, reference_seed)
    pair = demo.pair_latents(encoder, reference.design, reference.embroidery, reference.subject)
    designs = torch.cat([t.design for t in targets])
    subjects = [t.subject for t in targets]
    arch = unet.cfg.arch(ARCH)
    iterations = config.stage1_iterations + config.stage2_iterations
    outputs, times = {}, {}

    def timed(name, fn):
        tick = time.monotonic()
        result = fn()
        times[name] = times.get(name, 0.0) + time.monotonic() - tick
        return result

    stage1 = timed("emolora", lambda: demo.train_stage1(unet, pair, config))
    style = stage1.style_blocks
    outputs["emolora_stage1"] = demo.stylize(unet, encoder, designs, subjects, config, stage1, style, seed)
    _, _, generated = timed("emolora", lambda: demo.generate_pairs(unet, encoder, stage1, STAGE2_SUBJECTS, config))
    stage2 = timed("emolora", lambda: demo.train_stage2(unet, pair, stage1, generated, config))
    outputs["emolora"] = demo.stylize(unet, encoder, designs, subjects, config, stage2, style, seed)

    blora_blocks = arch.preset("blora_content") + arch.preset("blora_style")
    blora = timed("blora", lambda: train_single_prompt(unet, pair, blora_blocks, iterations, config))
    outputs["blora"] = demo.stylize(unet, encoder, designs, subjects, config, blora, arch.preset("blora_style"), seed)
    full = timed("full_lora", lambda: train_single_prompt(unet, pair, arch.attention_blocks(), iterations, config))
    outputs["full_lora"] = demo.stylize(unet, encoder, designs, subjects, config, full, None, seed)
    outputs["no_lora"] = demo.stylize(unet, encoder, designs, subjects, config, None, None, seed)
    outputs["ground_truth"] = torch.cat([t.embroidery for t in targets])
    result = {m: demo.evaluate(outputs[m], reference, targets, classifier) for m in METHODS}
    result["train_seconds"] = {k: round(v, 1) for k, v in times.items()}
    return result


def run(refs: int, designs: int, seeds: int, techniques=HELD_OUT, config: ToyRunConfig | None = None,
        weights: str | None = None):
    """Every (technique, reference, seed) run; a list of dicts with the metrics per method."""
    config = config or ToyRunConfig()
    unet, encoder = load_toy_model(weights)
    classifier = load_classifier()
    runs = []
    for t_index, technique in enumerate(techniques):
        targets = demo.new_designs(designs, technique, BENCH_DESIGN_SEED)
        for k in range(refs):
            for seed in range(seeds):
                tick = time.monotonic()
                result = run_one(unet, encoder, classifier, technique, BENCH_REFERENCE_SEED + 1000 * t_index + k,
                                 seed, targets, config)
                runs.append({"technique": technique, "reference": k, "seed": seed, **result})
                log.info("%s ref %d seed %d in %.0f s: %s", technique, k, seed, time.monotonic() - tick,
                         "; ".join(f"{m} hfrd {result[m]['hfrd']:.2f} hist_ref {result[m]['hist_ref']:.1f}"
                                   for m in ("emolora", "blora", "full_lora")))
    return runs


# --- the base model's own ceiling -----------------------------------------------------------

def base_check(designs: int, strengths=(0.6, 0.9), techniques=TECHNIQUES, weights: str | None = None,
               round_trip: bool = False) -> str:
    """How well the base model draws each technique by its own word, no LoRA, same protocol
    (img2img from the benchmark's new designs, "a <subject> in <technique> style"). For the
    training techniques this is the ceiling a one-shot LoRA builds on. A markdown table of
    technique accuracy and HFRD(gt), one row per technique, one column pair per strength.

    ``round_trip``: start from the ground-truth renders of those designs instead, so the model
    only has to keep stitches it is shown, and add a first column with the classifier's accuracy
    on the renders themselves. It tells a base model that loses textures apart from a classifier
    that cannot read them."""
    unet, encoder = load_toy_model(weights)
    classifier = load_classifier()
    config = ToyRunConfig()
    header = "| Technique | " + ("acc. of render | " if round_trip else "") \
        + " | ".join(f"acc. @ {s} | HFRD(gt) @ {s}" for s in strengths) + " |"
    lines = [header, "|---|" + ("---:|" if round_trip else "") + "---:|---:|" * len(strengths)]
    for technique in techniques:
        targets = demo.new_designs(designs, technique, BENCH_DESIGN_SEED)
        renders = torch.cat([t.embroidery for t in targets])
        start = renders if round_trip else torch.cat([t.design for t in targets])
        prompts = [embroidery_prompt(t.subject, technique) for t in targets]
        cells = [f"{technique_accuracy(classifier, renders.numpy(), technique):.2f}"] if round_trip else []
        for strength in strengths:
            out = generate(unet, encoder, prompts, config.sample_steps, config.cfg, 0, init_images=start,
                           strength=strength).numpy()
            hfrd_gt = np.mean([metrics.hfrd(o, t.embroidery[0].numpy()) for o, t in zip(out, targets)])
            cells += [f"{technique_accuracy(classifier, out, technique):.2f}", f"{hfrd_gt:.1f}"]
        held = " (held out)" if technique in HELD_OUT else ""
        lines.append(f"| `{technique}`{held} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- report ----------------------------------------------------------------------------------

def summarise(runs: list[dict], methods=METHODS) -> dict[str, dict[str, tuple[float, float]]]:
    """Per method and metric: (mean, standard deviation) over runs."""
    return {m: {k: (float(np.mean([r[m][k] for r in runs])), float(np.std([r[m][k] for r in runs])))
                for k in METRIC_KEYS} for m in methods}


def markdown_table(summary: dict) -> str:
    lines = ["| Method | " + " | ".join(c for _, c in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for method, values in summary.items():
        cells = []
        for key, _ in COLUMNS:
            mean, std = values[key]
            digits = 2 if key in ("content_iou", "technique_accuracy") else 1
            cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}")
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_block(runs: list[dict], args, minutes: float) -> str:
    techniques = sorted({r["technique"] for r in runs}, key=HELD_OUT.index)
    parts = [RESULTS_START, "",
             f"- Command: `python -m toyworld.benchmark --refs {args.refs} --designs {args.designs} "
             f"--seeds {args.seeds}" + (f" --weights {args.weights}" if args.weights else "") + "`",
             f"- Date: {datetime.date.today().isoformat()}; commit: `{git_commit()['commit'] or 'unknown'}` (plus the working tree of this "
             "change); torch " + torch.__version__ + f"; {platform.machine()} CPU, {torch.get_num_threads()} thread(s).",
             f"- Size: {len(techniques)} held-out techniques x {args.refs} reference(s) x {args.seeds} seed(s) = "
             f"{len(runs)} runs, each turning the same {args.designs} new designs; wall clock {minutes:.1f} min.",
             "", "All held-out techniques, mean ± standard deviation over runs:", "",
             markdown_table(summarise(runs))]
    for technique in techniques:
        subset = [r for r in runs if r["technique"] == technique]
        parts += ["", f"`{technique}` only ({len(subset)} runs):", "", markdown_table(summarise(subset))]
    parts += ["", RESULTS_END]
    return "\n".join(parts)


def write_doc(path: str, block: str) -> None:
    """Replace the results block of ``path`` (or create the file with it), keeping the prose."""
    text = open(path).read() if os.path.isfile(path) else "# Toy-world fidelity\n\n" + RESULTS_START + RESULTS_END
    if RESULTS_START not in text or RESULTS_END not in text:
        text += "\n\n" + RESULTS_START + RESULTS_END
    head, rest = text.split(RESULTS_START, 1)
    tail = rest.split(RESULTS_END, 1)[1]
    write_text(path, head + block + tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--refs", type=int, default=1, help="references per held-out technique (K)")
    parser.add_argument("--designs", type=int, default=6, help="new designs per run (M)")
    parser.add_argument("--seeds", type=int, default=2, help="training/sampling seeds per reference")
    parser.add_argument("--techniques", default=",".join(HELD_OUT), help="comma-separated held-out techniques")
    parser.add_argument("--doc", default=None, help="markdown file whose results block is rewritten")
    parser.add_argument("--json", default=None, help="write every run's numbers here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--weights", default=None, help="another toy base model file (default: the shipped one)")
    parser.add_argument("--quick", action="store_true", help="the demo's smoke-run iterations (checks the script only)")
    parser.add_argument("--base-check", action="store_true",
                        help="only print how well the base model draws every technique by its own word (no LoRA)")
    parser.add_argument("--round-trip", action="store_true",
                        help="with --base-check: start from the ground-truth renders at low strengths, to see "
                             "whether the base model keeps stitches it is shown")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    techniques = tuple(t.strip() for t in args.techniques.split(",") if t.strip())
    unknown = [t for t in techniques if t not in HELD_OUT]
    if unknown:
        parser.error(f"not held-out techniques: {unknown}; choose from {HELD_OUT}")
    if args.round_trip and not args.base_check:
        parser.error("--round-trip only applies to --base-check")
    if args.base_check:
        strengths = ROUND_TRIP_STRENGTHS if args.round_trip else (0.6, 0.9)
        print(base_check(args.designs, strengths, weights=args.weights, round_trip=args.round_trip))
        return 0
    start = time.monotonic()
    runs = run(args.refs, args.designs, args.seeds, techniques, ToyRunConfig(**(demo.QUICK if args.quick else {})),
               args.weights)
    minutes = (time.monotonic() - start) / 60
    block = results_block(runs, args, minutes)
    print(block)
    if args.json:
        write_text(args.json, json.dumps({"args": vars(args), "minutes": minutes, "runs": runs}, indent=1))
    if args.doc:
        write_doc(args.doc, block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
