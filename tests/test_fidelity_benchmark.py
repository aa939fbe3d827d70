"""The fidelity benchmark script keeps working (smoke size) and rewrites only its results block."""
import json

import pytest
import torch

from embroidery_core.toyworld import benchmark


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_smoke_run_writes_a_table_of_every_method_and_keeps_the_prose(tmp_path):
    doc = tmp_path / "FIDELITY.md"
    doc.write_text("# Fidelity\n\nProse a person wrote.\n\n" + benchmark.RESULTS_START + "old numbers"
                   + benchmark.RESULTS_END + "\n\nMore prose.\n")
    runs_json = tmp_path / "runs.json"
    assert benchmark.main(["--quick", "--techniques", "chain", "--refs", "1", "--designs", "1", "--seeds", "1",
                           "--doc", str(doc), "--json", str(runs_json)]) == 0

    text = doc.read_text()
    assert text.startswith("# Fidelity\n\nProse a person wrote.") and text.endswith("More prose.\n")
    assert "old numbers" not in text and "--refs 1 --designs 1 --seeds 1" in text
    for method in benchmark.METHODS:
        assert f"| {benchmark.LABELS[method]} |" in text
    runs = json.loads(runs_json.read_text())["runs"]
    assert len(runs) == 1 and runs[0]["technique"] == "chain"
    truth = runs[0]["ground_truth"]
    assert truth["hfrd_gt"] == 0.0 and truth["hist_gt"] == pytest.approx(100.0)  # the render against itself


def test_summary_is_mean_and_spread_over_runs():
    runs = [{m: {k: float(i) for k in benchmark.METRIC_KEYS} for m in benchmark.METHODS} for i in (1, 3)]
    summary = benchmark.summarise(runs)
    assert summary["emolora"]["hfrd"] == (2.0, 1.0)
