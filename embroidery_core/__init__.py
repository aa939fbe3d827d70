"""EmoLoRA and related one-shot style methods in plain torch (no ComfyUI imports).

Reading order: blocks (names) -> lora_file (files) -> adapters (LoRA layers, router)
-> diffusion (schedules, targets, losses) -> trainer (the two stages) -> images, metrics.
"""
__version__ = "0.1.0"
