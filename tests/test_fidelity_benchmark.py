"""The fidelity benchmark script keeps working (smoke size) and rewrites only its results block."""
import json

import numpy as np
import pytest
import torch

from embroidery_core.provenance import git_commit
from toyworld import HELD_OUT, TRAIN_TECHNIQUES, benchmark


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
    assert benchmark.main(["--quick", "--techniques", "knot vertical fine metallic", "--refs", "1", "--designs", "1",
                           "--seeds", "1", "--doc", str(doc), "--json", str(runs_json)]) == 0

    text = doc.read_text()
    assert text.startswith("# Fidelity\n\nProse a person wrote.") and text.endswith("More prose.\n")
    assert "old numbers" not in text and "--refs 1 --designs 1 --seeds 1" in text
    assert f"commit: `{git_commit()['commit'] or 'unknown'}`" in text
    assert "Base-model gate PASSED" in text or "Base-model gate FAILED" in text
    for method in benchmark.METHODS:
        assert f"| {benchmark.LABELS[method]} |" in text
    for method in benchmark.METHODS[1:-1]:  # EmoLoRA's paired differences to every other method
        assert text.count(f"| {benchmark.LABELS[method]} |") == 3  # main table, paired table, per technique
    runs = json.loads(runs_json.read_text())
    assert set(runs["gate"]) == set(TRAIN_TECHNIQUES + HELD_OUT)
    assert len(runs["runs"]) == 1 and runs["runs"][0]["technique"] == "knot vertical fine metallic"
    truth = runs["runs"][0]["ground_truth"]
    assert truth["hfrd_gt"] == 0.0 and truth["hist_gt"] == 0.0  # the render against itself
    assert truth["technique_accuracy"] == 1.0 and truth["palette_leak"] < 5.0


def test_summary_is_mean_spread_and_interval_over_runs():
    runs = [{m: {k: float(i) for k in benchmark.METRIC_KEYS} for m in benchmark.METHODS} for i in (1, 3)]
    mean, std, low, high = benchmark.summarise(runs)["emolora"]["hfrd"]
    assert (mean, std) == (2.0, 1.0) and 1.0 <= low <= mean <= high <= 3.0


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_more_runs():
    rng = np.random.default_rng(0)
    few, many = rng.normal(5, 1, 8), rng.normal(5, 1, 200)
    low, high = benchmark.bootstrap_interval(few)
    assert low < few.mean() < high
    low_many, high_many = benchmark.bootstrap_interval(many)
    assert high_many - low_many < high - low
    assert benchmark.bootstrap_interval([2.0]) == (2.0, 2.0)


def test_paired_differences_count_wins_by_each_metric_direction():
    def run(emo, blora):
        values = {m: {k: 0.0 for k in benchmark.METRIC_KEYS} for m in benchmark.METHODS}
        values["emolora"].update(technique_accuracy=emo, hfrd_gt=emo)
        values["blora"].update(technique_accuracy=blora, hfrd_gt=blora)
        return values

    result = benchmark.paired([run(0.8, 0.2), run(0.6, 0.4)])["blora"]
    mean, low, high, wins = result["technique_accuracy"]
    assert mean == pytest.approx(0.4) and wins == 1.0  # higher accuracy is better
    assert result["hfrd_gt"][3] == 0.0  # higher HFRD is worse: EmoLoRA wins none


def test_gate_needs_every_training_and_held_out_technique():
    good = {t: 1.0 for t in TRAIN_TECHNIQUES + HELD_OUT}
    assert benchmark.gate_verdict(good)[0]
    assert not benchmark.gate_verdict({**good, TRAIN_TECHNIQUES[0]: 0.85})[0]
    assert benchmark.gate_verdict({**good, HELD_OUT[0]: 0.7})[0]
    assert not benchmark.gate_verdict({**good, HELD_OUT[0]: 0.65})[0]
    missing = dict(good)
    del missing[HELD_OUT[-1]]
    assert not benchmark.gate_verdict(missing)[0]
    passed, line = benchmark.gate_verdict(good, designs=2)  # a smoke run's few designs never pass
    assert not passed and "from 2 new designs (fewer than the gate's 12" in line
    assert "DDIM" in line and "ancestral sampling (eta 1)" in benchmark.gate_verdict(good, eta=1.0)[1]
    assert "CFG 2," in line and "CFG 6," in benchmark.gate_verdict(good, cfg=6.0)[1]


def test_base_check_has_a_row_per_technique_and_marks_the_held_out_ones():
    torch.set_num_threads(1)
    techniques = (TRAIN_TECHNIQUES[0], HELD_OUT[0], "chain horizontal fine matte")
    table, accuracy, misses = benchmark.base_check(1, strengths=(0.6,), techniques=techniques)
    table = table.splitlines()
    assert len(table) == 5 and table[0].count("@ 0.6") == 2
    assert table[2].startswith(f"| `{TRAIN_TECHNIQUES[0]}` |") and table[3].startswith(f"| `{HELD_OUT[0]}` (held out) |")
    assert table[4].startswith("| `chain horizontal fine matte` (new kind) |")
    score, hfrd_gt = (float(c) for c in table[2].strip("|").split("|")[1:])
    assert score == accuracy[TRAIN_TECHNIQUES[0]] and 0.0 <= score <= 1.0 and hfrd_gt >= 0.0
    assert misses[0][1] == round(1 - score)  # one design, one training technique checked


def test_base_check_counts_the_misread_training_techniques_per_new_design(monkeypatch):
    # A classifier that reads every output as the first training technique: on each design the
    # second training technique is a miss, the first is not, and the held-out one is not counted.
    torch.set_num_threads(1)
    monkeypatch.setattr(benchmark, "predict", lambda classifier, images: [TRAIN_TECHNIQUES[0]] * len(images))
    techniques = (TRAIN_TECHNIQUES[0], TRAIN_TECHNIQUES[1], HELD_OUT[0])
    check = benchmark.base_check(2, strengths=(0.6, 0.9), techniques=techniques,
                                 config=benchmark.ToyRunConfig(sample_steps=2))
    subjects = [t.subject for t in benchmark.demo.new_designs(2, TRAIN_TECHNIQUES[0], benchmark.BENCH_DESIGN_SEED)]
    assert check.misses == ((subjects[0], 1), (subjects[1], 1))
    assert check.accuracy == {TRAIN_TECHNIQUES[0]: 1.0, TRAIN_TECHNIQUES[1]: 0.0, HELD_OUT[0]: 0.0}
    line = benchmark.misses_line(check.misses, 2)
    assert line == f"Training techniques misread per new design (of 2, at strength 0.6): #0 {subjects[0]} 1, " \
                   f"#1 {subjects[1]} 1."


def test_round_trip_check_starts_from_the_renders_the_classifier_reads():
    torch.set_num_threads(1)
    technique = TRAIN_TECHNIQUES[0]
    table = benchmark.base_check(1, strengths=(0.1,), techniques=(technique,), round_trip=True)[0].splitlines()
    assert table[0].startswith("| Technique | acc. of render | acc. @ 0.1 | HFRD(gt) @ 0.1 |")
    assert table[1].count("---:") == 3
    on_render, accuracy, hfrd_gt = (float(c) for c in table[2].strip("|").split("|")[1:])
    assert on_render == 1.0  # the classifier reads the generator's own render
    assert 0.0 <= accuracy <= 1.0
    # Starting from the render at strength 0.1 keeps it nearly as it is; from the flat design
    # (the ordinary check) the output is nowhere near the render.
    from_design = benchmark.base_check(1, strengths=(0.1,), techniques=(technique,))[0].splitlines()[2]
    assert hfrd_gt < float(from_design.strip("|").split("|")[2])


def test_round_trip_needs_base_check():
    with pytest.raises(SystemExit):
        benchmark.main(["--round-trip"])


def test_a_negative_eta_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--base-check", "--eta", "-1"])
    assert "--eta must be >= 0" in capsys.readouterr().err


def test_cfg_reaches_the_gate_and_a_cfg_under_1_is_refused(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--base-check", "--cfg", "0.5"])
    assert "--cfg must be >= 1" in capsys.readouterr().err
    seen = {}

    def no_work(designs, strengths, techniques, weights, round_trip, classifier, config, design_seed):
        seen["cfg"] = config.cfg
        return benchmark.BaseCheck("| table |", {}, (("a red circle", 0),))

    monkeypatch.setattr(benchmark, "base_check", no_work)
    assert benchmark.main(["--base-check", "--cfg", "6"]) == 0
    assert seen["cfg"] == 6.0 and "CFG 6, no LoRA" in capsys.readouterr().out


def test_the_motif_rule_keeps_designs_that_hold_ten_coarse_stitches_and_reaches_the_gate(monkeypatch, capsys):
    from toyworld.demo import design_seeds, new_designs
    from toyworld.generator import DESIGN_COLOURS, make_design, motif_cells

    design = make_design(benchmark.BENCH_DESIGN_SEED, 64, DESIGN_COLOURS)
    assert motif_cells(design) == (design.labels > 0).sum() / 64  # an 8 x 8 px coarse cell at 64 px
    start = benchmark.BENCH_DESIGN_SEED
    assert design_seeds(12, start, DESIGN_COLOURS) == list(range(start, start + 12))  # no rule: as before
    kept = design_seeds(12, start, DESIGN_COLOURS, 10.0)
    cells = {s: motif_cells(make_design(s, 64, DESIGN_COLOURS)) for s in range(start, kept[-1] + 1)}
    assert kept == [s for s, c in cells.items() if c >= 10.0]  # the first twelve that hold it, in order
    assert min(cells.values()) < 10.0  # the rule drops some of the gate's old designs
    assert [t.subject for t in new_designs(2, TRAIN_TECHNIQUES[0], start, 10.0)] == \
        [" ".join(make_design(s, 64, DESIGN_COLOURS).words) for s in kept[:2]]
    assert benchmark.reference_seed(HELD_OUT[0], 1) == benchmark.BENCH_REFERENCE_SEED + 1000 * \
        benchmark.TECHNIQUES.index(HELD_OUT[0]) + 1  # without the rule, the old references
    with pytest.raises(ValueError, match="coarse cells of motif"):
        design_seeds(2, start, DESIGN_COLOURS, 60.0)  # more than a 64 px image holds
    good = {t: 1.0 for t in TRAIN_TECHNIQUES + HELD_OUT}
    assert "of >= 10 coarse cells of motif" in benchmark.gate_verdict(good, min_cells=10.0)[1]
    assert "every design, no motif rule" in benchmark.gate_verdict(good)[1]
    for bad in ("-1", "25"):
        with pytest.raises(SystemExit):
            benchmark.main(["--base-check", "--min-motif-cells", bad])
        assert "--min-motif-cells must be in 0..20" in capsys.readouterr().err
    seen = {}

    def no_work(designs, strengths, techniques, weights, round_trip, classifier, config, design_seed):
        seen.update(cells=config.min_motif_cells, seed=design_seed)
        return benchmark.BaseCheck("| table |", {}, (("a red circle", 0),))

    monkeypatch.setattr(benchmark, "base_check", no_work)
    assert benchmark.main(["--base-check"]) == 0  # the CLI's gate takes the benchmark's rule and designs
    assert seen["cells"] == benchmark.BENCH_MIN_MOTIF_CELLS == 10.0 and "of >= 10 coarse cells" in capsys.readouterr().out
    assert seen["seed"] == benchmark.BENCH_DESIGN_SEED
    assert benchmark.main(["--base-check", "--gate-seed", "4600000", "--min-motif-cells", "0"]) == 0
    assert seen == {"cells": 0.0, "seed": 4_600_000} and "every design, no motif rule" in capsys.readouterr().out
    for bad, message in ((["--base-check", "--gate-seed", "5"], "the base's training designs"),
                         (["--gate-seed", "4600000"], "only applies to --base-check")):
        with pytest.raises(SystemExit):
            benchmark.main(bad)
        assert message in capsys.readouterr().err


def test_an_unknown_technique_is_refused():
    with pytest.raises(SystemExit):
        benchmark.main(["--techniques", "satin horizontal fine matte"])  # a training technique, not held out


def test_runs_in_several_processes_give_the_numbers_of_one_and_resume_from_the_runs_kept(tmp_path, monkeypatch):
    """--jobs: the runs are independent and seeded, so two worker processes (one thread each)
    give exactly the single-process numbers, in the same order. --runs-dir: a second invocation
    reads back every run the first kept, and runs again one whose settings changed."""
    torch.set_num_threads(1)  # what each worker uses: the same arithmetic
    config = benchmark.ToyRunConfig(**benchmark.demo.QUICK)
    args = (1, 1, 2, ("knot vertical fine metallic",), config)
    one, reused = benchmark.run(*args, jobs=1, runs_dir=str(tmp_path))
    assert reused == 0 and len(list(tmp_path.glob("*.json"))) == 2
    two, _ = benchmark.run(*args, jobs=2)
    strip = lambda runs: [{k: v for k, v in r.items() if k != "train_seconds"} for r in runs]  # noqa: E731
    assert strip(one) == strip(two) and [r["seed"] for r in two] == [0, 1]

    def no_work(task):
        raise AssertionError(f"ran {task[:3]} again")

    monkeypatch.setattr(benchmark, "_run_task", no_work)
    again, reused = benchmark.run(*args, jobs=1, runs_dir=str(tmp_path))
    assert reused == 2 and again == one
    changed = benchmark.ToyRunConfig(**{**benchmark.demo.QUICK, "cfg": 3.0})
    with pytest.raises(AssertionError, match="ran"):  # other settings: not the same run
        benchmark.run(1, 1, 2, ("knot vertical fine metallic",), changed, jobs=1, runs_dir=str(tmp_path))
    monkeypatch.setattr(benchmark, "code_digest", lambda: "another code")
    with pytest.raises(AssertionError, match="ran"):  # other code: not the same run either
        benchmark.run(*args, jobs=1, runs_dir=str(tmp_path))
