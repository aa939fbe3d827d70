"""EmoLoRA embroidery style nodes for ComfyUI.

ComfyUI calls ``comfy_entrypoint``; nothing is imported from ComfyUI or patched until then.
"""
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import EmbroideryExtension

    return EmbroideryExtension()
