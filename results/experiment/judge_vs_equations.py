"""Does the judge at least prefer steps whose equation is true? Per PSR round of a run: at kept steps
whose candidates differ in whether their (last) equation is arithmetically true, how often the kept
candidate's equation is true, against a random pick. Truth of the equation alone, not of the path.

    python results/experiment/judge_vs_equations.py runs/experiment
"""

import json
import re
import sys
from fractions import Fraction
from pathlib import Path

EQUATION = re.compile(r"(-?\d+(?:\.\d+)?)\s*([+\-*/×x÷])\s*(-?\d+(?:\.\d+)?)\s*=\s*(-?\d+(?:\.\d+)?)")


def equation_true(step: str):
    found = EQUATION.findall(step.replace(",", ""))
    if not found:
        return None
    a, op, b, z = found[-1]
    a, b, z = Fraction(a), Fraction(b), Fraction(z)
    op = {"×": "*", "x": "*", "÷": "/"}.get(op, op)
    if op == "/":
        return b != 0 and a / b == z
    return {"+": a + b, "-": a - b, "*": a * b}[op] == z


for round_dir in sorted(Path(sys.argv[1], "psr").glob("round_*")):
    mixed = kept_true = random_true = 0
    for line in (round_dir / "search.jsonl").open():
        for e in json.loads(line)["events"]:
            if not (e.get("kept") or e.get("rolled_back")):
                continue
            truth = [equation_true(c) for c in e["candidates"]]
            if True in truth and False in truth:
                mixed += 1
                kept_true += truth[e["best"]] is True
                random_true += sum(t is True for t in truth) / len(truth)
    print(f"{round_dir.name}: {mixed} steps with true and false equations; kept a true one "
          f"{kept_true / max(1, mixed):.2f}, random pick {random_true / max(1, mixed):.2f}")
