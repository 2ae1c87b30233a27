"""The paper's six Table 1 benchmarks as recipes (issue 29): each loads as a ``psr eval`` config, the 7B iterate
recipes evaluate the same six with the same settings, rows shaped like each hub dataset's (its field names, its
answer type: AIME's integer, OlympiadBench's list of one) give the right gold, and the report has the paper's
table: accuracy per benchmark and their unweighted average. The hub itself is not reached from here."""

import json
from pathlib import Path

import pytest
import yaml

from psr.config import load_config
from psr.evaluate import EvalConfig
from psr.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes" / "qwen2.5-math-7b"
PAPER = ["gsm8k", "math", "gaokao2023en", "olympiadbench", "aime2024", "amc2023"]
# One row as each dataset has it (field names and value types as published), and the gold psr must read.
ROWS = {
    "gsm8k": ({"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"}, "7"),
    "math": ({"problem": "Simplify $\\frac{2}{4}$.", "solution": "... \\boxed{\\frac12}", "answer": "\\frac{1}{2}"},
             "\\frac{1}{2}"),
    "gaokao2023en": ({"question": "Find $x$ if $2x=6$.", "answer": "3"}, "3"),
    "olympiadbench": ({"question": "Compute $1+1$.", "final_answer": ["$2$"], "solution": ["..."]}, "2"),
    "aime2024": ({"problem": "Find the remainder ...", "answer": "204", "id": 60}, "204"),
    "amc2023": ({"question": "What is $3^2$?", "answer": 9.0}, "9.0"),
}


def _eval_recipe(name):
    return load_config(EvalConfig, RECIPES / "eval" / f"config_{name}.yaml")


def test_the_six_benchmarks_are_eval_recipes_and_the_7b_runs_use_them():
    assert sorted(p.stem.removeprefix("config_") for p in (RECIPES / "eval").glob("config_*.yaml")) == sorted(PAPER)
    for method in ("psr", "srlm"):
        run = yaml.safe_load((RECIPES / "iterate" / f"config_{method}.yaml").read_text())
        assert [b["name"] for b in run["benchmarks"]] == PAPER
        for b in run["benchmarks"]:
            e = yaml.safe_load((RECIPES / "eval" / f"config_{b['name']}.yaml").read_text())
            assert {k: b[k] for k in ("task", "limit", "max_new_tokens", "batch_size")} == \
                {k: e[k] for k in ("task", "limit", "max_new_tokens", "batch_size")}


@pytest.mark.parametrize("name", PAPER)
def test_rows_shaped_like_each_dataset_give_its_gold(tmp_path, name):
    cfg = _eval_recipe(name)
    row, gold = ROWS[name]
    data = tmp_path / f"{name}.jsonl"
    data.write_text(json.dumps(row) + "\n")
    task = make_task(type(cfg.task)(**{**cfg.task.__dict__, "data": str(data), "subset": None}))
    problem = task.problems(limit=None)[0]
    assert problem.gold == gold and problem.question == row[cfg.task.question_field]
    assert task.check_answer(problem, f"Step 1: So the answer is \\boxed{{{gold}}}.")
    assert not task.check_answer(problem, "Step 1: So the answer is \\boxed{12345}.")


def test_a_final_answer_of_the_wrong_shape_is_named(tmp_path):
    from psr.files import DataError

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": {"value": 3}}) + "\n")
    task = make_task(type(_eval_recipe("gaokao2023en").task)(name="math", data=str(data), answer_format="final"))
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'answer' must be a final answer"):
        task.problems()


def test_report_has_the_table_1_average(tmp_path):
    from psr.report import summary_table, write_report

    def stage(d, acc):
        d.mkdir(parents=True)
        (d / "eval.json").write_text(json.dumps({"benchmarks": {b: {"accuracy": a} for b, a in acc.items()}}))

    stage(tmp_path / "m0", {"gsm8k": 0.5, "math": 0.25, "aime2024": 0.0})
    stage(tmp_path / "init", {"gsm8k": 0.75, "math": 0.5, "aime2024": 0.1})
    stage(tmp_path / "psr" / "round_1", {"gsm8k": 0.8, "math": 0.6})  # one benchmark missing: no average
    report = write_report(tmp_path).read_text()
    assert "| model | gsm8k | math | aime2024 | Avg. |" in report
    assert "| M0 | 50.0 | 25.0 | 0.0 | 25.0 |" in report and "| M1 | 75.0 | 50.0 | 10.0 | 45.0 |" in report
    assert "| M2 PSR | 80.0 | 60.0 | — | — |" in report
    assert "M1      75.0   50.0  10.0      45.0" in summary_table(tmp_path)
