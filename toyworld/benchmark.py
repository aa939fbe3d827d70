"""One-shot fidelity benchmark in the toy world: EmoLoRA against its ablation and the seed methods.

    python -m toyworld.benchmark [--refs K] [--designs M] [--seeds S] [--doc docs/FIDELITY.md] [--runs-dir DIR]
    python -m toyworld.benchmark --base-check [--gate-designs M]

With ``--runs-dir`` every finished (technique, reference, seed) run is kept there as JSON, and the
same command run again reads those back instead of running them (only when the task, the run
settings and the digests of both model files and of the code match): a benchmark longer than a session is
finished in several.

First the base-model gate (``gate``): no LoRA, every training technique and every held-out
combination prompted by its own attribute words, img2img from the benchmark's new designs at its
strength; it passes when the classifier reads >= GATE_TRAIN on every training technique and
>= GATE_HELD_OUT on every held-out one. Its verdict is printed with the table; ``--base-check``
also prints how many training techniques were misread on each new design (misses_line), which
tells misses spread over every design from misses held by a few hard ones.

The references and new designs hold at least BENCH_MIN_MOTIF_CELLS coarse stitch cells of motif
(``--min-motif-cells``; 0 gives back every design, the gate of the rounds before the rule).

Then, for each held-out technique (an unseen combination of known attributes, HELD_OUT) and the
new kind's hard case (NEW_KIND_CASE, reported separately), K references (renders of unseen
designs in the reference-only colours) x S seeds: every method learns the style from the one
reference and turns the same M new designs (never in those colours) into embroideries
(img2img from the design, prompt "a <subject> in <trigger> style", identical for every method).
Methods:

- ``emolora``: style blocks chosen by EmoLoRA's block metric on the base and the pair, stage 1 +
  stage 2, inference with those style blocks (ToyRunConfig defaults: stage 2 at its own rate,
  a fifth of stage 1's, as Train Stage 2's own learning-rate input allows).
- ``emolora_stage1``: the same run's stage-1 LoRA (the "no stage 2" ablation).
- ``emolora_one_rate``: the same stage-1 LoRA and generated pairs, stage 2 at stage 1's rate, as
  the paper runs both stages.
- ``blora``: B-LoRA, output_blocks.0.1 (content) + 1.1 (style) in SDXL's names, trained jointly on
  the reference with one prompt for as many iterations as EmoLoRA's two stages; inference with
  its style block, as B-LoRA stylises.
- ``full_lora``: one LoRA on every attention block, one prompt, same iterations (DreamBooth-LoRA).
- ``pair_customization``: its style LoRA through style guidance (w_s 4) on the design prompt.
- ``diffstyler``: the full LoRA (DiffStyler's style LoRA is that recipe: every attention layer,
  ``dreambooth_all_attention``) through DiffStyler's sampler instead of img2img: each new design
  DDIM-inverted with the empty prompt over the run's sampling steps, then sampled back with the
  source's decoder features and self-attention injected into the base and the style branch (one
  style covering the picture, the official schedules), so the row isolates DiffStyler's
  inference against the plain img2img of the same LoRA.
- ``stylegallery``: training-free: each new design restyled from the reference render by the
  core's StyleGallery (regions, matching with the decoder features as the semantic term, the toy
  having no DINOv2, and the latent optimisation; the fast preset in a ``--quick`` run).
- ``no_lora``: the base model with the untrained trigger word.
- ``ground_truth``: the generator's own render of each new design in the technique (a ceiling).

Metrics: see demo.evaluate. Each run's value is the mean over its M designs; tables give the
mean, the standard deviation and a bootstrap 95 % interval of the mean over runs, and EmoLoRA's
paired differences to every other method (same technique, reference and seed).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import sys
import time
from typing import NamedTuple

import numpy as np
import torch

from embroidery_core.files import write_text
from embroidery_core.lora_file import StyleLoRA
from embroidery_core.methods import LoRAConfig, PairConfig, train_lora, train_pair
from embroidery_core.pair import design_prompt, embroidery_prompt
from embroidery_core.provenance import arithmetic, git_commit
from embroidery_core.trainer import PairLatents
from embroidery_core.stylegallery import StylizeConfig
from . import demo, gallery
from .classifier import load_classifier, predict
from .demo import ARCH, METRIC_KEYS, STAGE2_SUBJECTS, ToyRunConfig
from .generator import HELD_OUT, NEW_KIND_TECHNIQUES, REFERENCE_COLOURS, TECHNIQUES, TRAIN_TECHNIQUES
from .model import load_toy_model, toy_denoiser
from .train_base import TRAIN_DESIGN_SEEDS
from .sample import diffstyled, generate, style_guided

BENCH_REFERENCE_SEED = 4_000_000  # + 1000 x technique index + reference index
BENCH_DESIGN_SEED = 4_500_000
# The benchmark's references and new designs hold at least ten coarse stitches' area of motif
# (640 px of 4096 at 64 px, 15.6 %; generator.motif_cells): fixed before round 7's gate, from
# round 5's misses, which sat on designs too small to hold a technique (docs/FIDELITY.md).
# --min-motif-cells 0 gives back every design, the gate of rounds 1-6.
BENCH_MIN_MOTIF_CELLS = 10.0
MAX_MOTIF_CELLS = 20.0  # a design's motifs cover at most about 40 % of the image
NEW_KIND_CASE = NEW_KIND_TECHNIQUES[0]  # "chain horizontal fine matte"
BENCH_TECHNIQUES = HELD_OUT + (NEW_KIND_CASE,)
METHODS = ("emolora", "emolora_stage1", "emolora_one_rate", "blora", "full_lora", "pair_customization", "diffstyler",
           "stylegallery", "no_lora", "ground_truth")
PAIR_STYLE_WEIGHT = 4.0  # the paper's w_s
LABELS = {"emolora": f"EmoLoRA (stage 2 at {ToyRunConfig().stage2_learning_rate:g})",
          "emolora_stage1": "EmoLoRA, no stage 2",
          "emolora_one_rate": f"EmoLoRA, one rate ({ToyRunConfig().learning_rate:g}, the paper's way)",
          "pair_customization": "Pair Customization (w_s 4)", "diffstyler": "DiffStyler (full LoRA, inverted design)",
          "stylegallery": "StyleGallery (training-free)",
          "blora": "B-LoRA (out 0.1 + 1.1)", "full_lora": "Full LoRA (all attention)", "no_lora": "No LoRA",
          "ground_truth": "Ground-truth render"}
COLUMNS = (("technique_accuracy", "Technique acc. ↑"), ("attribute_accuracy", "Attribute acc. ↑"),
           ("hfrd_gt", "HFRD(gt) ↓"), ("hist_gt", "Hist(gt) ↓"), ("palette_leak", "Ref. colour leak % ↓"),
           ("content_iou", "IoU ↑"), ("hist_design", "Hist(design) ↓"), ("hfrd", "HFRD(ref) ↓"),
           ("hist_ref", "Hist(ref) ↑"))
TWO_DIGITS = ("technique_accuracy", "attribute_accuracy", "content_iou")
# Hist(ref) is a distance to the reference's colours, higher is better as in the paper (less of
# the reference's palette copied); every other distance is lower-is-better.
HIGHER_IS_BETTER = {"technique_accuracy", "attribute_accuracy", "content_iou", "hist_ref"}
GATE_STRENGTH = ToyRunConfig().strength
GATE_DESIGNS = 12
GATE_TRAIN, GATE_HELD_OUT = 0.9, 0.7
BOOTSTRAP_SAMPLES = 2000
ROUND_TRIP_STRENGTHS = (0.1, 0.2, 0.45)  # --base-check --round-trip: little, some and much of the render kept
RESULTS_START, RESULTS_END = "<!-- results:start -->", "<!-- results:end -->"
log = logging.getLogger("toyworld.benchmark")


# --- single-prompt baselines -----------------------------------------------------------------

def train_single_prompt(unet, pair: PairLatents, blocks: list[str], iterations: int,
                        config: ToyRunConfig) -> StyleLoRA:
    """DreamBooth-style LoRA on ``blocks``: the plain diffusion loss on the reference with its
    embroidery prompt everywhere (no design step, no router): the core's one-image LoRA method,
    at the toy scale every method shares (rank, learning rate)."""
    emo = config.emolora()
    lora_config = LoRAConfig(rank=emo.rank, alpha=emo.alpha, learning_rate=emo.learning_rate,
                             weight_decay=emo.weight_decay, iterations=iterations, seed=emo.seed)
    lora, _ = train_lora(toy_denoiser(unet), unet, pair, blocks, unet.cfg.arch(ARCH), lora_config)
    return lora


def train_pair_customization(unet, pair: PairLatents, iterations: int, config: ToyRunConfig) -> StyleLoRA:
    """Pair Customization's style LoRA (the core's method) on the toy: the toy scale's rank and
    learning rate, the official weight decay, the style step from a third of the run (250 of
    750), no gradient accumulation (a quarter of the official cost, like the other rows)."""
    emo = config.emolora()
    pair_config = PairConfig(rank=emo.rank, alpha=emo.alpha, learning_rate=emo.learning_rate, iterations=iterations,
                             style_start=iterations // 3, accumulate=1, seed=emo.seed)
    style, _, _ = train_pair(toy_denoiser(unet), unet, pair, unet.cfg.arch(ARCH), pair_config)
    return style


# --- one run ---------------------------------------------------------------------------------

def run_one(unet, encoder, classifier, technique: str, reference_seed: int, seed: int,
            targets: list[demo.Example], config: ToyRunConfig) -> dict:
    """Every method on one reference with one seed; metrics per method (means over the designs)."""
    config = ToyRunConfig(**{**config.__dict__, "seed": seed})
    reference = demo.make_reference(technique, reference_seed)
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

    style = timed("emolora", lambda: demo.find_style_blocks(unet, pair, seed=seed))
    stage1 = timed("emolora", lambda: demo.train_stage1(unet, pair, config, style))
    outputs["emolora_stage1"] = demo.stylize(unet, encoder, designs, subjects, config, stage1, style, seed)
    _, _, generated = timed("emolora", lambda: demo.generate_pairs(unet, encoder, stage1, STAGE2_SUBJECTS, config))
    stage2 = timed("emolora", lambda: demo.train_stage2(unet, pair, stage1, generated, config))
    outputs["emolora"] = demo.stylize(unet, encoder, designs, subjects, config, stage2, style, seed)
    one_rate = dataclasses.replace(config, stage2_learning_rate=None)
    paper = timed("emolora_one_rate", lambda: demo.train_stage2(unet, pair, stage1, generated, one_rate))
    outputs["emolora_one_rate"] = demo.stylize(unet, encoder, designs, subjects, config, paper, style, seed)

    blora_blocks = arch.preset("blora_content") + arch.preset("blora_style")
    blora = timed("blora", lambda: train_single_prompt(unet, pair, blora_blocks, iterations, config))
    outputs["blora"] = demo.stylize(unet, encoder, designs, subjects, config, blora, arch.preset("blora_style"), seed)
    full = timed("full_lora", lambda: train_single_prompt(unet, pair, arch.attention_blocks(), iterations, config))
    outputs["full_lora"] = demo.stylize(unet, encoder, designs, subjects, config, full, None, seed)
    outputs["diffstyler"] = diffstyled(unet, encoder, full, [demo.style_prompt(s) for s in subjects], designs,
                                       config.sample_steps, config.cfg)
    style_lora = timed("pair_customization", lambda: train_pair_customization(unet, pair, iterations, config))
    outputs["pair_customization"] = style_guided(
        unet, encoder, style_lora, PAIR_STYLE_WEIGHT, [design_prompt(s) for s in subjects],
        [demo.style_prompt(s) for s in subjects], config.sample_steps, config.cfg, seed, designs, config.strength,
        config.eta)
    gallery_config = StylizeConfig.fast() if config.stylegallery_preset == "fast" else StylizeConfig()
    outputs["stylegallery"] = timed("stylegallery", lambda: torch.cat([
        gallery.stylegallery(unet, encoder, t.design, [reference.embroidery], gallery_config)[0] for t in targets]))
    outputs["no_lora"] = demo.stylize(unet, encoder, designs, subjects, config, None, None, seed)
    outputs["ground_truth"] = torch.cat([t.embroidery for t in targets])
    result = {m: demo.evaluate(outputs[m], reference, targets, classifier) for m in METHODS}
    result["style_blocks"] = style
    result["train_seconds"] = {k: round(v, 1) for k, v in times.items()}
    return result


_WORKER: dict = {}


def code_digest() -> str:
    """First 16 hex digits of the SHA-256 over the Python sources of the core and the toy world
    (names and bytes, in name order): a run made by other code is another run."""
    digest = hashlib.sha256()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for package in ("embroidery_core", "toyworld"):
        for name in sorted(n for n in os.listdir(os.path.join(root, package)) if n.endswith(".py")):
            digest.update(f"{package}/{name}\0".encode())
            with open(os.path.join(root, package, name), "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:16]


def run_identity(technique: str, k: int, seed: int, designs: int, config: ToyRunConfig,
                 weights: str | None, classifier_weights: str | None) -> dict:
    """What a run's numbers depend on: its task, the run config, the digests of the two model
    files and of the code. A stored run is reused only when all of it matches."""
    from .classifier import WEIGHTS as CLASSIFIER_WEIGHTS
    from .model import WEIGHTS as BASE_WEIGHTS
    from .train_base import init_digest

    return {"technique": technique, "reference": k, "seed": seed, "designs": designs,
            "config": dataclasses.asdict(config), "base": init_digest(weights or BASE_WEIGHTS),
            "classifier": init_digest(classifier_weights or CLASSIFIER_WEIGHTS), "code": code_digest()}


def _stored_path(runs_dir: str, identity: dict) -> str:
    name = f"{identity['technique'].replace(' ', '-')}_ref{identity['reference']}_seed{identity['seed']}.json"
    return os.path.join(runs_dir, name)


def stored_run(runs_dir: str | None, identity: dict) -> dict | None:
    """The run kept in ``runs_dir`` for ``identity``, or None (absent, or made with anything else)."""
    if not runs_dir:
        return None
    path = _stored_path(runs_dir, identity)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        stored = json.load(f)
    if stored.get("identity") != identity:
        log.warning("%s was made with other settings or models; running it again", path)
        return None
    return stored["result"]


def reference_seed(technique: str, k: int, min_cells: float = 0.0) -> int:
    """The design seed of ``technique``'s reference ``k``: the k-th from BENCH_REFERENCE_SEED + 1000 x
    the technique's index on whose design holds ``min_cells`` coarse cells of motif."""
    start = BENCH_REFERENCE_SEED + 1000 * TECHNIQUES.index(technique)
    return demo.design_seeds(k + 1, start, REFERENCE_COLOURS, min_cells)[k]


def _run_task(task) -> dict:
    """One (technique, reference, seed) run, with the models loaded once per process; with a
    runs folder, its result is written there (atomically) as soon as it is done."""
    technique, k, seed, designs, config, weights, classifier_weights, threads, runs_dir, identity = task
    key = (weights, classifier_weights)
    if _WORKER.get("key") != key:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)  # a spawned worker
        torch.set_num_threads(threads)
        _WORKER.update(key=key, models=load_toy_model(weights), classifier=load_classifier(classifier_weights))
    (unet, encoder), classifier = _WORKER["models"], _WORKER["classifier"]
    targets = demo.new_designs(designs, technique, BENCH_DESIGN_SEED, config.min_motif_cells)
    tick = time.monotonic()
    result = run_one(unet, encoder, classifier, technique, reference_seed(technique, k, config.min_motif_cells),
                     seed, targets, config)
    log.info("%s ref %d seed %d in %.0f s: %s", technique, k, seed, time.monotonic() - tick,
             "; ".join(f"{m} acc {result[m]['technique_accuracy']:.2f} leak {result[m]['palette_leak']:.1f}"
                       for m in METHODS[:-2]))
    result = {"technique": technique, "reference": k, "seed": seed, **result}
    if runs_dir:
        write_text(_stored_path(runs_dir, identity), json.dumps({"identity": identity, "result": result}, indent=1))
    return result


def run(refs: int, designs: int, seeds: int, techniques=BENCH_TECHNIQUES, config: ToyRunConfig | None = None,
        weights: str | None = None, classifier_weights: str | None = None, jobs: int = 1,
        runs_dir: str | None = None) -> tuple[list[dict], int]:
    """Every (technique, reference, seed) run, and how many of them were read back from
    ``runs_dir``; a list of dicts with the metrics per method, in task order. The runs are
    independent and seeded, so ``jobs`` processes (one torch thread each) give the same numbers
    as one, and a run kept in ``runs_dir`` by an earlier, interrupted invocation (same task,
    config and model files) is the run this one would make: a long benchmark can be finished
    over several sessions."""
    config = config or ToyRunConfig()
    tasks = []
    for technique in techniques:
        for k in range(refs):
            for seed in range(seeds):
                identity = run_identity(technique, k, seed, designs, config, weights, classifier_weights)
                tasks.append((technique, k, seed, designs, config, weights, classifier_weights,
                              1 if jobs > 1 else torch.get_num_threads(), runs_dir, identity))
    results = [stored_run(runs_dir, task[-1]) for task in tasks]
    todo = [task for task, result in zip(tasks, results) if result is None]
    if todo and jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            fresh = pool.map(_run_task, todo, chunksize=1)
    else:
        fresh = [_run_task(task) for task in todo]
    fresh_iter = iter(fresh)
    return [result if result is not None else next(fresh_iter) for result in results], len(tasks) - len(todo)


# --- the base model's own ceiling, and the gate ----------------------------------------------

class BaseCheck(NamedTuple):
    """What base_check measured: the markdown ``table``, the ``accuracy`` per technique at the
    first strength, and ``misses``: per new design, (its subject, how many of the checked
    training techniques the classifier misread on it at the first strength)."""

    table: str
    accuracy: dict[str, float]
    misses: tuple[tuple[str, int], ...]


def misses_line(misses: tuple[tuple[str, int], ...], trained: int, strength: float = GATE_STRENGTH) -> str:
    """One line naming how often each new design's output was misread, so that a failed gate says
    whether its misses are spread over the designs or held by a few of them."""
    cells = ", ".join(f"#{i} {subject} {count}" for i, (subject, count) in enumerate(misses))
    return f"Training techniques misread per new design (of {trained}, at strength {strength}): {cells}."


def base_check(designs: int = GATE_DESIGNS, strengths=(GATE_STRENGTH,), techniques=TRAIN_TECHNIQUES + HELD_OUT,
               weights: str | None = None, round_trip: bool = False, classifier_weights: str | None = None,
               config: ToyRunConfig | None = None, design_seed: int = BENCH_DESIGN_SEED) -> BaseCheck:
    """How well the base model draws each technique by its own words, no LoRA, same protocol
    (img2img from the benchmark's new designs, "a <subject> in <technique> style"). For the
    training techniques this is the ceiling a one-shot LoRA builds on; for the held-out
    combinations it is the prior a LoRA only has to bind the trigger word to. Returns a markdown
    table (technique accuracy and HFRD(gt), one row per technique, one column pair per strength),
    the accuracy per technique at the first strength and the misses per new design (BaseCheck).
    ``config``: the runs' sampler settings (steps, CFG, eta) and the new designs' minimum motif
    (min_motif_cells); default ToyRunConfig(), every design. ``design_seed``: where the new designs'
    seeds start (the benchmark's by default; another start reads the gate on other designs).

    ``round_trip``: start from the ground-truth renders of those designs instead, so the model
    only has to keep stitches it is shown, and add a first column with the classifier's accuracy
    on the renders themselves. It tells a base model that loses textures apart from a classifier
    that cannot read them."""
    from embroidery_core import metrics

    unet, encoder = load_toy_model(weights)
    classifier = load_classifier(classifier_weights)
    config = config or ToyRunConfig()
    header = "| Technique | " + ("acc. of render | " if round_trip else "") \
        + " | ".join(f"acc. @ {s} | HFRD(gt) @ {s}" for s in strengths) + " |"
    lines = [header, "|---|" + ("---:|" if round_trip else "") + "---:|---:|" * len(strengths)]
    accuracy, missed, subjects = {}, [0] * designs, []
    for technique in techniques:
        targets = demo.new_designs(designs, technique, design_seed, config.min_motif_cells)
        subjects = subjects or [t.subject for t in targets]
        renders = torch.cat([t.embroidery for t in targets])
        start = renders if round_trip else torch.cat([t.design for t in targets])
        prompts = [embroidery_prompt(t.subject, technique) for t in targets]
        cells = [f"{_accuracy(classifier, renders.numpy(), technique):.2f}"] if round_trip else []
        for strength in strengths:
            out = generate(unet, encoder, prompts, config.sample_steps, config.cfg, 0, init_images=start,
                           strength=strength, eta=config.eta).numpy()
            hfrd_gt = np.mean([metrics.hfrd(o, t.embroidery[0].numpy()) for o, t in zip(out, targets)])
            predicted = predict(classifier, out)
            read = float(np.mean([p == technique for p in predicted]))
            if technique not in accuracy and technique in TRAIN_TECHNIQUES:  # the first strength's
                missed = [m + (p != technique) for m, p in zip(missed, predicted)]
            accuracy.setdefault(technique, read)
            cells += [f"{read:.2f}", f"{hfrd_gt:.1f}"]
        lines.append(f"| `{technique}`{_role(technique)} | " + " | ".join(cells) + " |")
    return BaseCheck("\n".join(lines), accuracy, tuple(zip(subjects, missed)))


def _accuracy(classifier, images, technique: str) -> float:
    return float(np.mean([p == technique for p in predict(classifier, images)]))


def _role(technique: str) -> str:
    return " (held out)" if technique in HELD_OUT else " (new kind)" if technique in NEW_KIND_TECHNIQUES else ""


def gate_verdict(accuracy: dict[str, float], designs: int = GATE_DESIGNS, eta: float = 0.0,
                 cfg: float = ToyRunConfig.cfg, min_cells: float = 0.0) -> tuple[bool, str]:
    """The gate on base_check's accuracies from ``designs`` new designs each: every training
    technique >= GATE_TRAIN, every held-out combination >= GATE_HELD_OUT (techniques not measured
    fail it), on at least GATE_DESIGNS designs (fewer is a smoke run, never a pass)."""
    train = [accuracy.get(t, 0.0) for t in TRAIN_TECHNIQUES]
    held = [accuracy.get(t, 0.0) for t in HELD_OUT]
    passed = min(train) >= GATE_TRAIN and min(held) >= GATE_HELD_OUT and designs >= GATE_DESIGNS
    few = f" (fewer than the gate's {GATE_DESIGNS}: not a gate run)" if designs < GATE_DESIGNS else ""
    return passed, (f"Base-model gate {'PASSED' if passed else 'FAILED'}: lowest accuracy {min(train):.2f} over the "
                    f"{len(train)} training techniques (needs >= {GATE_TRAIN}), {min(held):.2f} over the "
                    f"{len(held)} held-out combinations named by their words (needs >= {GATE_HELD_OUT}); "
                    f"img2img from {designs} new designs{few}"
                    + (f" of >= {min_cells:g} coarse cells of motif" if min_cells else " (every design, no motif rule)")
                    + f" at strength {GATE_STRENGTH}, "
                    f"{f'ancestral sampling (eta {eta:g})' if eta else 'DDIM'}, CFG {cfg:g}, no LoRA.")


# --- report ----------------------------------------------------------------------------------

def bootstrap_interval(values, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile 95 % interval of the mean of ``values`` over ``samples`` resamplings (seeded)."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return float(values.mean()), float(values.mean())
    draws = np.random.default_rng(seed).integers(0, len(values), (samples, len(values)))
    means = values[draws].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def summarise(runs: list[dict], methods=METHODS) -> dict[str, dict[str, tuple[float, float, float, float]]]:
    """Per method and metric: (mean, standard deviation, 95 % interval low, high) over runs."""
    out = {}
    for m in methods:
        out[m] = {}
        for k in METRIC_KEYS:
            values = [r[m][k] for r in runs]
            out[m][k] = (float(np.mean(values)), float(np.std(values)), *bootstrap_interval(values))
    return out


def paired(runs: list[dict], against=METHODS[1:-1], method: str = "emolora") -> dict[str, dict[str, tuple]]:
    """Per other method and metric: EmoLoRA minus it, run by run (same technique, reference and
    seed): (mean difference, 95 % interval low, high, share of runs where EmoLoRA is better)."""
    better_high = HIGHER_IS_BETTER
    out = {}
    for other in against:
        out[other] = {}
        for k in METRIC_KEYS:
            diff = np.array([r[method][k] - r[other][k] for r in runs])
            wins = diff > 0 if k in better_high else diff < 0
            out[other][k] = (float(diff.mean()), *bootstrap_interval(diff), float(wins.mean()))
    return out


def _digits(key: str) -> int:
    return 2 if key in TWO_DIGITS else 1


def markdown_table(summary: dict) -> str:
    lines = ["| Method | " + " | ".join(c for _, c in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for method, values in summary.items():
        cells = []
        for key, _ in COLUMNS:
            mean, std, low, high = values[key]
            d = _digits(key)
            cells.append(f"{mean:.{d}f} ± {std:.{d}f} [{low:.{d}f}, {high:.{d}f}]")
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(comparison: dict) -> str:
    lines = ["| EmoLoRA minus | " + " | ".join(c for _, c in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for other, values in comparison.items():
        cells = []
        for key, _ in COLUMNS:
            mean, low, high, wins = values[key]
            d = _digits(key)
            cells.append(f"{mean:+.{d}f} [{low:+.{d}f}, {high:+.{d}f}] ({100 * wins:.0f} %)")
        lines.append(f"| {LABELS[other]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_block(runs: list[dict], args, minutes: float, gate_table: str, gate_line: str, reused: int = 0) -> str:
    main_runs = [r for r in runs if r["technique"] in HELD_OUT]
    techniques = [t for t in BENCH_TECHNIQUES if any(r["technique"] == t for r in runs)]
    command = (f"python -m toyworld.benchmark --refs {args.refs} --designs {args.designs} --seeds {args.seeds}"
               + (f" --techniques '{args.techniques}'" if args.techniques != ",".join(BENCH_TECHNIQUES) else "")
               + (" --quick" if args.quick else "") + (f" --weights {args.weights}" if args.weights else "")
               + (f" --min-motif-cells {args.min_motif_cells:g}"
                  if args.min_motif_cells != BENCH_MIN_MOTIF_CELLS else ""))
    parts = [RESULTS_START, "",
             f"- Command: `{command}`",
             f"- Date: {datetime.date.today().isoformat()}; commit: `{git_commit()['commit'] or 'unknown'}` (plus the "
             "working tree of this change); torch " + torch.__version__
             + f"; arithmetic {arithmetic()}, {torch.get_num_threads()} thread(s).",
             f"- Size: {len(techniques)} technique(s) x {args.refs} reference(s) x {args.seeds} seed(s) = "
             f"{len(runs)} runs, each turning the same {args.designs} new designs; wall clock {minutes:.1f} min"
             + (f" in this invocation ({reused} runs read back from an earlier one's --runs-dir)." if reused else "."),
             f"- {gate_line}", "", gate_table, "",
             "Cells: mean ± standard deviation over runs [bootstrap 95 % interval of the mean]."]
    if main_runs:
        parts += ["", f"Held-out combinations of known attributes ({len(main_runs)} runs):", "",
                  markdown_table(summarise(main_runs)), "",
                  "EmoLoRA's paired differences over the same runs, mean [95 % interval] (share of runs where "
                  "EmoLoRA is better):", "", paired_table(paired(main_runs))]
    for technique in techniques:
        subset = [r for r in runs if r["technique"] == technique]
        label = "the new kind, the hard case" if technique not in HELD_OUT else "held out"
        parts += ["", f"`{technique}` only ({label}, {len(subset)} runs):", "", markdown_table(summarise(subset))]
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
    parser.add_argument("--refs", type=int, default=2, help="references per technique (K)")
    parser.add_argument("--designs", type=int, default=6, help="new designs per run (M)")
    parser.add_argument("--seeds", type=int, default=2, help="training/sampling seeds per reference")
    parser.add_argument("--techniques", default=",".join(BENCH_TECHNIQUES),
                        help="comma-separated techniques: held-out combinations and/or the new kind's")
    parser.add_argument("--doc", default=None, help="markdown file whose results block is rewritten")
    parser.add_argument("--json", default=None, help="write every run's numbers here")
    parser.add_argument("--gate-designs", type=int, default=GATE_DESIGNS,
                        help="new designs per technique in the gate / --base-check (%(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (per process with --jobs)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="run the independent (technique, reference, seed) runs in this many processes, one "
                             "thread each (2 on a 2-core machine: the same numbers, about half the time)")
    parser.add_argument("--runs-dir", default=None,
                        help="keep every finished run here and reuse the ones an earlier, interrupted "
                             "invocation left (same task, settings, model files and code): resumable")
    parser.add_argument("--weights", default=None, help="another toy base model file (default: the shipped one)")
    parser.add_argument("--classifier", default=None, help="another technique classifier file")
    parser.add_argument("--quick", action="store_true", help="the demo's smoke-run iterations (checks the script only)")
    parser.add_argument("--eta", type=float, default=ToyRunConfig().eta,
                        help="sampler: 0 deterministic DDIM (default), 1 ancestral; the gate and every img2img run "
                             "(DiffStyler's inversion-based sampler stays deterministic)")
    parser.add_argument("--cfg", type=float, default=ToyRunConfig().cfg,
                        help="classifier-free guidance scale of the gate and of every run's sampling "
                             "(default %(default)s)")
    parser.add_argument("--min-motif-cells", type=float, default=BENCH_MIN_MOTIF_CELLS,
                        help="references and new designs hold at least this much motif, in coarse stitch cells "
                             "(default %(default)g, 15.6 %% of the image; 0: every design, the gate of rounds 1-6)")
    parser.add_argument("--base-check", action="store_true",
                        help="only print the gate: how well the base model draws every technique by its own words, "
                             "how many training techniques each new design's outputs miss, and the verdict")
    parser.add_argument("--gate-seed", type=int, default=BENCH_DESIGN_SEED,
                        help="with --base-check: take the gate's new designs from this design seed on "
                             "(default %(default)s, the benchmark's; another start checks the gate on other designs)")
    parser.add_argument("--round-trip", action="store_true",
                        help="with --base-check: start from the ground-truth renders at low strengths, to see "
                             "whether the base model keeps stitches it is shown")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    techniques = tuple(t.strip() for t in args.techniques.split(",") if t.strip())
    unknown = [t for t in techniques if t not in HELD_OUT + NEW_KIND_TECHNIQUES]
    if unknown:
        parser.error(f"not held-out techniques: {unknown}; choose from {HELD_OUT + NEW_KIND_TECHNIQUES}")
    if args.round_trip and not args.base_check:
        parser.error("--round-trip only applies to --base-check")
    if args.gate_seed != BENCH_DESIGN_SEED and not args.base_check:
        parser.error("--gate-seed only applies to --base-check (the benchmark's runs keep their designs)")
    if args.gate_seed <= TRAIN_DESIGN_SEEDS:
        parser.error(f"--gate-seed must be above {TRAIN_DESIGN_SEEDS}: lower seeds are the base's training designs")
    if args.eta < 0:
        parser.error(f"--eta must be >= 0, got {args.eta}")
    if not args.cfg >= 1:
        parser.error(f"--cfg must be >= 1 (1: the prompt's prediction alone, no guidance), got {args.cfg}")
    if not 0 <= args.min_motif_cells <= MAX_MOTIF_CELLS:
        parser.error(f"--min-motif-cells must be in 0..{MAX_MOTIF_CELLS:g} (a design holds at most about 25), "
                     f"got {args.min_motif_cells}")
    config = ToyRunConfig(**(demo.QUICK if args.quick else {}), eta=args.eta, cfg=args.cfg,
                          min_motif_cells=args.min_motif_cells)
    gate_designs = min(args.gate_designs, 2) if args.quick else args.gate_designs
    if args.base_check:
        strengths = ROUND_TRIP_STRENGTHS if args.round_trip else (GATE_STRENGTH, 0.9)
        table, accuracy, misses = base_check(gate_designs, strengths,
                                             TRAIN_TECHNIQUES + HELD_OUT + NEW_KIND_TECHNIQUES,
                                             args.weights, args.round_trip, args.classifier, config, args.gate_seed)
        print(table)
        if not args.round_trip:
            print("\n" + misses_line(misses, len(TRAIN_TECHNIQUES), strengths[0]))
            print("\n" + gate_verdict(accuracy, gate_designs, args.eta, args.cfg, args.min_motif_cells)[1])
        return 0
    start = time.monotonic()
    gate_table, accuracy, _ = base_check(gate_designs, (GATE_STRENGTH,), TRAIN_TECHNIQUES + HELD_OUT,
                                         args.weights, classifier_weights=args.classifier, config=config)
    passed, gate_line = gate_verdict(accuracy, gate_designs, args.eta, args.cfg, args.min_motif_cells)
    log.info(gate_line)
    runs, reused = run(args.refs, args.designs, args.seeds, techniques, config, args.weights, args.classifier,
                       args.jobs, args.runs_dir)
    minutes = (time.monotonic() - start) / 60
    block = results_block(runs, args, minutes, gate_table, gate_line, reused)
    print(block)
    if args.json:
        write_text(args.json, json.dumps({"args": vars(args), "minutes": minutes, "gate_passed": passed,
                                          "gate": accuracy, "runs": runs}, indent=1))
    if args.doc:
        write_doc(args.doc, block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
