"""The fidelity benchmark script keeps working (smoke size) and rewrites only its results block."""
import json

import pytest
import torch

from embroidery_core.provenance import git_commit
from toyworld import benchmark


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
    assert f"commit: `{git_commit()['commit'] or 'unknown'}`" in text
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


def test_base_check_has_a_row_per_technique_and_marks_the_held_out_ones():
    torch.set_num_threads(1)
    table = benchmark.base_check(1, strengths=(0.6,), techniques=("satin", "chain")).splitlines()
    assert len(table) == 4 and table[0].count("@ 0.6") == 2
    assert table[2].startswith("| `satin` |") and table[3].startswith("| `chain` (held out) |")
    accuracy, hfrd_gt = (float(c) for c in table[2].strip("|").split("|")[1:])
    assert 0.0 <= accuracy <= 1.0 and hfrd_gt >= 0.0


def test_round_trip_check_starts_from_the_renders_the_classifier_reads():
    torch.set_num_threads(1)
    table = benchmark.base_check(1, strengths=(0.1,), techniques=("satin",), round_trip=True).splitlines()
    assert table[0].startswith("| Technique | acc. of render | acc. @ 0.1 | HFRD(gt) @ 0.1 |")
    assert table[1].count("---:") == 3
    on_render, accuracy, hfrd_gt = (float(c) for c in table[2].strip("|").split("|")[1:])
    assert on_render == 1.0  # the classifier reads the generator's own render
    assert 0.0 <= accuracy <= 1.0
    # Starting from the render at strength 0.1 keeps it nearly as it is; from the flat design
    # (the ordinary check) the output is nowhere near the render.
    from_design = benchmark.base_check(1, strengths=(0.1,), techniques=("satin",)).splitlines()[2]
    assert hfrd_gt < float(from_design.strip("|").split("|")[2])


def test_round_trip_needs_base_check():
    with pytest.raises(SystemExit):
        benchmark.main(["--round-trip"])
