"""The self-judge issue's verdict across seeds: from each seed's ``per_problem.jsonl`` (written by ``psr report``
beside a run's report), every arm's rounds against M1 and PSR against SRLM at each round, paired by problem,
with Holm's correction over all of them together (both seeds, every benchmark), and whether the goal holds:
the PSR arm ends above M1 on held-out arithmetic in every seed, significant after correction, and at or above
SRLM.

    python benchmarks/experiment_summary.py results/experiment_v4/s0/per_problem.jsonl \\
        results/experiment_v4/s1/per_problem.jsonl --out results/experiment_v4/summary.json \\
        --plot results/experiment_v4/summary.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from psr.report import holm, paired_difference, two_sided_p


def read_grades(path: str) -> dict:
    """(model, benchmark) -> {problem id: right}; models as the report names them (M1, M2 PSR, ...)."""
    grades = defaultdict(dict)
    for line in Path(path).read_text().splitlines():
        r = json.loads(line)
        grades[(r["model"], r["benchmark"])][r["id"]] = bool(r["correct"])
    return grades


def comparisons(name: str, grades: dict) -> list[dict]:
    rows = []
    benchmarks = sorted({b for _, b in grades})
    arms = defaultdict(list)  # method -> its models in round order
    for model, _ in grades:
        if " " in model and model not in arms[model.split()[1]]:
            arms[model.split()[1]].append(model)
    for b in benchmarks:
        m1 = grades.get(("M1", b))
        if m1 is None:
            continue
        for _, models in sorted(arms.items()):
            for model in sorted(models, key=lambda m: int(m.split()[0][1:])):
                rows.append({"seed": name, "benchmark": b, "model": model, "against": "M1",
                             **paired_difference(m1, grades[(model, b)])})
        for model in arms.get("PSR", []):
            srlm = grades.get((model.replace("PSR", "SRLM"), b))
            if srlm is not None:
                rows.append({"seed": name, "benchmark": b, "model": model, "against": model.replace("PSR", "SRLM"),
                             **paired_difference(srlm, grades[(model, b)])})
    return rows


def accuracies(grades: dict, benchmark: str) -> dict:
    """model -> accuracy on ``benchmark`` (M1, then each arm's rounds, as the report names them)."""
    return {m: sum(right.values()) / len(right) for (m, b), right in grades.items() if b == benchmark and right}


def plot(accuracy: dict, benchmark: str, path: str) -> None:
    """Accuracy by round, one panel per arm, one line per seed, each starting at its seed's M1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = sorted({m.split()[1] for acc in accuracy.values() for m in acc if " " in m})
    fig, axes = plt.subplots(1, max(len(arms), 1), figsize=(4 * max(len(arms), 1), 3.2), sharey=True, squeeze=False)
    for ax, arm in zip(axes[0], arms):
        for seed, acc in accuracy.items():
            rounds = sorted((int(m.split()[0][1:]) - 1, a) for m, a in acc.items() if m.endswith(" " + arm))
            if "M1" in acc and rounds:
                ax.plot([0] + [r for r, _ in rounds], [acc["M1"]] + [a for _, a in rounds], marker="o", label=seed)
        ax.set_title(arm)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("round (0: M1)")
        ax.legend()
    axes[0][0].set_ylabel(f"{benchmark} accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("per_problem", nargs="+", help="one per_problem.jsonl per seed")
    ap.add_argument("--benchmark", default="arithmetic", help="the benchmark the goal is read on")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--out")
    ap.add_argument("--plot", help="a PNG of each arm's accuracy by round, one line per seed")
    args = ap.parse_args(argv)
    # each seed by its folder's name (results/experiment_v4/s1/per_problem.jsonl: s1)
    grades = {Path(path).parent.name: read_grades(path) for path in args.per_problem}
    rows = [c for name, g in grades.items() for c in comparisons(name, g)]
    accuracy = {name: accuracies(g, args.benchmark) for name, g in grades.items()}
    if args.plot:
        plot(accuracy, args.benchmark, args.plot)
    tested = [r for r in rows if r.get("z") is not None]
    for r, p in zip(tested, holm([two_sided_p(r["z"]) for r in tested])):
        r["p"], r["holm_p"], r["significant"] = two_sided_p(r["z"]), p, p < args.alpha
    print(f"{'seed':<12} {'benchmark':<11} {'model':<12} {'vs':<8} {'n':>4} {'diff':>7} {'z':>6} {'Holm p':>8}")
    for r in rows:
        z, hp = r.get("z"), r.get("holm_p")
        print(f"{r['seed']:<12} {r['benchmark']:<11} {r['model']:<12} {r['against']:<8} {r['n']:>4} "
              f"{r['difference']:>+7.3f} {'—' if z is None else f'{z:.2f}':>6} {'—' if hp is None else f'{hp:.3g}':>8}")

    def last(prefix: str, seed: str, against: str) -> dict | None:
        own = [r for r in rows if r["seed"] == seed and r["benchmark"] == args.benchmark
               and r["model"].endswith(prefix) and r["against"] == against]
        return max(own, key=lambda r: int(r["model"].split()[0][1:]), default=None)

    seeds = list(dict.fromkeys(r["seed"] for r in rows))
    goal = {}
    for seed in seeds:
        psr, vs_srlm = last(" PSR", seed, "M1"), None
        if psr is not None:
            vs_srlm = next((r for r in rows if r["seed"] == seed and r["benchmark"] == args.benchmark
                            and r["model"] == psr["model"] and r["against"] != "M1"), None)
        # None: that arm is not in this seed's file yet (an arm still running), so not known, not failed
        goal[seed] = {"psr_last_above_m1_significant": None if psr is None else
                      bool(psr["difference"] > 0 and psr.get("significant")),
                      "psr_last_at_or_above_srlm": None if vs_srlm is None else vs_srlm["difference"] >= 0}
    reached = bool(goal) and all(all(v is True for v in g.values()) for g in goal.values())
    print("goal (PSR's last round above M1, significant, and at or above SRLM, in every seed):",
          "reached" if reached else "not reached", goal)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": "python benchmarks/experiment_summary.py "
                                              + " ".join(sys.argv[1:] if argv is None else argv),
                                              "alpha": args.alpha, "benchmark": args.benchmark,
                                              "accuracy": accuracy, "comparisons": rows, "goal": goal,
                                              "goal_reached": reached}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
