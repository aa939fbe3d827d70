"""Human-readable summaries of a LoRA: which blocks it touches and how strongly."""
from __future__ import annotations

from .blocks import block_spellings, get_arch
from .lora_file import StyleLoRA


def block_report(lora: StyleLoRA, highlight: list[str] | None = None) -> tuple[list[str], list[float], str]:
    """(block labels, per-block update norms, a text table) for an inspector node.

    The norm of a block is sqrt(sum ||up @ down * alpha/r||_F^2) over its modules: a LoRA whose
    style lives in a few blocks shows a few tall bars.
    """
    arch = get_arch(lora.arch)
    norms = lora.block_norms()
    marked = set(highlight or [])
    lines = [f"{len(lora.modules)} modules in {len(norms)} blocks ({lora.arch})",
             f"{'block (ComfyUI)':<20} {'diffusers':<28} {'modules':>7} {'rank':>5} {'norm':>10}"]
    for block, norm in norms.items():
        modules = [m for p, m in lora.modules.items() if p.startswith(block + ".")]
        ranks = sorted({m.rank for m in modules})
        star = " *" if block in marked else ""
        lines.append(f"{block:<20} {block_spellings(block, arch)['diffusers']:<28} {len(modules):>7} "
                     f"{'/'.join(map(str, ranks)):>5} {norm:>10.4g}{star}")
    outside = len([p for p in lora.modules if not any(p.startswith(b + ".") for b in norms)])
    if outside:
        lines.append(f"{outside} modules outside the UNet blocks (time embedding, conv_in/out)")
    if marked:
        lines.append("* = selected blocks")
    return list(norms), list(norms.values()), "\n".join(lines)
