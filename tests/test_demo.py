"""The README's demo command, as a user runs it: `python -m toyworld demo --quick --out DIR`."""
import json
import os
import subprocess
import sys
import time

from PIL import Image

from toyworld.demo import METRIC_KEYS, QUICK, STYLE_BLOCK_COUNT
from toyworld.model import TOY_UNET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK_BUDGET_S = 60


def test_quick_demo_writes_contact_sheet_and_metrics(tmp_path):
    out = tmp_path / "demo"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "toyworld", "demo", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=3 * QUICK_BUDGET_S)
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert elapsed < QUICK_BUDGET_S, f"quick demo took {elapsed:.0f} s"

    with Image.open(out / "contact_sheet.png") as sheet:  # 7 rows: reference ... ground truth
        assert sheet.width > 64 * QUICK["new_designs"] and sheet.height > 64 * 2 * 7
    result = json.loads((out / "metrics.json").read_text())
    assert result["quick"] is True and result["trigger"] == "<trigger>"
    assert result["config"]["stage1_iterations"] == QUICK["stage1_iterations"]
    # chosen by the block metric on the base and the pair: four distinct attention blocks
    blocks = result["style_blocks"]
    assert len(set(blocks)) == STYLE_BLOCK_COUNT and set(blocks) <= set(TOY_UNET.arch().attention_blocks())
    for method in ("emolora", "emolora_whole_lora", "no_lora", "ground_truth"):
        assert set(result["metrics"][method]) == set(METRIC_KEYS)
        assert all(isinstance(v, float) for v in result["metrics"][method].values())
    assert {"stage1_s", "stage2_s", "inference_s", "total_s"} <= set(result["timings"])


def test_demo_rejects_a_technique_the_base_model_has_seen(tmp_path):
    done = subprocess.run([sys.executable, "-m", "toyworld", "demo", "--quick", "--technique", "satin horizontal fine matte",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "held-out" in done.stderr


def test_demo_refuses_an_unusable_output_folder_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "toyworld", "demo", "--quick", "--out", str(blocker / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "pass a writable --out" in done.stderr
    assert "stage 1" not in done.stdout and time.monotonic() - start < 30
