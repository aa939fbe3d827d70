"""Integration tests against a real ComfyUI tree (skipped unless COMFYUI_PATH is set).

A package so that our helper modules (server, ui, ...) never shadow ComfyUI's own
top-level modules of the same name once the ComfyUI tree is on sys.path."""
