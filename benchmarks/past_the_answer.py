"""How often a model reaches the right result in the last step without giving the answer, then computes on
(built-in arithmetic task): from a run's saved evaluation outputs, per model, and among the problems each model
lost against M1. The step check once passed such a last step (docs/results.md, "Step truth"). Beside it, per
model, how many right answers came by right steps only (``steps_right``, as psr eval now records it; runs older
than that field are re-checked here against the run's own benchmark problems) and the mean steps written.

    python benchmarks/past_the_answer.py runs/v4_s0_lastans --out results/experiment_v4/s0/past_the_answer.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from psr.evaluate import steps_right
from psr.report import benchmark_problems

STEP = re.compile(r"Step (\d+):([^\n]*)")


def gold_steps(question: str) -> int:
    """The built-in problems' shape: a starting sentence, one sentence a step, then the question."""
    return len([s for s in re.split(r"(?<=[.?])\s+", question.strip()) if s]) - 2


def went_past(row: dict) -> bool:
    """The last step's result is the gold, no answer in that step, and more steps follow."""
    n, steps = gold_steps(row["question"]), STEP.findall(row["output"])
    for k, text in steps:
        if int(k) == n and len(steps) > n and "boxed" not in text:
            if re.search(r"=\s*" + re.escape(str(row["gold"])) + r"\.?\s*$", text.strip()):
                return True
    return False


def checked_steps(task, problems: dict, row: dict) -> bool | None:
    """The row's steps_right as psr eval records it, re-checked for evals older than that field."""
    if "steps_right" in row:
        return row["steps_right"]
    problem = problems[row["id"]]
    assert problem.question == row["question"], f"problem {row['id']} is not the run's"
    return steps_right(task, problem, row["output"], row["correct"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", default="runs/v4_s0", help="a run folder (its stages' eval_*.json)")
    ap.add_argument("--benchmark", default="arithmetic")
    ap.add_argument("--out")
    args = ap.parse_args()
    run = Path(args.run)
    files = sorted(run.glob(f"**/eval_{args.benchmark}.json"))
    models = {str(f.parent.relative_to(run)): {r["id"]: r for r in json.loads(f.read_text())["problems"]}
              for f in files}
    m1 = models.get("init")
    known = benchmark_problems(run, args.benchmark)
    if known is None:
        sys.exit(f"{run / 'config.yaml'}: no benchmark {args.benchmark!r} whose problems can be rebuilt")
    task, problems = known
    out = {"command": "python benchmarks/past_the_answer.py " + " ".join(sys.argv[1:]), "models": {}}
    for stage, rows in models.items():
        row = {"n": len(rows), "right": sum(r["correct"] for r in rows.values()),
               "went_past_the_answer": sum(went_past(r) for r in rows.values()),
               "steps_right": sum(bool(checked_steps(task, problems, r)) for r in rows.values()),
               "mean_steps": round(sum(r["n_steps"] for r in rows.values()) / max(1, len(rows)), 2)}
        if m1 is not None and stage != "init":
            lost = [i for i in rows if m1[i]["correct"] and not rows[i]["correct"]]
            row["lost_vs_m1"] = len(lost)
            row["lost_vs_m1_went_past"] = sum(went_past(rows[i]) for i in lost)
        out["models"][stage] = row
        print(stage, row)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
