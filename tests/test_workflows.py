"""Every template in workflows/ is UI-format JSON that loads without missing nodes or bad
links, and equals what scripts/build_workflows.py makes from its spec."""
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
