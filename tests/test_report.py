"""The report's paired differences against M1: computed from the eval stages' per-problem rows."""

import json
from pathlib import Path

import pytest

from psr.report import paired_difference, write_report


def test_paired_difference_against_a_hand_count():
    base = {i: i < 10 for i in range(100)}             # 10 right
    other = {i: i < 30 or i == 99 for i in range(100)}  # 31 right: 21 gained, none lost
    d = paired_difference(base, other)
    assert d["n"] == 100 and d["difference"] == pytest.approx(0.21)
    se = ((0.21 * 0.79 * 100 / 99) ** 0.5) / 10          # sd of 21 ones and 79 zeros, over sqrt(n)
    assert d["z"] == pytest.approx(0.21 / se) and d["interval"][0] == pytest.approx(0.21 - 1.96 * se)
    assert paired_difference(base, base)["z"] is None     # no change at all: no z, not a division by zero
    assert paired_difference(base, {1000: True}) is None  # no problem in common


def _eval(d, correct):
    d.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"p{i}", "output": "The answer is \\boxed{1}.", "correct": c} for i, c in enumerate(correct)]
    (d / "eval.json").write_text(json.dumps({"benchmarks": {"arith": {"accuracy": sum(correct) / len(correct)}}}))
    (d / "eval_arith.json").write_text(json.dumps({"problems": rows}))


def test_report_lists_each_model_against_m1(tmp_path):
    _eval(tmp_path / "m0", [False] * 40)
    _eval(tmp_path / "init", [True] * 8 + [False] * 32)
    _eval(tmp_path / "psr" / "round_1", [True] * 20 + [False] * 20)
    report = write_report(tmp_path).read_text()
    assert "| M1 | arith | 40 | 0.200 | +0.200 (vs M0) |" in report
    assert "| M2 PSR | arith | 40 | 0.500 | +0.300 (vs M1) |" in report
    from psr.report import summary_table

    assert "M2 PSR  arith      40  0.500     +0.300 (vs M1)" in summary_table(tmp_path)
    # every model's grade per problem, beside the report: each figure re-derived from one small file
    rows = [json.loads(line) for line in (tmp_path / "per_problem.jsonl").read_text().splitlines()]
    assert len(rows) == 120 and {r["model"] for r in rows} == {"M0", "M1", "M2 PSR"}
    m2 = [r for r in rows if r["model"] == "M2 PSR"]
    assert sum(r["correct"] for r in m2) / len(m2) == 0.5 and m2[0] == {
        "model": "M2 PSR", "stage": "psr/round_1", "benchmark": "arith", "id": "p0", "correct": True,
        "answered": None}


def test_wilson_and_holm_against_hand_values():
    from psr.report import holm, two_sided_p, wilson

    lo, hi = wilson(0.0, 48)
    assert lo == 0.0 and 0.07 < hi < 0.08                 # 0 of 48: [0, 0.074], never below 0
    lo, hi = wilson(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert two_sided_p(1.96) == pytest.approx(0.05, abs=1e-3)
    # Holm: sorted 0.01, 0.02, 0.03 with m = 3 -> 0.03, 0.04, 0.04 (monotone), back in the given order
    assert holm([0.03, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])


def test_report_corrects_for_the_number_of_comparisons(tmp_path):
    # z 2.5 uncorrected, but one of 7 comparisons: Holm does not call it significant
    _eval(tmp_path / "m0", [False] * 100)
    _eval(tmp_path / "init", [True] * 20 + [False] * 80)
    # round 1 gains 6 problems (z 2.5, p 0.012); rounds 2-6 move by 1-2 problems; round 7 by none
    for r, gained in ((1, 6), (2, 1), (3, -1), (4, 2), (5, -2), (6, 1), (7, 0)):
        _eval(tmp_path / "psr" / f"round_{r}", [True] * (20 + gained) + [False] * (80 - gained))
    report = write_report(tmp_path).read_text()
    assert "Holm" in report and "one training run" in report
    m1 = next(line for line in report.splitlines() if line.startswith("| M1 | arith"))
    m2 = next(line for line in report.splitlines() if line.startswith("| M2 PSR | arith"))
    assert m1.endswith("| yes |")                          # 0.2 vs 0: z 5, survives the correction
    z = float(m2.split("|")[7])
    assert 2.0 <= z and m2.endswith("| no |")              # uncorrected rule would have said "more than noise"
    assert "| M8 PSR | arith | 100 | 0.200 | +0.000 (vs M1) | +0.000 to +0.000 | — | — | — | — |" in report
    assert "the 7 comparisons with a z" in report


def test_report_shows_sampled_measures_answered_share_and_bounded_plots(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from psr import report as rep

    for sub, acc in (("m0", 0.0), ("init", 0.25), ("psr/round_1", 0.5)):
        d = tmp_path / sub
        d.mkdir(parents=True)
        b = {"n": 4, "accuracy": acc, "answered": 0.75, "maj@4": acc, "pass@4": 1.0}
        if sub != "m0":
            b["test_time_search_accuracy"] = 0.5
        (d / "eval.json").write_text(json.dumps({"benchmarks": {"arith": b}}))
    report = write_report(tmp_path).read_text()
    header = next(line for line in report.splitlines() if line.startswith("| model | method"))
    for col in ("arith maj@4", "arith pass@4", "arith test-time search", "answered (arith)"):
        assert col in header
    assert "| M2 | PSR round 1 | 0.500 | 0.500 | 1.000 | 0.500 | 0.750 |" in report
    # the accuracy plot: y within [0, 1], integer ticks named by model, error bars drawn
    seen = {}
    real = rep._save

    def keep(fig, path):
        seen[path.name] = fig.axes[0]
        return real(fig, path)

    rep._save = keep
    try:
        rep.write_plots(tmp_path, rep.collect(tmp_path))
    finally:
        rep._save = real
    ax = seen["accuracy.png"]
    assert ax.get_ylim() == (0.0, 1.0)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["M0", "M1", "M2"]
    assert ax.containers                                    # errorbar containers: the Wilson intervals


def test_report_shows_steps_right_where_the_task_checks_steps(tmp_path):
    _eval(tmp_path / "m0", [False] * 4)
    _eval(tmp_path / "init", [True] * 2 + [False] * 2)
    d = tmp_path / "oracle" / "round_1"
    _eval(d, [True] * 3 + [False])
    (d / "eval.json").write_text(json.dumps({"benchmarks": {"arith": {"accuracy": 0.75, "steps_right": 0.25}}}))
    rows = json.loads((d / "eval_arith.json").read_text())["problems"]
    for r, s in zip(rows, [True, False, False, False]):
        r["steps_right"] = s
    (d / "eval_arith.json").write_text(json.dumps({"problems": rows}))
    report = write_report(tmp_path).read_text()
    header = next(line for line in report.splitlines() if line.startswith("| model |"))
    assert "steps right (arith)" in header
    m2 = next(line for line in report.splitlines() if line.startswith("| M2 | ORACLE round 1 |")).split(" | ")
    assert m2[header.split(" | ").index("steps right (arith)")] == "0.250"
    per_problem = [json.loads(line) for line in (tmp_path / "per_problem.jsonl").read_text().splitlines()]
    assert [r.get("steps_right") for r in per_problem if r["model"] == "M2 ORACLE"] == [True, False, False, False]


def _per_problem(d: Path, right: dict) -> str:
    """A seed's per_problem.jsonl: model -> how many of 100 problems it gets right (the first ones)."""
    d.mkdir(parents=True)
    rows = [{"model": m, "benchmark": "arithmetic", "id": f"p{i}", "correct": i < k}
            for m, k in right.items() for i in range(100)]
    (d / "per_problem.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(d / "per_problem.jsonl")


def test_experiment_summary_reads_the_goal_over_both_seeds(tmp_path, capsys):
    """The self-judge issue's verdict: PSR's last round above M1 after Holm's correction and at or above SRLM,
    in every seed; one seed short of it and the goal is not reached."""
    import importlib.util

    script = Path(__file__).parents[1] / "benchmarks" / "experiment_summary.py"
    spec = importlib.util.spec_from_file_location("experiment_summary", script)
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    good = {"M1": 20, "M2 PSR": 30, "M3 PSR": 45, "M2 SRLM": 25, "M3 SRLM": 30}
    s0, s1 = _per_problem(tmp_path / "s0", good), _per_problem(tmp_path / "s1", good)
    out = tmp_path / "summary.json"
    summary.main([s0, s1, "--out", str(out), "--plot", str(tmp_path / "summary.png")])
    result = json.loads(out.read_text())
    assert result["goal_reached"] and set(result["goal"]) == {"s0", "s1"}
    assert result["accuracy"]["s1"] == {"M1": 0.2, "M2 PSR": 0.3, "M3 PSR": 0.45, "M2 SRLM": 0.25, "M3 SRLM": 0.3}
    assert (tmp_path / "summary.png").stat().st_size > 0
    psr_vs_srlm = [r for r in result["comparisons"] if r["model"] == "M3 PSR" and r["against"] == "M3 SRLM"]
    assert [round(r["difference"], 2) for r in psr_vs_srlm] == [0.15, 0.15]
    # seed 1's PSR falls behind SRLM: not reached
    s1 = _per_problem(tmp_path / "s1b", {**good, "M3 SRLM": 50})
    summary.main([s0, s1, "--out", str(out)])
    assert json.loads(out.read_text())["goal"]["s1b"] == {"psr_last_above_m1_significant": True,
                                                          "psr_last_at_or_above_srlm": False}
    assert "not reached" in capsys.readouterr().out
    # a seed whose SRLM arm has not run yet: not known, and the goal is not reached on it
    s1 = _per_problem(tmp_path / "s1c", {m: k for m, k in good.items() if "SRLM" not in m})
    summary.main([s0, s1, "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["goal"]["s1c"]["psr_last_at_or_above_srlm"] is None and not result["goal_reached"]


def test_a_run_given_its_m1_without_m0_has_no_m0_row(tmp_path):
    _eval(tmp_path / "init", [True] * 2 + [False] * 2)
    _eval(tmp_path / "psr" / "round_1", [True] * 3 + [False])
    report = write_report(tmp_path).read_text()
    assert "| M1 |" in report and "| M2 | PSR round 1 |" in report
    assert not [line for line in report.splitlines() if line.startswith("| M0 |")]


def test_report_checks_the_steps_of_an_eval_older_than_steps_right(tmp_path):
    """An eval made before steps_right existed is re-checked against the run's own benchmark problems (its
    config.yaml): the reference solution counts, a lucky answer from a wrong step does not."""
    import shutil

    from psr.config import load_config
    from psr.rounds import RunConfig

    shutil.copy(Path(__file__).parents[1] / "recipes" / "tiny" / "iterate" / "config_tiny.yaml",
                tmp_path / "config.yaml")
    cfg = load_config(RunConfig, tmp_path / "config.yaml")
    b = cfg.benchmarks[0]
    e = b.eval_config("", cfg.seed, "")
    from psr.tasks import make_task

    problems = make_task(e.task).problems(e.split, e.limit, seed=e.seed, offset=e.offset)[:2]
    right = "\n".join(problems[0].reference_steps)
    lucky = "Step 1: Adding 1: 1 + 1 = 3. The answer is \\boxed{" + problems[1].gold + "}."
    d = tmp_path / "init"
    d.mkdir()
    rows = [{"id": p.id, "question": p.question, "output": o, "correct": True}
            for p, o in zip(problems, [right, lucky])]
    (d / "eval.json").write_text(json.dumps({"benchmarks": {b.name: {"accuracy": 1.0, "answered": 1.0}}}))
    (d / f"eval_{b.name}.json").write_text(json.dumps({"problems": rows}))
    report = write_report(tmp_path).read_text()
    header = next(line for line in report.splitlines() if line.startswith("| model |")).split(" | ")
    m1 = next(line for line in report.splitlines() if line.startswith("| M1 |")).split(" | ")
    assert m1[header.index(f"steps right ({b.name})")] == "0.500"
    # a config that no longer loads (a moved data file, a renamed field) leaves the column out, not the report
    (tmp_path / "config.yaml").write_text("benchmarks: [{name: arithmetic, task: {name: gsm8k, data: gone.jsonl}}]\n")
    assert "steps right (arithmetic)" not in write_report(tmp_path).read_text()
