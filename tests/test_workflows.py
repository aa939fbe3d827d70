"""Every template in workflows/ is UI-format JSON that loads without missing nodes or bad
links on every supported ComfyUI, equals what scripts/build_workflows.py makes from its spec, and
has a current thumbnail beside it."""
import glob
import json
import os
import subprocess
import sys

import pytest

from tests.workflow_format import load_snapshot, validate, widget_slots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))
PACK_PREFIX = "Embroidery"


def test_there_are_templates():
    names = {os.path.basename(p) for p in WORKFLOWS}
    assert {"embroidery_train_one_shot.json", "embroidery_design_from_photo.json"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_template_is_valid_ui_format(path):
    with open(path) as f:
        wf = json.load(f)
    assert wf["version"] == 0.4 and {"nodes", "links", "last_node_id", "last_link_id"} <= set(wf)
    info = load_snapshot()
    assert validate(wf, info) == []
    assert any(n["type"] == "Note" for n in wf["nodes"]), "every template explains itself in a note"
    for n in wf["nodes"]:
        if n["type"].startswith(PACK_PREFIX):
            assert n["type"] in info, f"unknown pack node {n['type']}"
    assert wf["last_link_id"] == len(wf["links"]) and wf["last_node_id"] == max(n["id"] for n in wf["nodes"])


def test_templates_match_their_specs():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "build_workflows.py"), "--offline",
                             "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_validate_catches_a_mistyped_link_and_a_lost_widget():
    info = load_snapshot()
    with open(os.path.join(ROOT, "workflows", "embroidery_train_one_shot.json")) as f:
        wf = json.load(f)
    stage1 = next(n for n in wf["nodes"] if n["type"] == "EmbroideryTrainStage1")
    stage1["widgets_values"].pop()
    pair_link = next(l for l in wf["links"] if l[3] == stage1["id"] and l[5] == "EMBROIDERY_ANALOGY_PAIR")
    pair_link[1], pair_link[2] = 1, 0  # now a MODEL goes into 'pair'
    problems = validate(wf, info)
    assert any("widget values" in p for p in problems)
    assert any("gives MODEL" in p and "takes EMBROIDERY_ANALOGY_PAIR" in p for p in problems)


def test_seed_widgets_carry_the_frontend_control_value():
    info = load_snapshot()
    slots = widget_slots(info, "EmbroideryTrainStage1")
    assert slots[slots.index("seed") + 1] == "seed:control"
    assert widget_slots(info, "LoadImage") == ["image", "image:upload"]


def _build_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_workflows", os.path.join(ROOT, "scripts", "build_workflows.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_every_template_has_its_thumbnail_beside_it(path):
    """Both frontends load <name>.jpg next to a template for its card in the template browser."""
    from PIL import Image

    thumbnail = path[: -len(".json")] + ".jpg"
    assert os.path.isfile(thumbnail), f"{thumbnail} is missing; run scripts/build_workflows.py"
    with Image.open(thumbnail) as image:
        assert image.format == "JPEG" and max(image.size) <= 640


def test_a_stale_or_missing_thumbnail_fails_the_check(tmp_path, monkeypatch):
    from PIL import Image

    build = _build_module()
    (tmp_path / "workflows").mkdir()
    monkeypatch.setattr(build, "ROOT", str(tmp_path))
    monkeypatch.setattr(build, "SCREENSHOTS", str(tmp_path))
    assert "no screenshot" in build.thumbnail_problem("t", check=True)
    Image.new("RGB", (1280, 720), (200, 30, 30)).save(tmp_path / "t.png")
    assert "no thumbnail" in build.thumbnail_problem("t", check=True)
    assert build.thumbnail_problem("t", check=False) is None  # the build writes it
    assert build.thumbnail_problem("t", check=True) is None
    Image.new("RGB", (1280, 720), (30, 30, 200)).save(tmp_path / "t.png")  # a new run's screenshot
    assert "stale" in build.thumbnail_problem("t", check=True)


def test_templates_are_valid_on_every_supported_comfyui():
    """Built for the oldest version; on a newer one a stock node may only have gained trailing
    widgets (which the frontend fills with defaults), and the pack's nodes must be the same."""
    from tests.workflow_format import SUPPORTED_VERSIONS, snapshot_path

    for version in SUPPORTED_VERSIONS:
        assert os.path.isfile(snapshot_path(version)), f"no object_info snapshot for ComfyUI {version}"
        info = load_snapshot(version)
        for path in WORKFLOWS:
            with open(path) as f:
                assert validate(json.load(f), info, newer=True) == [], (version, path)
