"""Stitch-technique classifier: which of the 40 techniques (or a flat design) a 64 px toy image shows.

    python -m toyworld.classifier --out technique_classifier.safetensors [--steps N]

The benchmark's "technique accuracy" is the share of outputs this CNN assigns to the target
technique, all four attributes right (``attribute_accuracy`` reads one attribute of the
prediction). It is trained on fresh generator renders of every technique, held-out ones and
the new kind included (it is the judge, not a model under test), plus flat designs (a 41st
class, so an output that stayed flat counts as wrong rather than as its nearest stitch), with
light noise, blur and a shift of up to one coarse stitch, so that slightly soft or shifted
model outputs are still read by their texture. Seeded: same command, same file.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from embroidery_core.files import atomic_path
from embroidery_core.provenance import arithmetic
from .generator import SPACINGS, TECHNIQUES, attributes, make_design, render_embroidery
from .model import IMAGE_SIZE, read_metadata
from .train_base import TRAIN_DESIGN_SEEDS

CLASSES = TECHNIQUES + ("design",)
WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "technique_classifier.safetensors")
FORMAT = "embroidery-toy-technique-classifier/1"
SCRIPT_VERSION = "3"
log = logging.getLogger("toyworld.classifier")


@dataclass
class ClassifierConfig:
    seed: int = 0
    steps: int = 3000  # 41 classes (the first world's 21 needed 2000)
    batch: int = 64
    learning_rate: float = 2e-3
    width: int = 32
    noise: float = 0.03  # max std of added Gaussian noise
    blur_prob: float = 0.3  # chance of a 3x3 box blur
    max_shift: int = max(SPACINGS.values()) - 1  # px, a random roll in each direction
    threads: int = 1


class TechniqueClassifier(nn.Module):
    """Four conv stages (64 -> 8 px) and a linear head on the mean of the last feature map."""

    def __init__(self, width: int = 32, classes: int = len(CLASSES)):
        super().__init__()
        w = width

        def stage(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(*stage(3, w // 2, 1), *stage(w // 2, w, 2), *stage(w, w, 1),
                                      *stage(w, 2 * w, 2), *stage(2 * w, 2 * w, 2))
        self.head = nn.Linear(2 * w, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """IMAGE [B, H, W, 3] in 0..1 -> logits [B, classes]."""
        x = images.float().movedim(-1, 1) * 2 - 1
        return self.head(self.features(x).mean(dim=(2, 3)))


# --- data ------------------------------------------------------------------------------------

def render_example(label: int, design_seed: int, render_seed: int) -> np.ndarray:
    design = make_design(design_seed, IMAGE_SIZE)
    if CLASSES[label] == "design":
        return design.image
    return render_embroidery(design, CLASSES[label], render_seed)[0]


def make_batch(rng: np.random.Generator, config: ClassifierConfig) -> tuple[torch.Tensor, torch.Tensor]:
    labels = rng.integers(len(CLASSES), size=config.batch)
    images = torch.from_numpy(np.stack([render_example(int(k), int(rng.integers(TRAIN_DESIGN_SEEDS)),
                                                       int(rng.integers(2 ** 31))) for k in labels]))
    images = images + torch.from_numpy(rng.uniform(0, config.noise, (config.batch, 1, 1, 1))).float() \
        * torch.from_numpy(rng.standard_normal(images.shape)).float()
    blur = torch.from_numpy(rng.random(config.batch) < config.blur_prob)
    blurred = F.avg_pool2d(images.movedim(-1, 1), 3, 1, 1, count_include_pad=False).movedim(1, -1)
    images = torch.where(blur[:, None, None, None], blurred, images)
    shifts = rng.integers(0, config.max_shift + 1, (config.batch, 2))
    images = torch.stack([torch.roll(im, (int(dy), int(dx)), (0, 1)) for im, (dy, dx) in zip(images, shifts)])
    return images.clamp(0, 1), torch.from_numpy(labels)


# --- training, loading, using ----------------------------------------------------------------

def train(config: ClassifierConfig, log_every: int = 100) -> TechniqueClassifier:
    torch.manual_seed(config.seed)
    model = TechniqueClassifier(config.width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.learning_rate, total_steps=config.steps)
    rng = np.random.default_rng(config.seed)
    start, correct, seen = time.monotonic(), 0, 0
    for step in range(1, config.steps + 1):
        images, labels = make_batch(rng, config)
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(labels)
        if step % log_every == 0:
            log.info("step %d/%d  loss %.4f  train acc %.3f  %.0f s", step, config.steps, float(loss.detach()),
                     correct / seen, time.monotonic() - start)
            correct = seen = 0
    return model.eval()


def save_classifier(path: str, model: TechniqueClassifier, metadata: dict[str, str]) -> str:
    meta = {"format": FORMAT, "classes": json.dumps(CLASSES), **{k: str(v) for k, v in metadata.items()}}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(state, tmp, metadata=meta)
    return path


def load_classifier(path: str | None = None) -> TechniqueClassifier:
    path = path or WEIGHTS
    meta = read_metadata(path)
    if meta.get("format") != FORMAT or tuple(json.loads(meta["classes"])) != CLASSES:
        raise ValueError(f"{path} is not a technique classifier for classes {CLASSES}")
    model = TechniqueClassifier(int(json.loads(meta["config"])["width"]))
    model.load_state_dict(safetensors.torch.load_file(path))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def predict(model: TechniqueClassifier, images) -> list[str]:
    """Class names for an IMAGE batch [B, H, W, 3] (numpy or torch, 0..1); resized to 64 px."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images).float()
    x = x[None] if x.ndim == 3 else x
    if x.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x.movedim(-1, 1), size=(IMAGE_SIZE, IMAGE_SIZE), mode="area").movedim(1, -1)
    return [CLASSES[int(i)] for i in model(x).argmax(1)]


def technique_accuracy(model: TechniqueClassifier, images, technique: str) -> float:
    """Share of ``images`` classified as ``technique`` (every attribute right)."""
    if technique not in CLASSES:
        raise ValueError(f"unknown technique {technique!r}; expected one of {CLASSES}")
    labels = predict(model, images)
    return sum(label == technique for label in labels) / len(labels)


def attribute_hits(predicted: list[str], technique: str, attribute: int) -> list[float]:
    """Per prediction, 1.0 where its ``attribute`` (0 kind, 1 direction, 2 spacing, 3 sheen) matches
    ``technique``'s; a prediction of "design" matches nothing."""
    want = attributes(technique)[attribute]
    return [float(p != "design" and attributes(p)[attribute] == want) for p in predicted]


def main(argv: list[str] | None = None) -> int:
    defaults = ClassifierConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--threads", type=int, default=defaults.threads)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    config = ClassifierConfig(seed=args.seed, steps=args.steps, threads=args.threads)
    torch.set_num_threads(config.threads)
    start = time.monotonic()
    model = train(config)
    save_classifier(args.out, model, {"config": json.dumps(asdict(config), sort_keys=True), "seed": config.seed,
                                      "steps": config.steps, "script_version": SCRIPT_VERSION, "built_on": arithmetic(),
                                      "train_minutes": f"{(time.monotonic() - start) / 60:.1f}"})
    log.info("saved %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
