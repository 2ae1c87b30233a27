"""The report's paired differences against M1: computed from the eval stages' per-problem rows."""

import json

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
