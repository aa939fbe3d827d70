"""The benchmark script keeps working where CI runs it: CPU, no ComfyUI (timings not checked)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_training.py"
PRESETS = ("default", "speed", "balanced", "low_vram")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_smoke_times_both_stages_with_every_preset(smoke):
    _, data = smoke
    rows = {(r["details"]["stage"], r["details"]["preset"]): r for r in data["rows"] if r["part"] == "ours"}
    assert set(rows) == {(stage, preset) for stage in (1, 2) for preset in PRESETS}
    for row in rows.values():
        assert row["error"] is None
        assert len(row["step_times"]) >= 1 and row["s_per_step"] > 0
        assert row["flop_per_step"] > 0
    # checkpointing is real: its backward recomputes the forward, so it costs FLOPs
    assert rows[(1, "balanced")]["flop_per_step"] > rows[(1, "speed")]["flop_per_step"]
    assert rows[(1, "default")]["flop_per_step"] == rows[(1, "balanced")]["flop_per_step"]
    # stage 2 runs six passes at batch 2, stage 1 two at batch 1
    assert rows[(2, "speed")]["flop_per_step"] > 2 * rows[(1, "speed")]["flop_per_step"]


def test_smoke_says_what_it_skipped_and_records_the_environment(smoke):
    stdout, data = smoke
    assert {s["part"] for s in data["skipped"]} >= {"train_lora_node", "sampling"}
    assert all("ComfyUI" in s["reason"] for s in data["skipped"])
    assert "skipped train_lora_node" in stdout and "s/step" in stdout
    env = data["env"]
    assert env["backend"] == "core" and env["torch"] and env["date"]
    assert "commit" in env and "gpu" in env
    from embroidery_core.provenance import arithmetic
    assert env["arithmetic"] == arithmetic() and env["cpu"] in env["arithmetic"]  # where its numbers rebuild


def test_full_run_without_comfyui_fails_early_with_the_fix(monkeypatch, capsys):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    spec = importlib.util.spec_from_file_location("bench_training", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_training", bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    assert bench.main([]) == 2
    assert "--comfy" in capsys.readouterr().err
