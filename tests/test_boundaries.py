"""The package boundaries, read from every file they guard: the core (what ComfyUI users install)
never imports ComfyUI or the toy world; the toy world, a research harness beside the core, imports
the core but never ComfyUI; nothing in nodes/ imports the toy world."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFY = {"comfy", "comfy_extras", "comfy_api", "comfy_execution", "folder_paths", "nodes", "node_helpers", "server",
         "latent_preview", "execution"}


def python_files(package):
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        yield from (os.path.join(folder, f) for f in sorted(files) if f.endswith(".py"))


def imported_packages(path):
    """Top-level names of every import in a file ('.' for relative ones), wherever the import sits."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield "." * node.level + node.module.split(".")[0]
        elif isinstance(node, ast.ImportFrom):  # from . import x, from .. import x
            yield from ("." * node.level + alias.name for alias in node.names)


@pytest.mark.parametrize("package,forbidden", [("embroidery_core", COMFY | {"toyworld", ".toyworld"}),
                                               ("toyworld", COMFY), ("nodes", {"toyworld", "..toyworld"})])
def test_no_file_crosses_its_package_boundary(package, forbidden):
    files = list(python_files(package))
    assert len(files) >= 5, f"{package} has too few files for this test to mean anything"
    crossings = {os.path.relpath(p, ROOT): sorted(set(imported_packages(p)) & forbidden) for p in files}
    assert {p: names for p, names in crossings.items() if names} == {}


def test_the_parser_sees_imports_anywhere_in_a_file(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    import comfy.model_management as mm\n    from folder_paths import x\n"
                     "from . import toyworld\nfrom ..toyworld import demo\n")
    assert set(imported_packages(str(probe))) == {"comfy", "folder_paths", ".toyworld", "..toyworld"}
