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


def test_stage2_trains_at_its_own_rate_and_without_one_at_stage_1s():
    """Train Stage 2 has its own learning-rate input; the toy run's stage2_learning_rate is that
    input (1e-3 by default), and None keeps the paper's one rate (the benchmark's one-rate row)."""
    import dataclasses

    from embroidery_core import keys
    from toyworld import demo
    from toyworld.model import load_toy_model

    unet, encoder = load_toy_model()
    config = demo.ToyRunConfig(**{**QUICK, "stage1_iterations": 2, "stage2_iterations": 1, "sample_steps": 2})
    reference = demo.make_reference(demo.HELD_OUT[0], 0)
    pair = demo.pair_latents(encoder, reference.design, reference.embroidery, reference.subject)
    style = ["input_blocks.1.1"]
    stage1 = demo.train_stage1(unet, pair, config, style)
    _, _, generated = demo.generate_pairs(unet, encoder, stage1, demo.STAGE2_SUBJECTS[:1], config)
    rate = lambda lora: float(lora.metadata[keys.config_key("learning_rate")])  # noqa: E731
    assert rate(stage1) == config.learning_rate == 5e-3
    assert rate(demo.train_stage2(unet, pair, stage1, generated, config)) == config.stage2_learning_rate == 1e-3
    one_rate = dataclasses.replace(config, stage2_learning_rate=None)
    assert rate(demo.train_stage2(unet, pair, stage1, generated, one_rate)) == config.learning_rate
    assert rate(demo.train_stage1(unet, pair, one_rate, style)) == config.learning_rate  # stage 1 keeps its own
