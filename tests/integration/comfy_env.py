"""Where the ComfyUI tree is, and how to import it in-process without a GPU.

Standard library + pytest only, so this imports anywhere (CI has no ComfyUI)."""
import os
import sys

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")


def comfy_path():
    """The ComfyUI tree from $COMFYUI_PATH (read now, so tests may set it late), or None."""
    path = os.environ.get("COMFYUI_PATH") or COMFYUI_PATH
    return os.path.abspath(os.path.expanduser(path)) if path else None


def comfy_version():
    """The ComfyUI version of the tree ("0.8.0"), read from its comfyui_version.py."""
    import re

    with open(os.path.join(comfy_path(), "comfyui_version.py")) as f:
        return re.search(r'__version__\s*=\s*"([^"]+)"', f.read()).group(1)


def version_tuple(version):
    return tuple(int(p) for p in version.split(".")[:3] if p.isdigit())


def missing_reason():
    """Why the integration tests cannot run here, or None when they can."""
    path = comfy_path()
    if not path:
        return "COMFYUI_PATH is not set: integration tests need a ComfyUI tree (see README)"
    if not os.path.isfile(os.path.join(path, "main.py")):
        return "COMFYUI_PATH={} has no main.py".format(path)
    return None


def require_comfy():
    """Skip the calling test module (or test) unless a ComfyUI tree is configured."""
    __tracebackhide__ = True  # report the skip at the caller's line, not here
    reason = missing_reason()
    if reason:
        pytest.skip(reason, allow_module_level=True)


def import_comfy():
    """Put the ComfyUI tree first on sys.path and import comfy in CPU mode. Idempotent.

    `comfy.cli_args.args.cpu` must be set before `comfy.model_management` is imported:
    that import probes the device, and without the flag it fails on machines with no
    CUDA driver."""
    require_comfy()
    path = comfy_path()
    if path in sys.path:
        sys.path.remove(path)
    # first, so ComfyUI's top-level modules (nodes, server, utils, ...) win over any
    # same-named folder of the pack (the repo root is on sys.path too)
    sys.path.insert(0, path)
    import comfy.options
    comfy.options.enable_args_parsing(False)  # never parse pytest's argv as ComfyUI args
    import comfy.cli_args
    if "comfy.model_management" not in sys.modules:
        comfy.cli_args.args.cpu = True
    import comfy.model_management as mm
    if mm.cpu_state != mm.CPUState.CPU:
        raise RuntimeError("comfy.model_management was imported before import_comfy() without --cpu; "
                           "call import_comfy() before anything imports comfy")
    for name in ("nodes", "server", "folder_paths"):
        mod = sys.modules.get(name)
        if mod is None:
            continue
        where = getattr(mod, "__file__", None) or str(list(getattr(mod, "__path__", [])))
        if not os.path.abspath(where).startswith(path + os.sep):
            raise RuntimeError("module {!r} was imported from {} before ComfyUI's; ComfyUI's own "
                               "top-level modules must win".format(name, where))
