"""EmoLoRA's evaluation metrics on images in the graph (the math lives in embroidery_core.metrics)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from comfy_api.latest import io, ui

from ..embroidery_core import metrics
from .common import CATEGORY, NodeInputError, PackNode

NOT_MEASURED = float("nan")  # what a FLOAT output holds when the input it needs is not connected


def _rgb(image: torch.Tensor, name: str, node: str) -> torch.Tensor:
    """IMAGE -> float [B, H, W, 3] on the CPU (alpha dropped)."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3 or 0 in image.shape:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise NodeInputError(node, f"{name} must be an IMAGE [B, H, W, 3], got {shape}")
    return image[..., :3].detach().float().cpu().clamp(0, 1)


def _pairs(outputs: torch.Tensor, designs: torch.Tensor, node: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(output, design) per image: one design for every output, or one design per output,
    the design resized to its output's size (nearest, so flat colours stay flat)."""
    if designs.shape[0] not in (1, outputs.shape[0]):
        raise NodeInputError(node, f"got {outputs.shape[0]} outputs but {designs.shape[0]} designs; "
                                   "connect one design, or one per output image")
    pairs = []
    for i, out in enumerate(outputs):
        design = designs[i if designs.shape[0] > 1 else 0]
        if design.shape[:2] != out.shape[:2]:
            design = F.interpolate(design.movedim(-1, 0)[None], size=tuple(out.shape[:2]), mode="nearest")[0].movedim(0, -1)
        pairs.append((out, design))
    return pairs


def _content_iou(out: torch.Tensor, design: torch.Tensor) -> float:
    """IoU of the non-background pixels of output and design, the background colour read from
    the design's border (exact for flat designs on a plain ground, a rough guide for photos)."""
    fabric = metrics.estimate_fabric_rgb(design)
    return metrics.content_iou(metrics.stitched_mask(out, fabric), metrics.stitched_mask(design, fabric))


def measure(outputs: torch.Tensor, reference: torch.Tensor | None, design: torch.Tensor | None,
            cutoff: float, node: str) -> dict[str, float]:
    """Every metric the inputs allow; NaN for the others. Outputs of a batch are averaged."""
    values = {"hfr": metrics.high_frequency_ratio(outputs, cutoff) * 100, "hfrd": NOT_MEASURED,
              "hist_ref": NOT_MEASURED, "hist_design": NOT_MEASURED, "content_iou": NOT_MEASURED}
    if reference is not None:
        values["hfrd"] = metrics.hfrd(outputs, reference, cutoff)
        values["hist_ref"] = metrics.hist_ref_similarity(outputs, reference)
    if design is not None:
        pairs = _pairs(outputs, design, node)
        values["hist_design"] = sum(metrics.hist_design_distance(o, d) for o, d in pairs) / len(pairs)
        values["content_iou"] = sum(_content_iou(o, d) for o, d in pairs) / len(pairs)
    return values


LINES = (  # key, label, direction
    ("hfr", "HFR of the output (% energy above cutoff)", ""),
    ("hfrd", "HFRD to the reference", "lower is better"),
    ("hist_ref", "Hist(ref) similarity", "higher is better"),
    ("hist_design", "Hist(design) distance", "lower is better"),
    ("content_iou", "Content IoU with the design", "higher is better"),
)


def format_report(values: dict[str, float], count: int, cutoff: float) -> str:
    lines = [f"{count} output image(s); HFR cutoff {cutoff:g} of Nyquist"]
    for key, label, direction in LINES:
        value = values[key]
        text = "not measured (connect the input it needs)" if math.isnan(value) else f"{value:.2f}"
        lines.append(f"{label:<42} {text}" + (f"  ({direction})" if direction and not math.isnan(value) else ""))
    return "\n".join(lines)


class EmbroideryMetrics(PackNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EmbroideryMetrics",
            display_name="Embroidery Metrics",
            category=f"{CATEGORY}/evaluation",
            description="EmoLoRA's evaluation numbers for generated embroideries: stitch texture (HFRD) and "
                        "thread colours (Hist(ref)) against the reference, colour and content kept from the design.",
            inputs=[
                io.Image.Input("output", tooltip="The generated embroidery (a batch is averaged)."),
                io.Image.Input("reference", optional=True,
                               tooltip="The reference embroidery photo: enables HFRD and Hist(ref)."),
                io.Image.Input("design", optional=True,
                               tooltip="The design the output was made from (one, or one per output): enables "
                                       "Hist(design) and content IoU."),
                io.Float.Input("hfr_cutoff", default=metrics.HFR_CUTOFF, min=0.05, max=1.0, step=0.01,
                               tooltip="High-frequency cutoff as a fraction of Nyquist (0.25 = periods under 8 px). "
                                       "Keep it fixed when comparing runs."),
            ],
            outputs=[
                io.String.Output(display_name="report", tooltip="All measured values, one per line."),
                io.Float.Output(display_name="hfrd", tooltip="HFRD in percentage points (NaN without reference)."),
                io.Float.Output(display_name="hist_ref", tooltip="Hist(ref) similarity 0..100 (NaN without reference)."),
                io.Float.Output(display_name="hist_design", tooltip="Hist(design) distance 0..100 (NaN without design)."),
                io.Float.Output(display_name="content_iou", tooltip="Content IoU 0..1 (NaN without design)."),
                io.Float.Output(display_name="hfr", tooltip="The output's own high-frequency ratio, in %."),
            ],
        )

    @classmethod
    def execute(cls, output, hfr_cutoff, reference=None, design=None) -> io.NodeOutput:
        node = "Embroidery Metrics"
        if not 0.05 <= hfr_cutoff <= 1.0:
            raise NodeInputError(node, f"hfr_cutoff must be in [0.05, 1], got {hfr_cutoff}")
        outputs = _rgb(output, "output", node)
        reference = None if reference is None else _rgb(reference, "reference", node)
        design = None if design is None else _rgb(design, "design", node)
        values = measure(outputs, reference, design, hfr_cutoff, node)
        text = format_report(values, outputs.shape[0], hfr_cutoff)
        return io.NodeOutput(text, values["hfrd"], values["hist_ref"], values["hist_design"],
                             values["content_iou"], values["hfr"], ui=ui.PreviewText(text))


METRICS_NODES = [EmbroideryMetrics]
