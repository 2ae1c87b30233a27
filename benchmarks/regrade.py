"""Re-grade saved evaluations under psr's one grading rule (the first final answer decides; no final answer is
wrong) beside the old default (the last number of the text when it had no \\boxed{} / #### / "the answer
is"), on the very same outputs. No model runs: it reads ``psr eval`` JSON files (``problems[].output``).

    python benchmarks/regrade.py results/eval/smollm2_arithmetic.json results/eval/smollm2_gsm8k.json \
        --out results/grading/regrade_committed.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from psr.answers import final_answer, flexible_answer, is_equivalent  # noqa: E402
from psr.generation import cut_after_answer  # noqa: E402


def regrade(path: str, per_problem: str | None = None) -> dict:
    result = json.loads(Path(path).read_text())
    rows = result["problems"]
    old = [is_equivalent(r["gold"], flexible_answer(cut_after_answer(r["output"]))) for r in rows]
    new = [is_equivalent(r["gold"], final_answer(r["output"])) for r in rows]
    answered = [final_answer(r["output"]) is not None for r in rows]
    if per_problem:  # every problem's grade, so that each figure can be re-derived from committed files
        out = Path(per_problem) / (Path(path).stem + ".per_problem.jsonl")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps({"id": r["id"], "correct": c, "answered": a, "correct_old_rule": o}) + "\n"
                               for r, c, a, o in zip(rows, new, answered, old)))
    n = len(rows)
    return {"file": path, "model": result.get("model"), "task": result.get("task"), "n": n,
            "old_rule_correct": sum(old), "new_rule_correct": sum(new),
            "old_rule_accuracy": round(sum(old) / n, 4), "new_rule_accuracy": round(sum(new) / n, 4),
            "old_correct_without_a_final_answer": sum(o and not a for o, a in zip(old, answered)),
            "answered": round(sum(answered) / n, 4),
            "stored_accuracy": result.get("accuracy")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", help="psr eval result JSON files (default: the committed M0 evaluations)")
    parser.add_argument("--out", help="write the table as JSON here")
    parser.add_argument("--per-problem", help="also write <file>.per_problem.jsonl (id, correct, answered) here")
    args = parser.parse_args()
    args.files = args.files or ["results/eval/smollm2_arithmetic.json", "results/eval/smollm2_gsm8k.json"]
    table = [regrade(f, args.per_problem) for f in args.files]
    print(f"{'file':<48} {'n':>5} {'old rule':>9} {'new rule':>9} {'answered':>9}  old-correct w/o answer")
    for t in table:
        print(f"{t['file']:<48} {t['n']:>5} {t['old_rule_accuracy']:>9.3f} {t['new_rule_accuracy']:>9.3f} "
              f"{t['answered']:>9.3f}  {t['old_correct_without_a_final_answer']} of {t['old_rule_correct']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"command": "python benchmarks/regrade.py " + " ".join(args.files),
                                              "rows": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
